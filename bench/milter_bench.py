"""Milter throughput: messages/s through ``mqpolicy milter`` against a do-nothing pymilter.

For each transport (a unix socket, TCP on 127.0.0.1) it starts, one after the other:

* ``floor``: a pymilter milter that negotiates the same callbacks and no-reply steps as
  mqpolicy with the bench policy (connect, MAIL and headers without replies; RCPT and end of
  message answered; HELO and the body skipped, as mqpolicy skips them for a policy that
  looks at neither) and answers CONTINUE everywhere without looking at anything;
* ``floor+header``: the same, adding one header per message at the end: the least a
  milter that gives every message its lane header does;
* ``mqpolicy``: ``mqpolicy milter`` with the example policy (budgets large enough that
  mail passes): a store decision at every RCPT and at the end, and in every message the
  lane header a client forged replaced by ours (one header change, as for the floor+header);

and drives them with ``--clients`` client processes in parallel, each one milter connection
speaking the MTA side with ``miltertest`` (like Postfix it writes the packets that need no
answer together with the next one that does). The milters are driven in turn, in
``--pairs`` rounds of ``--seconds`` each (the order alternates); a row shows the median
rate over rounds and the median of the per-round ratios to the floor, so the machine
speeding up or slowing down between rounds hits both sides alike, and ``cpu us`` the milter
process's CPU time (user + system, from ``/proc``) per message over all its rounds. Every
process started is stopped by its PID, also on error or Ctrl-C.

``--without-limits`` also measures ``mqpolicy`` with the bench policy minus its limits
(classification and the lane header, no store work): what the milter costs before it counts.

``--stall`` also measures what a header-changing milter costs per message over TCP when
nothing sets TCP_NODELAY (libmilter binds its own socket), one connection, in sequence.

    python bench/milter_bench.py                       # unix + tcp, 4 clients, 5 rounds of 2 s
    python bench/milter_bench.py --clients 1,4 --pairs 7 --eom-only --stall
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_processes import (
    Processes,
    Started,
    cpu_seconds,
    sigterm_as_interrupt,
    wait_accepting,
)
from miltertest import MilterConnection, codec
from miltertest import constants as C

from mqpolicy.lab.readiness import free_port

REPO = Path(__file__).resolve().parent.parent

POLICY = """\
store: {{url: "memory://", timeout_ms: 50}}
log: {{level: warning}}
milter:
  listen: {listen}
  rcpt_limits: {rcpt_limits}
lanes:
  - name: transactional
    transport: mq-transactional
  - name: normal
  - name: bulk
    transport: mq-bulk
default_lane: normal
classify:
  - name: resets
    when: {{sender: "@auth.example.com"}}
    lane: transactional
  - name: lists
    when: {{bulk_signals: true}}
    lane: bulk
limits:
  - name: per-sender
    rate: 10000000/1h
    burst: 1000000
    key: sender
  - name: per-client-network
    rate: 10000000/1h
    burst: 1000000
    key: client_network/24
  - name: per-recipient-domain
    rate: 10000000/1h
    burst: 1000000
    key: recipient_domain
    count: recipients
"""

POLICY_WITHOUT_LIMITS = POLICY[:POLICY.index("limits:\n")]

BODY = "x" * 76 + "\r\n"
HEADERS = [
    ("Received", "from client.example.net (client.example.net [192.0.2.7]) by mx"),
    ("From", "Alice <alice@example.com>"),
    ("To", "Bob <bob@example.org>"),
    ("Subject", "Your invoice"),
    ("Date", "Thu, 27 Nov 2025 10:00:00 +0000"),
    ("Message-ID", "<1234@example.com>"),
    ("MIME-Version", "1.0"),
    ("X-MQ-Lane", "transactional"),  # forged: mqpolicy changes it to its lane
]


# --------------------------------------------------------------------------- client


def _packet(cmd: str, **args: Any) -> bytes:
    data: bytes = codec.encode_msg(cmd, **args)
    return data


def message_plan(protocol: int, n: int) -> list[tuple[bytes, bool]]:
    """The packets of message ``n``: (bytes to write, whether a reply is read after)."""
    steps: list[tuple[bytes, bool]] = []

    def event(cmd: str, skip: int, no_reply: int, **args: Any) -> None:
        if not protocol & skip:
            steps.append((_packet(cmd, **args), not protocol & no_reply))

    steps.append((_packet(C.SMFIC_MACRO, cmdcode=C.SMFIC_MAIL, nameval=["i", f"Q{n:X}"]), False))
    event(C.SMFIC_MAIL, C.SMFIP_NOMAIL, C.SMFIP_NR_MAIL, args=[f"<user{n % 50}@example.com>"])
    event(C.SMFIC_RCPT, C.SMFIP_NORCPT, C.SMFIP_NR_RCPT, args=[f"<r{n}@dest{n % 20}.example>"])
    event(C.SMFIC_DATA, C.SMFIP_NODATA, C.SMFIP_NR_DATA)
    for name, value in HEADERS:
        event(C.SMFIC_HEADER, C.SMFIP_NOHDRS, C.SMFIP_NR_HDR, name=name, value=value)
    event(C.SMFIC_EOH, C.SMFIP_NOEOH, C.SMFIP_NR_EOH)
    event(C.SMFIC_BODY, C.SMFIP_NOBODY, C.SMFIP_NR_BODY, buf=BODY * 25)
    steps.append((_packet(C.SMFIC_MACRO, cmdcode=C.SMFIC_BODYEOB, nameval=["i", f"Q{n:X}"]),
                  False))
    steps.append((_packet(C.SMFIC_BODYEOB), True))
    # Like Postfix: what needs no answer is written with the next packet that does.
    merged: list[tuple[bytes, bool]] = []
    pending = b""
    for data, reply in steps:
        pending += data
        if reply:
            merged.append((pending, True))
            pending = b""
    return merged


def socket_address(address: str) -> str | tuple[str, int]:
    """``/path`` or ``host:port`` as the socket module takes it."""
    if address.startswith("/"):
        return address
    host, port = address.rsplit(":", 1)
    return host, int(port)


def connect(address: str) -> socket.socket:
    target = socket_address(address)
    if isinstance(target, tuple):
        return socket.create_connection(target, timeout=10)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(target)
    return sock


def client(address: str, seconds: float, start_at: float, worker: int) -> list[float]:
    """One MTA connection sending messages until the time is up; per-message seconds."""
    sock = connect(address)
    conn = MilterConnection(sock)
    _, protocol = conn.optneg_mta()
    if not protocol & C.SMFIP_NOCONNECT:
        sock.sendall(_packet(C.SMFIC_CONNECT, hostname="client.example.net",
                             family=C.SMFIA_INET, port=40000 + worker, address="192.0.2.7"))
        if not protocol & C.SMFIP_NR_CONN:
            conn.recv()
    plans = [message_plan(protocol, worker * 1_000_000 + n) for n in range(64)]
    times: list[float] = []
    while time.time() < start_at:
        time.sleep(0.001)  # all clients start together
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        started = time.perf_counter()
        for data, _ in plans[n % len(plans)]:
            sock.sendall(data)
            reply = conn.recv()
            if reply[0] == C.SMFIC_OPTNEG:
                raise RuntimeError("protocol out of step")
            # modifications and quarantine come before the final answer
            while reply[0] not in (C.SMFIR_CONTINUE, C.SMFIR_ACCEPT, C.SMFIR_TEMPFAIL,
                                   C.SMFIR_REJECT, C.SMFIR_REPLYCODE, C.SMFIR_DISCARD):
                reply = conn.recv()
            if reply[0] != C.SMFIR_CONTINUE:
                raise RuntimeError(f"message refused: {reply}")
        times.append(time.perf_counter() - started)
        n += 1
    with contextlib.suppress(OSError):
        sock.sendall(_packet(C.SMFIC_QUIT))
    sock.close()
    return times


def _client_entry(args: tuple[str, float, float, int]) -> list[float]:
    return client(*args)


# --------------------------------------------------------------------------- processes


@dataclass
class Result:
    transport: str
    milter: str
    clients: int
    rate: float  # messages/s, the median over rounds
    mean_ms: float
    p99_ms: float
    rates: list[float]  # per round
    cpu_us: float  # the milter process's CPU (user + system) per message, all rounds


def endpoint(transport: str, workdir: Path, name: str) -> tuple[str, str]:
    """(libmilter socket spec, client address)."""
    if transport == "unix":
        path = str(workdir / f"{name}.sock")
        return f"unix:{path}", path
    port = free_port()
    return f"inet:{port}@127.0.0.1", f"127.0.0.1:{port}"


def start_milter(kind: str, transport: str, workdir: Path, procs: Processes,
                 floor_mode: str = "plain", rcpt_limits: str = "milter", name: str = "",
                 policy: str = POLICY) -> tuple[Started, str]:
    name = name or kind
    spec, address = endpoint(transport, workdir, name)
    if kind == "floor":
        argv = [sys.executable, str(Path(__file__).with_name("milter_floor.py")), spec,
                floor_mode]
    else:
        config = workdir / f"policy-{name}-{transport}.yaml"
        config.write_text(policy.format(listen=spec, rcpt_limits=rcpt_limits))
        argv = [sys.executable, "-m", "mqpolicy", "milter", "-c", str(config)]
    started = procs.start(f"{name}-{transport}", argv, cwd=REPO)
    wait_accepting(started, socket_address(address))
    return started, address


def _worker_init() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def drive(address: str, clients: int, seconds: float) -> tuple[int, float, list[float]]:
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 0.3
    with ctx.Pool(clients, initializer=_worker_init) as pool:
        results = pool.map(_client_entry,
                           [(address, seconds, start_at, w) for w in range(clients)])
    times = [t for r in results for t in r]
    return len(times), seconds, times


@dataclass
class Contender:
    """One running milter and what its rounds measured."""

    name: str
    address: str
    pid: int
    rates: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    cpu_s: float = 0.0  # the milter's CPU time over the rounds


def measure(contenders: list[Contender], transport: str, clients: int, seconds: float,
            pairs: int) -> list[Result]:
    """``pairs`` rounds over all contenders (the order alternates); one Result each, with
    the median rate. The first contender is the floor."""
    for c in contenders:
        drive(c.address, 1, 0.3)  # warm up
    for round_no in range(pairs):
        order = contenders if round_no % 2 == 0 else contenders[::-1]
        for c in order:
            cpu_before = cpu_seconds(c.pid)
            count, elapsed, times = drive(c.address, clients, seconds)
            c.cpu_s += cpu_seconds(c.pid) - cpu_before
            c.rates.append(count / elapsed)
            c.times.extend(times)
    results = []
    for c in contenders:
        times = sorted(c.times)
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))] if times else 0.0
        results.append(Result(transport, c.name, clients, statistics.median(c.rates),
                              statistics.fmean(times) * 1000 if times else 0.0, p99 * 1000,
                              c.rates, c.cpu_s / len(times) * 1e6 if times else 0.0))
    return results


def print_row(r: Result, floor: Result | None) -> None:
    if floor is None:
        versus = "   floor"
    else:
        ratios = [ours / base for ours, base in zip(r.rates, floor.rates, strict=True)]
        versus = f"{statistics.median(ratios) * 100:6.1f}%"
    print(f"{r.transport:<5} {r.milter:<18} {r.clients:>7} {r.rate:>10.0f} {versus} "
          f"{r.mean_ms:>8.2f} {r.p99_ms:>8.2f} {r.cpu_us:>8.0f}", flush=True)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", default="unix,tcp")
    parser.add_argument("--clients", default="4", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=2.0, help="per milter and round")
    parser.add_argument("--pairs", type=int, default=5,
                        help="rounds over the milters (the figure is the median)")
    parser.add_argument("--eom-only", action="store_true",
                        help="also measure mqpolicy with rcpt_limits: policy_server (Postfix "
                             "with the policy server: one decision per message)")
    parser.add_argument("--without-limits", action="store_true",
                        help="also measure mqpolicy with the bench policy minus its limits "
                             "(no store work: what the milter costs before it counts)")
    parser.add_argument("--stall", action="store_true",
                        help="also measure a header-changing milter on libmilter's own TCP "
                             "socket (no TCP_NODELAY)")
    args = parser.parse_args(argv)
    args.seconds = max(0.5, min(args.seconds, 60.0))
    args.pairs = max(1, min(args.pairs, 50))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mqmbench-", dir="/tmp"))
    procs = Processes(workdir)
    print(f"cpus={os.cpu_count()} rounds={args.pairs} x {args.seconds} s per milter "
          f"(messages: 1 recipient, {len(HEADERS)} headers, {len(BODY) * 25} body bytes)")
    print(f"{'net':<5} {'milter':<18} {'clients':>7} {'msgs/s':>10} {'vs floor':>7} "
          f"{'mean ms':>8} {'p99 ms':>8} {'cpu us':>8}")
    try:
        with sigterm_as_interrupt():
            for transport in args.transports.split(","):
                for clients in (int(c) for c in args.clients.split(",")):
                    started = [("floor", start_milter("floor", transport, workdir, procs)),
                               ("floor+header",
                                start_milter("floor", transport, workdir, procs,
                                             floor_mode="header", name="floor-header")),
                               ("mqpolicy", start_milter("mqpolicy", transport, workdir,
                                                         procs))]
                    if args.eom_only:
                        started.append(("mqpolicy eom-only",
                                        start_milter("mqpolicy", transport, workdir, procs,
                                                     rcpt_limits="policy_server",
                                                     name="mqpolicy-eom")))
                    if args.without_limits:
                        started.append(("mqpolicy no limits",
                                        start_milter("mqpolicy", transport, workdir, procs,
                                                     name="mqpolicy-nolimits",
                                                     policy=POLICY_WITHOUT_LIMITS)))
                    try:
                        floor, *ours = measure(
                            [Contender(name, address, milter.proc.pid)
                             for name, (milter, address) in started],
                            transport, clients, args.seconds, args.pairs)
                    finally:
                        for _, (milter, _) in started:
                            procs.stop(milter)
                    print_row(floor, None)
                    for result in ours:
                        print_row(result, floor)
            if args.stall:
                milter, address = start_milter("floor", "tcp", workdir, procs,
                                               floor_mode="addheader", name="floor-addheader")
                try:
                    (stalled,) = measure([Contender("floor+addheader", address, milter.proc.pid)],
                                         "tcp", 1, min(args.seconds, 2.0), 1)
                finally:
                    procs.stop(milter)
                print_row(stalled, None)
                print("  ^ a header-changing milter on libmilter's own TCP socket: each "
                      "message waits for the MTA's delayed ACK (Nagle)")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
