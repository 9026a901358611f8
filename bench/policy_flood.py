"""What one abusive client costs every other client of the policy server: a probe's latency
under floods.

Starts ``mqpolicy serve -c FILE`` on a loopback port (the policy of ``bench/policy_bench.py``,
memory store), opens one probe connection that sends an ordinary RCPT request, waits for
the answer and sends the next (as a Postfix smtpd process does), and while it runs sends
each flood in turn:

* ``newlines``: one connection sends 256 KiB of ``\\n`` (each a request without attributes);
* ``pipelined``: one connection sends 12,000 tiny valid requests in one write;
* ``newlines x20`` and ``pipelined x20``: twenty such connections at once.

Every flood connection reads whatever it is answered until it has every answer or the
server closes it. For each flood the script prints how long the flood lasted (first byte
sent to last answer or close), the server's CPU seconds meanwhile, how the flood ended, and
the probe's answers to the requests it sent from the flood's start until its end (and at
least 200 ms): how many, the median and the worst latency, and whether every one was the
answer the probe gets on an idle server. The ``idle`` row is
the probe alone. The server is stopped by its PID at the end, also on error or Ctrl-C.

    python bench/policy_flood.py
    python bench/policy_flood.py --requests 12000 --newline-bytes 262144 --connections 20

Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench_processes import Processes, cpu_seconds, sigterm_as_interrupt, wait_accepting
from policy_bench import POLICY_TEMPLATE, REPO

from mqpolicy.delegation.codec import encode_request
from mqpolicy.lab.readiness import free_port

PROBE_REQUEST = encode_request({
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "protocol_name": "ESMTP",
    "client_address": "192.0.2.10",
    "client_name": "mail.example.com",
    "helo_name": "mail.example.com",
    "sender": "alice@example.com",
    "recipient": "bob@example.net",
    "recipient_count": "0",
    "instance": "1f2e.5f8a1b2c.4d3e.0",
    "size": "12345",
})
# The smallest request Postfix's attributes make: one attribute, then the empty line.
TINY_REQUEST = b"protocol_state=RCPT\n\n"
READ_SIZE = 1 << 16
# The probe's requests sent from a flood's start count, until the flood ends and at least
# this long.
PROBE_WINDOW_S = 0.2


@dataclass
class Probe:
    """One connection asking one request at a time; latencies in seconds, by send time."""

    host: str
    port: int
    expected: bytes = b""
    samples: list[tuple[float, float, bool]] = field(default_factory=list)  # sent, s, right

    async def run(self, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            while not stop.is_set():
                sent = time.perf_counter()
                writer.write(PROBE_REQUEST)
                answer = await reader.readuntil(b"\n\n")
                if not self.expected:
                    self.expected = answer
                self.samples.append((sent, time.perf_counter() - sent, answer == self.expected))
                await asyncio.sleep(0.002)  # a probe, not a second flood
        finally:
            writer.close()

    def between(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        """The probe requests sent from ``start`` until ``end`` (their answers may come later)."""
        return [s for s in self.samples if start <= s[0] <= end]


async def flood(host: str, port: int, payload: bytes, answers_due: int) -> str:
    """Send ``payload`` at once; read answers until ``answers_due`` or the server closes.
    How it ended: ``answered N`` or ``closed after N answers``."""
    reader, writer = await asyncio.open_connection(host, port)
    answered, last = 0, b""
    try:
        writer.write(payload)
        while answered < answers_due:
            try:
                chunk = await reader.read(READ_SIZE)
            except ConnectionError:
                chunk = b""
            if not chunk:
                return f"closed after {answered} answers"
            # An answer never holds an empty line: each "\n\n" ends one.
            answered += (last + chunk).count(b"\n\n")
            last = chunk[-1:] if chunk[-1:] == b"\n" and not chunk.endswith(b"\n\n") else b""
        return f"answered {answered}"
    finally:
        writer.close()


@dataclass
class Row:
    name: str
    seconds: float
    server_cpu_s: float
    outcome: str
    probes: int
    p50_ms: float
    worst_ms: float
    all_right: bool


def summarise(name: str, probe: Probe, start: float, end: float, cpu: float,
              outcome: str) -> Row:
    # a flood closed at once still has a probe or two sent after it began
    samples = probe.between(start, max(end, start + PROBE_WINDOW_S))
    latencies = [s[1] for s in samples] or [0.0]
    return Row(name, end - start, cpu, outcome, len(samples),
               1000 * statistics.median(latencies), 1000 * max(latencies),
               all(s[2] for s in samples))


async def scenarios(args: argparse.Namespace, port: int, pid: int) -> list[Row]:
    host = "127.0.0.1"
    probe = Probe(host, port)
    stop = asyncio.Event()
    probing = asyncio.create_task(probe.run(stop))
    rows: list[Row] = []
    try:
        await asyncio.sleep(0.5)
        now = time.perf_counter()
        rows.append(summarise("idle", probe, now - 0.5, now, 0.0, "-"))
        newlines = b"\n" * args.newline_bytes
        pipelined = TINY_REQUEST * args.requests
        plan = [
            ("newlines", [(newlines, args.newline_bytes)]),
            ("pipelined", [(pipelined, args.requests)]),
            (f"newlines x{args.connections}", [(newlines, args.newline_bytes)] * args.connections),
            (f"pipelined x{args.connections}", [(pipelined, args.requests)] * args.connections),
        ]
        for name, floods in plan:
            cpu_before = cpu_seconds(pid)
            start = time.perf_counter()
            outcomes = await asyncio.gather(*(flood(host, port, payload, due)
                                              for payload, due in floods))
            end = time.perf_counter()
            cpu = cpu_seconds(pid) - cpu_before
            await asyncio.sleep(0.3)  # the probe's request sent last gets its answer
            if probing.done():
                probing.result()  # the probe's own error, if it failed
                raise RuntimeError("the probe connection ended")
            distinct = sorted(set(outcomes))
            outcome = distinct[0] if len(distinct) == 1 else "; ".join(distinct)
            rows.append(summarise(name, probe, start, end, cpu, outcome))
            print(format_row(rows[-1]), file=sys.stderr)
    finally:
        stop.set()
        await asyncio.gather(probing, return_exceptions=True)
    return rows


HEADER = (f"{'flood':<15} {'flood s':>8} {'server cpu s':>12} {'probes':>6} "
          f"{'probe p50 ms':>12} {'probe worst ms':>14}  right  ended")


def format_row(r: Row) -> str:
    return (f"{r.name:<15} {r.seconds:>8.2f} {r.server_cpu_s:>12.2f} {r.probes:>6} "
            f"{r.p50_ms:>12.2f} {r.worst_ms:>14.2f}  {'yes' if r.all_right else 'NO':<5}"
            f"  {r.outcome}")


def run(args: argparse.Namespace) -> list[Row]:
    workdir = Path(tempfile.mkdtemp(prefix="mqpolicy-flood-"))
    procs = Processes(workdir)
    try:
        port = free_port()
        policy = workdir / "policy.yaml"
        policy.write_text(POLICY_TEMPLATE.format(port=port, store_url="memory://",
                                                 log_level="warning"))
        server = procs.start("serve", [args.mqpolicy, "serve", "-c", str(policy)])
        wait_accepting(server, ("127.0.0.1", port))
        rows = asyncio.run(scenarios(args, port, server.proc.pid))
        if server.proc.poll() is not None:
            raise RuntimeError(f"mqpolicy serve exited with {server.proc.returncode}")
        if args.keep:
            print(f"kept {workdir} (serve.log: the server's log)", file=sys.stderr)
        return rows
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--newline-bytes", type=int, default=256 * 1024,
                   help="bytes of \\n one newline flood sends (default 262144)")
    p.add_argument("--requests", type=int, default=12_000,
                   help="tiny requests one pipelined flood sends (default 12000)")
    p.add_argument("--connections", type=int, default=20,
                   help="flood connections at once in the x N floods (default 20)")
    p.add_argument("--mqpolicy", default=str(REPO / ".venv" / "bin" / "mqpolicy"),
                   help="the mqpolicy command (default .venv/bin/mqpolicy)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (policy file, the server's log)")
    args = p.parse_args(argv)
    if min(args.newline_bytes, args.requests, args.connections) < 1:
        p.error("--newline-bytes, --requests and --connections must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with sigterm_as_interrupt():
            rows = run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"policy_flood: {exc}", file=sys.stderr)
        return 1
    print(HEADER)
    for row in rows:
        print(format_row(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
