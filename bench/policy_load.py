"""Load generator for the Postfix policy delegation protocol (``check_policy_service``).

Each of ``--concurrency`` persistent connections behaves like one Postfix smtpd process: it
sends one request, waits for the reply, then sends the next, walking through messages (one
RCPT request per recipient, then one END-OF-MESSAGE request). The run is bounded by
``--duration`` and/or ``--requests`` and stops by itself.

The workload is generated up front from ``--seed``: about 1,000 senders, 200 client /24
networks, 5,000 recipients across 300 domains (skewed like real mail: a few big providers
take most recipients), SASL users on part of the senders, TLS on most connections, declared
and actual sizes. Every request is pre-encoded; only its ``instance`` and ``queue_id`` tail
is built per message, so the generator spends little CPU per request (it shares the machine
with the server it measures: its own CPU use is printed). All names are under the reserved
``.test`` and ``.example`` TLDs and addresses in documentation ranges.

The I/O loop is a plain epoll loop over non-blocking sockets (no asyncio): one ``send`` and
one ``recv`` per request. ``--processes N`` spreads the connections over N processes.

``--rate R`` paces the load: R requests/s over all connections, each connection sending its
next request on its own schedule (never before the reply to the last). Postfix's smtpd
processes send that way, so the server wakes for nearly every request alone; unpaced, a
busy server finds several requests per wake-up and its CPU per request looks lower.

    python bench/policy_load.py --target 127.0.0.1:10040 --concurrency 8 --duration 10
    python bench/policy_load.py --target unix:/run/mqpolicy/policy.sock --requests 100000
    python bench/policy_load.py --target 127.0.0.1:10040 --rate 1000 --watch-pid PID
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import random
import select
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench_processes import cpu_seconds

NS_PER_MS = 1_000_000
REPLY_END = b"\n\n"
RECV_SIZE = 65536
TICK_S = 0.05  # how often the loop wakes to check the clock and the reply deadlines


# --------------------------------------------------------------------------- target


@dataclass(frozen=True, slots=True)
class Target:
    family: int
    address: str | tuple[str, int]

    def __str__(self) -> str:
        if isinstance(self.address, str):
            return f"unix:{self.address}"
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_target(text: str) -> Target:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``unix:/path``."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute: {text!r}")
        return Target(socket.AF_UNIX, path)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad target {text!r} (use [::1]:10040)")
        port_text = rest[1:]
        family = socket.AF_INET6
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad target {text!r} (use HOST:PORT or unix:/path)")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return Target(family, (host, int(port_text)))


def connect(target: Target, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(target.address)
        if target.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# --------------------------------------------------------------------------- workload


def zipf_cum_weights(n: int, s: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (i + 1) ** s for i in range(n)))


def pick(rng: random.Random, items: Sequence[Any], cum: Sequence[float]) -> Any:
    return items[bisect.bisect_left(cum, rng.random() * cum[-1])]


@dataclass(frozen=True, slots=True)
class Sender:
    address: str
    sasl_username: str  # "" when the sender does not authenticate


@dataclass(frozen=True, slots=True)
class Population:
    senders: list[Sender]
    sender_cum: list[float]
    networks: list[str]  # "a.b.c" of a /24
    network_cum: list[float]
    recipients: list[str]
    recipient_cum: list[float]


def make_population(rng: random.Random) -> Population:
    """~1,000 senders, 200 client /24 networks, 5,000 recipients over 300 domains."""
    sender_domains = [f"shop{i}.example" for i in range(60)] + [
        f"corp{i}.test" for i in range(40)
    ]
    senders: list[Sender] = [
        # Names the example policy's classification rules know about.
        Sender("noreply@app.example.com", "app-transactional"),
        Sender("reset@auth.example.com", "app-transactional"),
        Sender("digest@news.example.com", "newsletter-digest"),
        Sender("offers@news.example.com", "newsletter-offers"),
        Sender("", ""),  # bounces (null sender)
    ]
    while len(senders) < 1000:
        i = len(senders)
        domain = sender_domains[int(rng.paretovariate(1.2)) % len(sender_domains)]
        address = f"user{i}@{domain}"
        sasl = ""
        if rng.random() < 0.35:  # submission users: authenticated
            sasl = f"newsletter-{i}" if rng.random() < 0.05 else f"user{i}"
        senders.append(Sender(address, sasl))
    # Shuffle so that the heavy senders of the Zipf curve are not always the special ones.
    head, rest = senders[:5], senders[5:]
    rng.shuffle(rest)
    senders = rest[:3] + head + rest[3:]

    # 200 networks in the documentation and benchmarking ranges.
    networks = [f"198.{18 + i // 100}.{i % 100}" for i in range(150)]
    networks += [f"203.0.{113 + i}" for i in range(5)]
    networks += [f"192.0.{i}" for i in range(2, 47)]
    rng.shuffle(networks)

    # 300 recipient domains: a few large providers, then a long tail.
    recipient_domains = [f"mx{i}.provider.test" for i in range(10)] + [
        f"dom{i}.example" for i in range(290)
    ]
    domain_cum = zipf_cum_weights(len(recipient_domains), 1.1)
    recipients = [
        f"r{i}@{pick(rng, recipient_domains, domain_cum)}" for i in range(5000)
    ]
    return Population(
        senders=senders,
        sender_cum=zipf_cum_weights(len(senders), 0.9),
        networks=networks,
        network_cum=zipf_cum_weights(len(networks), 0.8),
        recipients=recipients,
        recipient_cum=zipf_cum_weights(len(recipients), 0.6),
    )


def recipient_count(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.70:
        return 1
    if r < 0.90:
        return rng.randint(2, 3)
    if r < 0.98:
        return rng.randint(4, 10)
    return rng.randint(20, 60)


def encode(attrs: Sequence[tuple[str, str | int]]) -> bytes:
    return "".join(f"{k}={v}\n" for k, v in attrs).encode()


def make_message(rng: random.Random, pop: Population) -> tuple[bytes, ...]:
    """The request prefixes of one message: its RCPT requests, then END-OF-MESSAGE.

    Each prefix lacks the ``instance`` and ``queue_id`` lines and the empty line that ends
    the request: the connection adds them per message, so no two messages share them.
    """
    sender: Sender = pick(rng, pop.senders, pop.sender_cum)
    net: str = pick(rng, pop.networks, pop.network_cum)
    client_address = f"{net}.{rng.randint(1, 254)}"
    if rng.random() < 0.1:
        client_name = "unknown"
        reverse_name = "unknown"
        helo = f"[{client_address}]"
    else:
        client_name = f"mail{rng.randint(1, 9)}.{net.replace('.', '-')}.hosting.test"
        reverse_name = client_name
        helo = client_name
    submission = bool(sender.sasl_username)
    tls = submission or rng.random() < 0.7
    nrcpt = recipient_count(rng)
    rcpts: list[str] = []
    while len(rcpts) < nrcpt:
        rcpt: str = pick(rng, pop.recipients, pop.recipient_cum)
        if rcpt not in rcpts or len(rcpts) >= len(pop.recipients):
            rcpts.append(rcpt)
    size = int(min(rng.lognormvariate(math.log(20_000), 1.3), 20_000_000)) + 400
    declared = size if rng.random() < 0.8 else 0

    def request(state: str, recipient: str, count: int, size_attr: int) -> bytes:
        return encode(
            [
                ("request", "smtpd_access_policy"),
                ("protocol_state", state),
                ("protocol_name", "ESMTP"),
                ("client_address", client_address),
                ("client_name", client_name),
                ("client_port", rng.randint(1024, 65535)),
                ("reverse_client_name", reverse_name),
                ("server_address", "192.0.2.25"),
                ("server_port", 587 if submission else 25),
                ("helo_name", helo),
                ("sender", sender.address),
                ("recipient", recipient),
                ("recipient_count", count),
                ("sasl_method", "PLAIN" if submission else ""),
                ("sasl_username", sender.sasl_username),
                ("sasl_sender", ""),
                ("size", size_attr),
                ("ccert_subject", ""),
                ("ccert_issuer", ""),
                ("ccert_fingerprint", ""),
                ("ccert_pubkey_fingerprint", ""),
                ("encryption_protocol", "TLSv1.3" if tls else ""),
                ("encryption_cipher", "TLS_AES_256_GCM_SHA384" if tls else ""),
                ("encryption_keysize", 256 if tls else 0),
                ("etrn_domain", ""),
                ("stress", ""),
                ("policy_context", ""),
                ("compatibility_level", "3.6"),
                ("mail_version", "3.7.11"),
            ]
        )

    # Postfix: recipient_count is non-zero only from DATA on; at END-OF-MESSAGE the
    # recipient is given only when the message has exactly one.
    reqs = [request("RCPT", r, 0, declared) for r in rcpts]
    reqs.append(request("END-OF-MESSAGE", rcpts[0] if nrcpt == 1 else "", nrcpt, size))
    return tuple(reqs)


def make_workload(seed: int, messages: int) -> list[tuple[bytes, ...]]:
    rng = random.Random(seed)
    pop = make_population(rng)
    return [make_message(rng, pop) for _ in range(messages)]


# --------------------------------------------------------------------------- the loop


@dataclass(slots=True)
class Conn:
    ident: int
    sock: socket.socket | None = None
    msg: int = 0  # index into the workload
    step: int = 0  # index of the next request within the message
    seq: int = 0  # messages started on this connection
    tail_first: bytes = b""
    tail_rest: bytes = b""
    sent_at: int = 0  # perf_counter_ns of the request in flight, 0 when idle
    buf: bytes = b""
    retry_at: float = 0.0  # monotonic time of the next connect attempt when sock is None
    due_ns: int = 0  # paced: perf_counter_ns at which the next request is due


@dataclass(slots=True)
class WorkerResult:
    latencies_ns: list[int] = field(default_factory=list)
    replies: dict[bytes, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    completed: int = 0  # replies inside the measured window
    window_s: float = 0.0
    cpu_s: float = 0.0
    watched_cpu_s: dict[int, float] = field(default_factory=dict)  # pid -> CPU in the window


def run_worker(
    target: Target,
    workload: list[tuple[bytes, ...]],
    conn_ids: range,
    total_conns: int,
    start_at: float,
    warmup_s: float,
    duration_s: float | None,
    max_requests: int | None,
    timeout_s: float,
    max_time_s: float,
    watch_pids: Sequence[int] = (),
    rate: float | None = None,
) -> WorkerResult:
    """Drive ``conn_ids`` connections until the window ends; return what was measured.

    ``start_at`` is a ``time.monotonic()`` instant shared by all worker processes.
    ``max_requests`` counts replies inside the measured window (after warmup). ``rate``:
    requests/s over all ``total_conns`` connections, paced (None: as fast as answered).
    """
    res = WorkerResult()
    latencies = res.latencies_ns
    replies = res.replies
    errors = res.errors
    nmsg = len(workload)
    pid_tag = f"{os.getpid():x}"
    ep = select.epoll()
    by_fd: dict[int, Conn] = {}
    conns = [Conn(ident=i, msg=(i * nmsg) // total_conns) for i in conn_ids]
    perf_ns = time.perf_counter_ns
    monotonic = time.monotonic
    # paced: the gap between one connection's requests, and the connections waiting for
    # their next request's time
    gap_ns = int(total_conns * 1e9 / rate) if rate else 0
    waiting: list[Conn] = []

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    def drop(c: Conn, kind: str) -> None:
        if c.sock is not None:
            by_fd.pop(c.sock.fileno(), None)
            with contextlib.suppress(OSError, ValueError):
                ep.unregister(c.sock)
            c.sock.close()
            c.sock = None
        if kind:
            error(kind)
        c.sent_at = 0
        c.buf = b""
        c.retry_at = monotonic() + 0.2
        if c in waiting:  # paced: it sends again once reconnected, not also from here
            waiting.remove(c)
        # Postfix starts afresh after a lost connection: the message in progress is gone.
        if c.step:
            c.step = 0
            c.msg = (c.msg + 1) % nmsg

    def open_conn(c: Conn) -> bool:
        try:
            c.sock = connect(target, timeout=timeout_s)
        except OSError:
            error("connect")
            c.retry_at = monotonic() + 0.2
            return False
        by_fd[c.sock.fileno()] = c
        ep.register(c.sock, select.EPOLLIN)
        return True

    def send_next(c: Conn, now_ns: int) -> None:
        prefixes = workload[c.msg]
        step = c.step
        if step == 0:
            c.seq += 1
            inst = f"{pid_tag}.{c.ident:x}.{c.seq:x}"
            qid = f"{(c.ident << 28) | (c.seq & 0xFFFFFFF):010X}"
            c.tail_first = f"instance={inst}\nqueue_id=\n\n".encode()
            c.tail_rest = f"instance={inst}\nqueue_id={qid}\n\n".encode()
            data = prefixes[0] + c.tail_first
        else:
            data = prefixes[step] + c.tail_rest
        step += 1
        if step == len(prefixes):
            c.step = 0
            c.msg = (c.msg + 1) % nmsg
        else:
            c.step = step
        sock = c.sock
        assert sock is not None
        c.sent_at = now_ns
        try:
            n = sock.send(data)
            if n != len(data):  # the send buffer is never this full, but be correct
                sock.setblocking(True)
                sock.sendall(data[n:])
                sock.setblocking(False)
        except OSError:
            drop(c, "send")

    for c in conns:
        open_conn(c)
    pause = start_at - monotonic()
    if pause > 0:
        time.sleep(pause)

    measure_from = start_at + warmup_s
    stop_at = start_at + max_time_s
    if duration_s is not None:
        stop_at = min(stop_at, measure_from + duration_s)
    measure_from_ns = perf_ns() + int((measure_from - monotonic()) * 1e9)
    measuring = False
    stopping = False
    cpu0 = 0.0
    t0 = t_last = 0.0
    completed = 0
    next_check = 0.0
    watched_done = False

    def send_when_due(c: Conn, now_ns: int) -> None:
        """Send the next request now, or (paced) when it is due."""
        if not gap_ns:
            send_next(c, now_ns)
            return
        # a connection that fell behind starts afresh: no burst to catch up
        c.due_ns = max(c.due_ns + gap_ns, now_ns)
        if c.due_ns <= now_ns:
            send_next(c, now_ns)
        else:
            waiting.append(c)

    now_ns = perf_ns()
    for c in conns:
        # paced: the connections' first requests spread over one gap
        c.due_ns = now_ns + (gap_ns * c.ident) // total_conns - gap_ns
        if c.sock is not None:
            send_when_due(c, now_ns)

    while True:
        timeout = TICK_S
        if waiting:
            timeout = min(timeout, max(0.0, (min(c.due_ns for c in waiting) - perf_ns()) / 1e9))
        events = ep.poll(timeout)
        for fd, _ in events:
            hit = by_fd.get(fd)
            if hit is None or hit.sock is None:
                continue
            c = hit
            try:
                data = hit.sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                drop(c, "recv")
                continue
            if not data:
                drop(c, "closed by server")
                continue
            if c.buf:
                data = c.buf + data
            if not data.endswith(REPLY_END):
                c.buf = data
                continue
            c.buf = b""
            now_ns = perf_ns()
            if measuring and not stopping and c.sent_at >= measure_from_ns:
                latencies.append(now_ns - c.sent_at)
                replies[data] = replies.get(data, 0) + 1
                completed += 1
            c.sent_at = 0
            if stopping:
                continue
            if max_requests is not None and completed >= max_requests:
                stopping = True
                t_last = monotonic()
                continue
            send_when_due(c, now_ns)
        if waiting and not stopping:
            now_ns = perf_ns()
            due = [c for c in waiting if c.due_ns <= now_ns]
            if due:
                waiting[:] = [c for c in waiting if c.due_ns > now_ns]
                for c in due:
                    if c.sock is not None:
                        send_next(c, now_ns)

        now = monotonic()
        if not measuring and now >= measure_from:
            measuring = True
            t0 = now
            cpu = os.times()
            cpu0 = cpu.user + cpu.system
            res.watched_cpu_s = {pid: cpu_seconds(pid) for pid in watch_pids}
        if not stopping and now >= stop_at:
            stopping = True
            t_last = now
        if stopping and measuring and watch_pids and not watched_done:
            watched_done = True
            res.watched_cpu_s = {
                pid: cpu_seconds(pid) - start for pid, start in res.watched_cpu_s.items()
            }
        if now >= next_check:
            next_check = now + 0.1
            deadline_ns = perf_ns() - int(timeout_s * 1e9)
            for c in conns:
                if c.sock is None:
                    if not stopping and now >= c.retry_at and open_conn(c):
                        send_when_due(c, perf_ns())
                elif c.sent_at and c.sent_at < deadline_ns:
                    drop(c, "timeout")
        if stopping:
            # Let the requests in flight finish (bounded by their deadline), then leave.
            if not any(c.sent_at for c in conns if c.sock is not None):
                break
            if now > t_last + timeout_s + 1:
                break

    cpu = os.times()
    res.cpu_s = cpu.user + cpu.system - cpu0
    res.completed = completed
    res.window_s = max(t_last - t0, 1e-9) if measuring else 0.0
    for c in conns:
        drop(c, "")
    ep.close()
    return res


def _worker_entry(conn: Any, kwargs: dict[str, Any]) -> None:
    try:
        conn.send(run_worker(**kwargs))
    finally:
        conn.close()


# --------------------------------------------------------------------------- report


def action_key(reply: bytes) -> str:
    """``action=450 4.7.1 Rate exceeded`` -> ``450 4.7.1``; ``action=FILTER x:`` -> both words."""
    text = reply.decode("utf-8", "replace").strip()
    text = text.removeprefix("action=")
    words = text.split(None, 2)
    if not words:
        return "(empty)"
    first = words[0].upper()
    if len(words) > 1 and (
        first in {"FILTER", "REDIRECT", "BCC"}
        or (first.isdigit() and words[1][:1].isdigit())
    ):
        return f"{words[0]} {words[1]}"
    return words[0]


def percentile(sorted_values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile (``p`` in 0..100)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarise(results: list[WorkerResult], args: argparse.Namespace) -> dict[str, Any]:
    latencies = sorted(itertools.chain.from_iterable(r.latencies_ns for r in results))
    completed = sum(r.completed for r in results)
    window = max((r.window_s for r in results), default=0.0)
    cpu = sum(r.cpu_s for r in results)
    actions: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in results:
        for reply, n in r.replies.items():
            key = action_key(reply)
            actions[key] = actions.get(key, 0) + n
        for kind, n in r.errors.items():
            errors[kind] = errors.get(kind, 0) + n

    def ms(ns: float) -> float:
        return round(ns / NS_PER_MS, 4)

    return {
        "target": args.target,
        "concurrency": args.concurrency,
        "processes": args.processes,
        "seed": args.seed,
        "warmup_s": args.warmup,
        "window_s": round(window, 4),
        "requests": completed,
        "rps": round(completed / window, 1) if window else 0.0,
        "latency_ms": {
            "p50": ms(percentile(latencies, 50)),
            "p99": ms(percentile(latencies, 99)),
            "p99.9": ms(percentile(latencies, 99.9)),
            "max": ms(latencies[-1]) if latencies else 0.0,
            "mean": ms(sum(latencies) / len(latencies)) if latencies else 0.0,
        },
        "generator_cpu": {
            "percent_of_one_core": round(100 * cpu / window, 1) if window else 0.0,
            "us_per_request": round(1e6 * cpu / completed, 2) if completed else 0.0,
        },
        "rate": args.rate,
        "watched_cpu_percent": {
            str(pid): round(100 * cpu_s / window, 1) if window else 0.0
            for r in results
            for pid, cpu_s in r.watched_cpu_s.items()
        },
        "watched_cpu_us_per_request": {
            str(pid): round(1e6 * cpu_s / completed, 1) if completed else 0.0
            for r in results
            for pid, cpu_s in r.watched_cpu_s.items()
        },
        "actions": dict(sorted(actions.items(), key=lambda kv: -kv[1])),
        "errors": errors,
    }


def print_report(s: dict[str, Any], out: Any = sys.stdout) -> None:
    lat = s["latency_ms"]
    gen = s["generator_cpu"]
    errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none"
    print(
        f"target {s['target']}  concurrency {s['concurrency']}  processes {s['processes']}"
        f"  seed {s['seed']}  warmup {s['warmup_s']}s"
        + (f"  paced at {s['rate']:g} req/s" if s["rate"] else ""),
        file=out,
    )
    print(
        f"requests   {s['requests']} in {s['window_s']:.2f} s = {s['rps']:.1f} req/s"
        f"   (errors: {errors})"
        + ("   SHORT OF --rate: not paced" if s["rate"] and s["rps"] < 0.95 * s["rate"]
           else ""),
        file=out,
    )
    print(
        f"latency    p50 {lat['p50']:.3f} ms  p99 {lat['p99']:.3f} ms"
        f"  p99.9 {lat['p99.9']:.3f} ms  max {lat['max']:.3f} ms  mean {lat['mean']:.3f} ms",
        file=out,
    )
    print(
        f"generator  CPU {gen['percent_of_one_core']:.0f}% of one core,"
        f" {gen['us_per_request']:.1f} us/request",
        file=out,
    )
    total = sum(s["actions"].values()) or 1
    per_request = s["watched_cpu_us_per_request"]
    for pid, pct in s["watched_cpu_percent"].items():
        print(f"pid {pid:<6} CPU {pct:.0f}% of one core, {per_request[pid]:.1f} us/request",
              file=out)
    print("actions", file=out)
    for key, n in s["actions"].items():
        print(f"  {key:<32} {n:>10}  {100 * n / total:6.2f}%", file=out)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Load generator for the Postfix policy delegation protocol."
    )
    p.add_argument("--target", required=True, help="HOST:PORT, [IPv6]:PORT or unix:/path")
    p.add_argument("--concurrency", "-c", type=int, default=8,
                   help="persistent connections, one request in flight each (default 8)")
    p.add_argument("--duration", "-d", type=float, default=None,
                   help="seconds to measure after the warmup (default 10 without --requests)")
    p.add_argument("--requests", "-n", type=int, default=None,
                   help="stop after this many measured replies")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="seconds of load before measuring starts (default 0)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for one reply before dropping the connection")
    p.add_argument("--max-time", type=float, default=600.0,
                   help="hard limit on the whole run in seconds, warmup included (default 600)")
    p.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    p.add_argument("--messages", type=int, default=20_000,
                   help="distinct messages generated up front (default 20000)")
    p.add_argument("--processes", "-p", type=int, default=1,
                   help="spread the connections over this many processes (default 1)")
    p.add_argument("--watch-pid", type=int, action="append", default=[], metavar="PID",
                   help="also report the CPU use of PID (and its children) in the window")
    p.add_argument("--rate", type=float, default=None,
                   help="paced: requests/s over all connections (default: as fast as answered)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.duration is None and args.requests is None:
        args.duration = 10.0
    if args.concurrency < 1 or args.processes < 1 or args.messages < 1:
        p.error("--concurrency, --processes and --messages must be at least 1")
    if args.requests is not None and args.requests < 1:
        p.error("--requests must be at least 1")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive")
    args.processes = min(args.processes, args.concurrency)
    try:
        args.parsed_target = parse_target(args.target)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workload = make_workload(args.seed, args.messages)
    target: Target = args.parsed_target
    procs = args.processes
    start_at = time.monotonic() + (0.2 if procs == 1 else 1.0)
    shares: list[dict[str, Any]] = []
    for k in range(procs):
        lo = args.concurrency * k // procs
        hi = args.concurrency * (k + 1) // procs
        share = None
        if args.requests is not None:
            share = args.requests * (k + 1) // procs - args.requests * k // procs
        shares.append(
            {
                "target": target,
                "workload": workload,
                "conn_ids": range(lo, hi),
                "total_conns": args.concurrency,
                "start_at": start_at,
                "warmup_s": args.warmup,
                "duration_s": args.duration,
                "max_requests": share,
                "timeout_s": args.timeout,
                "max_time_s": args.max_time,
                "watch_pids": args.watch_pid if k == 0 else (),
                "rate": args.rate,
            }
        )
    if procs == 1:
        results = [run_worker(**shares[0])]
    else:
        ctx = multiprocessing.get_context("fork")
        pipes = []
        children = []
        for share in shares:
            parent_end, child_end = ctx.Pipe(duplex=False)
            child = ctx.Process(target=_worker_entry, args=(child_end, share))
            child.start()
            child_end.close()
            pipes.append(parent_end)
            children.append(child)
        results = [pipe.recv() for pipe in pipes]
        for child in children:
            child.join()
    summary = summarise(results, args)
    if args.json:
        print(json.dumps(summary))
    else:
        print_report(summary)
    return 0 if summary["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
