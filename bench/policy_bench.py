"""Policy server throughput and latency: the figures of the README's benchmark table.

Starts its own ``redis-server`` (temporary unix socket and free loopback port, nothing saved),
writes a temporary policy file (the example policy with budgets large enough that most
requests pass), then for each store runs ``mqpolicy serve -c FILE``, waits until it accepts
connections, and drives it with ``bench/policy_load.py`` at each concurrency. Every process
it starts is stopped by its PID when it is done, also on error or Ctrl-C.

``--baseline`` first measures a plain asyncio server that answers ``action=DUNNO`` to every
request without looking at it: the ceiling of a Python asyncio policy server on this
machine, and a check that the load generator is not the bottleneck.

    python bench/policy_bench.py                     # memory, redis (tcp), redis (unix)
    python bench/policy_bench.py --baseline --duration 5 --concurrency 1,8,64
    python bench/policy_bench.py --stores memory --markdown
    python bench/policy_bench.py --stores memory --baseline --concurrency 8 --rate 1500

``--rate`` paces the load (``bench/policy_load.py --rate``) the way Postfix's smtpd processes
send: the server wakes for nearly every request alone, and ``server us/req`` (its CPU time
per request) is what each request costs it then, the figure that decides how much CPU a
policy server takes from Postfix on a shared machine.

Only loopback addresses and private unix sockets are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_processes import Processes, Started, sigterm_as_interrupt, wait_accepting

from mqpolicy.lab.readiness import free_port, log_tail

REPO = Path(__file__).resolve().parent.parent
LOAD = Path(__file__).resolve().parent / "policy_load.py"
STORES = ("memory", "redis-tcp", "redis-unix")

POLICY_TEMPLATE = """\
# Written by bench/policy_bench.py: the example policy with budgets large enough that
# most requests pass (the bulk lane's per-domain budget still holds some mail).
listen:
  - 127.0.0.1:{port}
listen_mode: "0660"

server:
  idle_timeout: 300s
  max_request_size: 64KiB
  max_connections: 4096
  drain_timeout: 5s

store:
  url: {store_url}
  timeout_ms: 50
  on_store_error: accept
  key_prefix: "mqbench:"

log:
  format: kv
  level: {log_level}

lanes:
  - name: transactional
    transport: mq-transactional
    concurrency: 20
    rate_delay: 0s
  - name: normal
    transport: smtp
  - name: bulk
    transport: mq-bulk
    concurrency: 4
    initial_concurrency: 2
    rate_delay: 1s

default_lane: normal

classify:
  - name: password-resets
    when:
      sender: ["noreply@app.example.com", "@auth.example.com"]
    lane: transactional
  - name: newsletters
    when:
      any:
        - sender: "@news.example.com"
        - sasl_username: "newsletter-*"
        - recipient_count: {{min: 50}}
    lane: bulk

limits:
  - name: per-user
    rate: 10000000/1h
    burst: 100000
    key: sasl_username
    count: recipients
    action: defer
    except:
      sasl_username: ["app-transactional"]

  - name: per-sender
    rate: 10000000/1h
    burst: 100000
    key: sender
    count: messages
    lanes: [normal, bulk]
    action: {{demote: bulk}}

  - name: per-client-network
    rate: 10000000/1h
    burst: 100000
    key: client_network/24
    count: messages
    action: defer

  - name: per-recipient-domain-bulk
    rate: 3000/1m
    burst: 500
    key: recipient_domain
    count: recipients
    lanes: [bulk]
    action: hold

  - name: big-senders
    rate: 1000GB/1d
    key: sender_domain
    count: bytes
    action: reject
    monitor: true
"""


# --------------------------------------------------------------------------- processes


# --------------------------------------------------------------------------- the runs


def run_load(
    args: argparse.Namespace, target: str, concurrency: int, server_pids: Sequence[int],
    redis_pid: int | None,
) -> dict[str, Any]:
    argv = [
        sys.executable, str(LOAD), "--target", target, "--concurrency", str(concurrency),
        "--duration", str(args.duration), "--warmup", str(args.warmup),
        "--seed", str(args.seed), "--processes", str(args.processes), "--json",
    ]
    if args.rate:
        argv += ["--rate", str(args.rate)]
    for server_pid in server_pids:
        argv += ["--watch-pid", str(server_pid)]
    if redis_pid:
        argv += ["--watch-pid", str(redis_pid)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          timeout=args.warmup + args.duration + 120)
    if done.returncode != 0 and not done.stdout.strip():
        raise RuntimeError(f"policy_load failed ({done.returncode}): {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    # CPU of the server (and Redis) inside the measured window, in % of one core.
    watched = result["watched_cpu_percent"]
    result["server_cpu_percent"] = round(sum(watched.get(str(pid), 0.0) for pid in server_pids))
    per_request = result["watched_cpu_us_per_request"]
    result["server_us_per_request"] = round(
        sum(per_request.get(str(pid), 0.0) for pid in server_pids), 1)
    result["server_processes"] = len(server_pids)
    if redis_pid:
        result["redis_cpu_percent"] = round(watched.get(str(redis_pid), 0.0))
    return result


def bench_server(
    args: argparse.Namespace, procs: Processes, label: str, argv: Sequence[str], port: int,
    redis: Started | None, copies: int = 1,
) -> list[dict[str, Any]]:
    servers = []
    try:
        for i in range(copies):
            if copies == 1:
                server = procs.start(label, argv)
                servers.append(server)
                wait_accepting(server, ("127.0.0.1", port))  # its log's end in the error
                continue
            # readiness the systemd way: the server sends READY=1 to $NOTIFY_SOCKET (a
            # connect alone could reach an earlier copy listening on the same port)
            with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) as notify:
                path = procs.workdir / f"notify-{label}-{i}.sock"
                notify.bind(str(path))
                notify.settimeout(15)
                server = procs.start(f"{label}-{i}" if copies > 1 else label, argv,
                                     env={**os.environ, "NOTIFY_SOCKET": str(path)})
                servers.append(server)
                try:
                    while b"READY=1" not in notify.recv(4096):
                        pass
                except OSError:
                    print(log_tail(server.log, 20), file=sys.stderr)
                    raise RuntimeError(f"{label}: no READY=1 from the server") from None
        rows = []
        for c in args.concurrency:
            result = run_load(args, f"127.0.0.1:{port}", c, [s.proc.pid for s in servers],
                              redis.proc.pid if redis else None)
            result["store"] = label + (f" x{copies}" if copies > 1 else "")
            rows.append(result)
            print_row(result, file=sys.stderr)
            for server in servers:
                if server.proc.poll() is not None:
                    print(log_tail(server.log, 20), file=sys.stderr)
                    raise RuntimeError(f"{label}: a server exited with {server.proc.returncode}")
    finally:
        for server in servers:
            procs.stop(server)
    return rows



def start_redis(args: argparse.Namespace, procs: Processes) -> tuple[Started, int, Path]:
    port = free_port()
    sock = procs.workdir / "redis.sock"
    redis = procs.start(
        "redis-server",
        [
            args.redis_server, "--port", str(port), "--bind", "127.0.0.1",
            "--unixsocket", str(sock), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(procs.workdir),
            "--daemonize", "no", "--protected-mode", "yes",
        ],
    )
    wait_accepting(redis, ("127.0.0.1", port))  # the end of its log in the error
    wait_accepting(redis, str(sock))
    return redis, port, sock


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="mqpolicy-bench-"))
    procs = Processes(workdir)
    try:
        if args.baseline:
            port = free_port()
            rows += bench_server(
                args, procs, "baseline",
                [sys.executable, str(Path(__file__).resolve()), "--serve-dunno",
                 f"127.0.0.1:{port}"],
                port, None,
            )
        redis: Started | None = None
        redis_port = 0
        redis_sock = Path()
        if any(s.startswith("redis") for s in args.stores):
            redis, redis_port, redis_sock = start_redis(args, procs)
        for store in args.stores:
            url = {
                "memory": "memory://",
                "redis-tcp": f"redis://127.0.0.1:{redis_port}/0",
                "redis-unix": f"unix://{redis_sock}?db=0",
            }[store]
            port = free_port()
            policy = workdir / f"policy-{store}.yaml"
            text = POLICY_TEMPLATE.format(port=port, store_url=url, log_level=args.log_level)
            text = text.replace("\nlog:\n", f"\nlog:\n  decisions: {args.log_decisions}\n", 1)
            shared = store != "memory"
            copies = args.serve_processes if shared else 1
            if copies > 1:
                text = text.replace("server:\n", "server:\n  reuse_port: true\n", 1)
            policy.write_text(text)
            rows += bench_server(
                args, procs, store, [args.mqpolicy, "serve", "-c", str(policy)], port,
                redis if shared else None, copies,
            )
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- output


def print_row(r: dict[str, Any], file: Any = sys.stdout) -> None:
    lat = r["latency_ms"]
    other = {k: v for k, v in r["actions"].items() if k != "DUNNO"}
    total = sum(r["actions"].values()) or 1
    passed = 100 * r["actions"].get("DUNNO", 0) / total
    errors = sum(r["errors"].values())
    print(
        f"{r['store']:<11} C={r['concurrency']:<3} {r['rps']:>9.0f} req/s"
        f"  p50 {lat['p50']:.3f}  p99 {lat['p99']:.3f}  p99.9 {lat['p99.9']:.3f} ms"
        f"  server CPU {r['server_cpu_percent']}% ({r['server_us_per_request']:.0f} us/req)"
        f"  load CPU"
        f" {r['generator_cpu']['percent_of_one_core']:.0f}%"
        f"  DUNNO {passed:.1f}% {json.dumps(other) if other else ''}"
        f"{f'  errors {errors}' if errors else ''}"
        f"{'  SHORT OF --rate: not paced' if r['rate'] and r['rps'] < 0.95 * r['rate'] else ''}",
        file=file,
    )


def print_table(rows: list[dict[str, Any]], markdown: bool) -> None:
    head = ("store", "C", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "server CPU",
            "server us/req", "load CPU")
    body = [
        (
            r["store"],
            str(r["concurrency"]),
            f"{r['rps']:.0f}",
            f"{r['latency_ms']['p50']:.2f}",
            f"{r['latency_ms']['p99']:.2f}",
            f"{r['latency_ms']['p99.9']:.2f}",
            f"{r['server_cpu_percent']}%"
            + (f" (+redis {r['redis_cpu_percent']}%)" if "redis_cpu_percent" in r else ""),
            f"{r['server_us_per_request']:.0f}",
            f"{r['generator_cpu']['percent_of_one_core']:.0f}%",
        )
        for r in rows
    ]
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" if i == 0 else "--:" for i in range(len(head))) + "|")
        for row in body:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    for row in (head, *body):
        print("  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ))


# --------------------------------------------------------------------------- baseline


async def _dunno(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await reader.readuntil(b"\n\n")
            writer.write(b"action=DUNNO\n\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def _serve_dunno(host: str, port: int) -> None:
    server = await asyncio.start_server(_dunno, host, port)
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    async with server:
        await stopped.wait()


def serve_dunno(address: str) -> int:
    """The baseline: one asyncio loop, streams, ``action=DUNNO`` to every request."""
    host, _, port = address.rpartition(":")
    asyncio.run(_serve_dunno(host, int(port)))
    return 0


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--stores", default=",".join(STORES),
                   help=f"comma-separated, from {', '.join(STORES)} (default all)")
    p.add_argument("--concurrency", default="1,8,64",
                   help="comma-separated connection counts (default 1,8,64)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="unmeasured seconds before each run (default 1)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--processes", type=int, default=1,
                   help="load generator processes (default 1)")
    p.add_argument("--serve-processes", type=int, default=1,
                   help="mqpolicy serve processes sharing the port (reuse_port) for the Redis "
                        "stores (default 1)")
    p.add_argument("--baseline", action="store_true",
                   help="also measure a plain asyncio server that answers DUNNO")
    p.add_argument("--mqpolicy", default=str(REPO / ".venv" / "bin" / "mqpolicy"),
                   help="the mqpolicy command (default .venv/bin/mqpolicy)")
    p.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    p.add_argument("--rate", type=float, default=None,
                   help="pace the load at this many requests/s over all connections "
                        "(default: as fast as answered)")
    p.add_argument("--log-level", default="warning",
                   help="log.level of the policy file (default warning)")
    p.add_argument("--log-decisions", default="notable", choices=("notable", "all"),
                   help="log.decisions of the policy file (all: every decision at info, "
                   "with --log-level info to write them)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--json", dest="json_out", metavar="FILE",
                   help="also write every result to FILE as JSON")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (policy files, logs)")
    p.add_argument("--serve-dunno", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_dunno:
        return args
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = sorted(set(args.stores) - set(STORES))
    if unknown:
        p.error(f"unknown store(s) {', '.join(unknown)} (choose from {', '.join(STORES)})")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        p.error("--concurrency takes numbers such as 1,8,64")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency takes numbers of at least 1")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_dunno:
        return serve_dunno(args.serve_dunno)
    try:
        with sigterm_as_interrupt():
            rows = run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"policy_bench: {exc}", file=sys.stderr)
        return 1
    print_table(rows, args.markdown)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
