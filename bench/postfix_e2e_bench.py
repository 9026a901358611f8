"""End-to-end throughput: messages/s through a private Postfix, with and without mqpolicy.

Same machine, same run. Two private Postfix instances (``mqpolicy.lab.postfix_instance``: own
config, queue and log, fresh loopback ports) relay everything to one SMTP sink
(``mqpolicy.lab.smtp_sink``, in its own process). They are driven in turn, in pairs of short
segments (which one goes first alternates), with 8 parallel SMTP sessions (threads,
``smtplib``; ``--sessions``), several messages per connection; the figure is the median
over pairs of the per-pair ratio, so load from other processes on the machine hits both
sides alike:

* ``postfix``: Postfix alone;
* ``mqpolicy``: the same Postfix plus the output of ``mqpolicy postfix-config`` for the
  bench policy: ``check_policy_service`` at RCPT and at END-OF-MESSAGE, answered by
  ``mqpolicy serve`` (memory store; classify rules and three limits with budgets large
  enough that every message passes, so both runs deliver the same mail the same way) on a
  unix socket inside Postfix's queue directory, the set-up the README recommends
  (``--policy-socket tcp``: on a loopback port), under the default time-sharing
  (``--policy-nice N``; ``--policy-scheduling rr``: real-time round-robin at priority 1,
  ``chrt --rr 1``, scheduled ahead of every Postfix process).

Eight sessions each wait for their message's two policy answers on two CPUs that Postfix,
the sessions and the sink keep busy: the policy server, woken by smtpd's request, can wait
its turn in the run queue before it runs. The summary shows that wait per message beside
the server's CPU time; ``--policy-scheduling rr`` takes it away, to see what it costs.

``--compare milter-floor`` measures the wiring the README recommends against a milter that
does nothing, on three private Postfix instances driven in turn, in rounds (``postfix``,
``floor``, ``mqpolicy+milter``; each round starts one side later than the one before, so
each side follows each other one as often):

* ``postfix``: Postfix alone;
* ``floor``: Postfix with a do-nothing pymilter milter (``bench/milter_floor.py``, on a
  unix socket in the queue directory, in ``smtpd_milters`` and ``non_smtpd_milters``,
  ``milter_default_action = tempfail``; ``--floor-mode header``: it adds one header per
  message, as mqpolicy adds its lane header);
* ``mqpolicy+milter``: Postfix with everything ``mqpolicy postfix-config --milter
  unix:SOCKET`` prints for the bench policy plus a ``milter:`` section (``rcpt_limits:
  policy_server``): both policy hooks and the milter, answered by one ``mqpolicy serve``
  on two unix sockets in the queue directory.

It reports each side's whole-run throughput (all its messages over all its time), the ratio
of ``mqpolicy+milter`` to ``floor`` against the 90 % target, the latency of each message
(from MAIL FROM to the 250 after DATA, and to its arrival at the sink) as percentiles, the
CPU time per message of each part (Postfix with the workers it has reaped; the main thread
of the process beside it, in ``mqpolicy serve`` the policy server's event loop; its other
threads, the milter's callbacks on libmilter's threads and the log writer; the SMTP client;
the sink), the machine's CPU use during each side's segments and the load average.
``--also`` adds sides to each round, to see where the wiring's cost goes: ``floor+header``
(the floor adding one header), ``mqpolicy`` (the policy hooks without the milter),
``milter-only`` (the milter deciding RCPT and the end, the policy hooks left out of
postfix-config's output), ``rcpt-hook+milter`` (the END-OF-MESSAGE hook left out).

A message counts when the sink has received it (end to end: SMTP in, queue, SMTP out);
the next segment starts once the queue is empty again.
The accept rate (250 after DATA) is shown too. The policy server's decision log is
checked: every message must have met it at END-OF-MESSAGE. Every process started is
stopped by its PID, also on error or Ctrl-C.

    python bench/postfix_e2e_bench.py                        # 7 pairs x 1000 messages
    python bench/postfix_e2e_bench.py --pairs 11 --messages 2000 --json
    python bench/postfix_e2e_bench.py --compare milter-floor --pairs 30   # 30 rounds of 3
    python bench/postfix_e2e_bench.py --compare milter-floor --also milter-only,rcpt-hook+milter

Needs root (Postfix's master runs as root). Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.synchronize
import os
import re
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_processes import (  # noqa: E402
    Processes,
    Started,
    cpu_seconds,
    main_thread_cpu_seconds,
    reaped_cpu_seconds,
    run_queue_seconds,
    sigterm_as_interrupt,
    wait_accepting,
)

from mqpolicy.lab.mail_stack import policy_with_listen  # noqa: E402
from mqpolicy.lab.policy_server_process import PolicyServerProcess  # noqa: E402
from mqpolicy.lab.postfix_instance import PostfixInstance  # noqa: E402
from mqpolicy.lab.readiness import accepts, free_port, log_tail, poll  # noqa: E402
from mqpolicy.lab.smtp_client import make_message, submit_on  # noqa: E402
from mqpolicy.lab.smtp_sink import SinkMessage, SmtpSink  # noqa: E402
from mqpolicy.policy.endpoints import Endpoint  # noqa: E402
from mqpolicy.postfix.settings import (  # noqa: E402
    HEADER_CHECKS_FILE,
    SECTION_HEADER_CHECKS,
    SECTION_MAIN,
    SECTION_MASTER,
    split_sections,
)

BENCH = Path(__file__).resolve().parent

SESSIONS = 8
BODY = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
        "incididunt ut labore et dolore magna aliqua.\r\n") * 12  # ~1.5 KB

POLICY = """\
# Written by bench/postfix_e2e_bench.py: classification and limits that every message
# passes (budgets far above the bench's volume), all mail in the default lane.
store:
  url: memory://
  timeout_ms: 50
log:
  format: kv
  level: {log_level}
lanes:
  - name: transactional
    transport: mq-transactional
  - name: normal
    transport: smtp
  - name: bulk
    transport: mq-bulk
default_lane: normal
classify:
  - name: password-resets
    when: {{sender: "@auth.example.com"}}
    lane: transactional
  - name: newsletters
    when:
      any:
        - sender: "@news.example.com"
        - recipient_count: {{min: 50}}
    lane: bulk
limits:
  - name: per-sender
    rate: 1000000/1h
    key: sender
    count: messages
  - name: per-client-network
    rate: 1000000/1h
    key: client_network/24
    count: recipients
  - name: per-recipient-domain
    rate: 1000000/1h
    key: recipient_domain
    count: recipients
"""

# The sides of each comparison, in the order of a round.
SIDES = {"policy": ("postfix", "mqpolicy"),
         "milter-floor": ("postfix", "floor", "mqpolicy+milter")}
FLOOR_MODES = ("plain", "header")
MILTER_SOCKET = "mqpolicy/milter.sock"  # inside the queue directory, as the README shows
MILTER_CONNECTION = re.compile(r"\bconn=m[0-9a-f]+\b")  # a decision line of the milter
# Sides --also adds to --compare milter-floor, to see where the wiring's cost goes.
EXTRA_SIDES = {
    "floor+header": "the do-nothing milter adding one header per message",
    "mqpolicy": "the policy server on both hooks, no milter",
    "milter-only": "mqpolicy serve's milter alone (rcpt_limits: milter), the policy hooks "
                   "left out of postfix-config's output",
    "rcpt-hook+milter": "the policy server at RCPT only and the milter, the END-OF-MESSAGE "
                        "hook left out of postfix-config's output",
}
# The policy hooks each milter side leaves out of postfix-config's output.
HOOKS_LEFT_OUT = {
    "mqpolicy+milter": (),
    "milter-only": ("smtpd_recipient_restrictions", "smtpd_end_of_data_restrictions"),
    "rcpt-hook+milter": ("smtpd_end_of_data_restrictions",),
}


def without_policy_hooks(main_cf: str, parameters: tuple[str, ...]) -> str:
    """main.cf text without its ``check_policy_service`` entries in ``parameters``."""
    kept, current = [], ""
    for line in main_cf.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            current = line.split("=", 1)[0].strip()
        if current in parameters and "check_policy_service" in line:
            line = line.split("check_policy_service", 1)[0].rstrip()
            if not line:
                continue
        kept.append(line)
    return "\n".join(kept) + "\n"


def with_milter(text: str, socket_path: Path, rcpt_limits: str | None = None) -> str:
    """The policy text with a ``milter:`` section on ``socket_path`` (``rcpt_limits``, else
    as the file says, else ``policy_server``: Postfix asks the policy server at RCPT)."""
    data = yaml.safe_load(text) or {}
    milter = dict(data.get("milter") or {})
    milter["listen"] = f"unix:{socket_path}"
    milter["listen_mode"] = "0666"  # smtpd and cleanup run as Postfix's mail_owner
    if rcpt_limits is not None:
        milter["rcpt_limits"] = rcpt_limits
    milter.setdefault("rcpt_limits", "policy_server")
    data["milter"] = milter
    return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------- the sink process


def sent_at(recipient: str) -> float | None:
    """The time a message was sent (``time.time()``), from its recipient's local part
    (``u<n>-<microseconds>@...``, written by :func:`drive`)."""
    local = recipient.partition("@")[0]
    _, dash, stamp = local.rpartition("-")
    return int(stamp) / 1e6 if dash and stamp.isdigit() else None


def _sink_process(port: Any, count: Any, delays: Any,
                  ready: multiprocessing.synchronize.Event) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)

        def arrived(message: SinkMessage) -> None:
            sent = sent_at(message.rcpt_tos[0]) if message.rcpt_tos else None
            with count.get_lock():
                if count.value < len(delays):  # n-th arrival: its delay from MAIL FROM
                    delays[count.value] = -1.0 if sent is None else message.received_at - sent
                count.value += 1

        sink = SmtpSink(keep_data=False, on_message=arrived)
        port.value = await sink.start()
        ready.set()
        await stop.wait()
        await sink.close()

    asyncio.run(main())


@contextlib.contextmanager
def sink_process(expected: int = 0) -> Iterator[tuple[int, Any, Any, int]]:
    """The sink in a process of its own: (port, arrivals, each arrival's delay in seconds
    since its MAIL FROM, for the first ``expected`` arrivals, its PID)."""
    ctx = multiprocessing.get_context("fork")
    port = ctx.Value("i", 0)
    count = ctx.Value("q", 0)
    delays = ctx.Array("d", max(1, expected), lock=False)  # written under count's lock
    ready = ctx.Event()
    proc = ctx.Process(target=_sink_process, args=(port, count, delays, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(10):
            raise RuntimeError("the SMTP sink did not start")
        yield int(port.value), count, delays, int(proc.pid or 0)
    finally:
        if proc.pid is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


# ---------------------------------------------------------------- load


@dataclass
class Segment:
    mode: str
    pair: int
    messages: int
    accept_s: float
    deliver_s: float
    refused: int
    policy_cpu_s: float  # the process(es) beside Postfix: policy server, milter
    policy_wait_s: float  # the policy server's time runnable but waiting for a CPU
    machine_busy: float = 0.0  # the machine's CPUs busy during the segment, 0..1
    load1: float = 0.0  # the 1-minute load average at the segment's start
    # CPU seconds of each part during the segment (see Target.cpu_parts)
    cpu: dict[str, float] = field(default_factory=dict)
    # per message: MAIL FROM to the 250 after DATA; MAIL FROM to the sink (seconds)
    accept_latencies: list[float] = field(default_factory=list, repr=False)
    deliver_latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def delivered_per_s(self) -> float:
        return self.messages / self.deliver_s

    @property
    def accepted_per_s(self) -> float:
        return self.messages / self.accept_s


def drive(port: int, messages: int, per_connection: int, tag: str,
          sessions: int = SESSIONS,
          latencies: list[float] | None = None) -> tuple[float, int]:
    """``sessions`` in parallel; returns (seconds until the last 250, refusals). Each
    recipient's local part carries the time its MAIL FROM was sent (:func:`sent_at`);
    ``latencies`` gets each message's seconds from MAIL FROM to the 250 after DATA."""
    per_session = [messages // sessions + (1 if i < messages % sessions else 0)
                   for i in range(sessions)]
    refused = [0] * sessions
    errors: list[BaseException] = []
    start_gate = threading.Barrier(sessions + 1)

    def session(index: int) -> None:
        sender = f"sender{index}@example.com"
        try:
            start_gate.wait()
            left = per_session[index]
            n = 0
            while left:
                with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.example",
                                  timeout=60) as conn:
                    for _ in range(min(per_connection, left)):
                        sent = time.time()
                        rcpt = f"u{n % 97}-{int(sent * 1e6)}@dest{n % 7}.example"
                        message = make_message(sender, [rcpt], f"{tag} {index}-{n}", BODY)
                        if not submit_on(conn, sender, [rcpt], message).queued:
                            refused[index] += 1
                        elif latencies is not None:
                            latencies.append(time.time() - sent)  # list.append: thread-safe
                        left -= 1
                        n += 1
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=session, args=(i,)) for i in range(sessions)]
    for thread in threads:
        thread.start()
    start_gate.wait()
    started = time.monotonic()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if errors:
        raise RuntimeError(f"an SMTP session failed: {errors[0]!r}")
    return elapsed, sum(refused)


class Target:
    """One private Postfix and what its side puts beside it: nothing (``postfix``), the
    policy server (``mqpolicy``), a do-nothing milter (``floor``), or the policy server
    and the milter in one ``mqpolicy serve`` (``mqpolicy+milter``)."""

    def __init__(self, mode: str, root: Path, sink_port: int, args: argparse.Namespace) -> None:
        self.args = args
        self.server: PolicyServerProcess | None = None
        self.milter: Started | None = None  # the floor milter
        self.mode = mode
        self.root = root
        root.mkdir()
        root.chmod(0o755)
        self.procs = Processes(root)
        self.instance = PostfixInstance(root / "postfix", relayhost=f"[127.0.0.1]:{sink_port}")
        self.instance.root.mkdir()
        self.instance.root.chmod(0o755)

    @property
    def with_milter(self) -> bool:
        """Whether ``mqpolicy serve`` runs the milter on this side."""
        return self.mode in HOOKS_LEFT_OUT

    def start(self) -> None:
        if self.mode == "mqpolicy" or self.with_milter:
            self._start_mqpolicy()
        elif self.mode in ("floor", "floor+header"):
            self._start_floor()
        else:
            self.instance.write_config()
        self.instance.start()

    def _policy_text(self) -> str:
        return (Path(self.args.policy).read_text() if self.args.policy
                else POLICY.format(log_level=self.args.policy_log_level))

    def _start_mqpolicy(self) -> None:
        socket_dir = self.instance.queue_dir / "mqpolicy"
        socket_dir.mkdir(parents=True)
        if self.args.policy_socket == "unix":
            # inside the queue directory, as the README recommends: postfix-config
            # names it relative to it (what a chrooted smtpd reaches)
            endpoint = Endpoint(path=str(socket_dir / "policy.sock"))
        else:
            endpoint = Endpoint(host="127.0.0.1", port=free_port())
        policy_file = self.root / "policy.yaml"
        text = self._policy_text()
        milter_socket = self.instance.queue_dir / MILTER_SOCKET
        if self.with_milter:
            text = with_milter(text, milter_socket,
                               "milter" if self.mode == "milter-only" else None)
        policy_file.write_text(policy_with_listen(text, str(endpoint), "0666"))
        command = (sys.executable, "-m", "mqpolicy")
        if self.with_milter:
            self._configure_with_milter(policy_file, command, f"unix:{milter_socket}")
        else:
            self.instance.configure_from(policy_file, command)
        self.server = PolicyServerProcess(policy_file, endpoint, self.root / "mqpolicy.log",
                                          (*scheduling_prefix(self.args), *command))
        self.server.start()
        if self.with_milter:
            server = self.server

            def milter_ready() -> bool:
                if not server.running:
                    raise RuntimeError(f"mqpolicy serve exited:\n{server.log_tail()}")
                return accepts(Endpoint(path=str(milter_socket)))

            poll(milter_ready, 60, f"the milter on {milter_socket}")

    def _configure_with_milter(self, policy_file: Path, command: tuple[str, ...],
                               milter: str) -> None:
        """Postfix's config from ``mqpolicy postfix-config --milter ADDRESS``, as the
        README's step 5 pastes it."""
        self.instance.write_config()
        proc = subprocess.run(
            [*command, "postfix-config", "-c", str(policy_file),
             "--config-directory", str(self.instance.config_dir),
             "--queue-directory", str(self.instance.queue_dir), "--milter", milter],
            capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"mqpolicy postfix-config failed:\n{proc.stderr}")
        sections = split_sections(proc.stdout)
        if "smtpd_milters" not in sections[SECTION_MAIN]:
            raise RuntimeError(f"postfix-config printed no milter:\n{proc.stdout}")
        left_out = HOOKS_LEFT_OUT[self.mode]
        if left_out:
            sections[SECTION_MAIN] = without_policy_hooks(sections[SECTION_MAIN], left_out)
        self.instance.write_config(sections[SECTION_MAIN], sections[SECTION_MASTER],
                                   {HEADER_CHECKS_FILE: sections[SECTION_HEADER_CHECKS]})

    def _start_floor(self) -> None:
        """The do-nothing milter on a unix socket in the queue directory, wired as
        postfix-config wires mqpolicy's (both milter lists, tempfail when it is down)."""
        socket_path = self.instance.queue_dir / "mqpolicy" / "floor.sock"
        socket_path.parent.mkdir(parents=True)
        self.milter = self.procs.start(
            "floor", [*scheduling_prefix(self.args), sys.executable,
                      str(BENCH / "milter_floor.py"), f"unix:{socket_path}",
                      "header" if self.mode == "floor+header" else self.args.floor_mode],
            cwd=BENCH.parent)
        wait_accepting(self.milter, str(socket_path), timeout=60)
        socket_path.chmod(0o666)  # smtpd and cleanup run as Postfix's mail_owner
        address = f"unix:{socket_path.relative_to(self.instance.queue_dir)}"
        self.instance.write_config(
            f"smtpd_milters = {address}\nnon_smtpd_milters = {address}\n"
            "milter_default_action = tempfail\n")

    @property
    def helper_pid(self) -> int | None:
        """The process beside Postfix (policy server, milter), if any."""
        if self.server is not None:
            return self.server.pid
        return self.milter.proc.pid if self.milter is not None else None

    def policy_cpu(self) -> float:
        pid = self.helper_pid
        return cpu_seconds(pid) if pid is not None else 0.0

    def cpu_parts(self, sink_pid: int | None) -> dict[str, float]:
        """CPU seconds so far: Postfix (the master, its workers and the workers it has
        reaped), the process beside it (its main thread: the policy server's loop; its
        other threads: the milter's callbacks and the log writer), the SMTP client (this
        process) and the sink."""
        parts = {"postfix": 0.0, "beside main thread": 0.0, "beside other threads": 0.0,
                 "client": time.process_time(),
                 "sink": cpu_seconds(sink_pid) if sink_pid else 0.0}
        master = self.instance.master_pid
        if master is not None:
            parts["postfix"] = cpu_seconds(master) + reaped_cpu_seconds(master)
        pid = self.helper_pid
        if pid is not None:
            main = main_thread_cpu_seconds(pid)
            parts["beside main thread"] = main
            parts["beside other threads"] = cpu_seconds(pid) - main
        return parts

    def policy_wait(self) -> float:
        pid = self.helper_pid
        return run_queue_seconds(pid) if pid is not None else 0.0

    def decisions(self) -> tuple[int, int]:
        """END-OF-MESSAGE decisions logged (one per message) by the policy server and by
        the milter (whose connections are ``conn=m<n>``)."""
        if self.server is None:
            return 0, 0
        lines = [line for line in
                 self.server.log_file.read_text("utf-8", "replace").splitlines()
                 if "stage=END-OF-MESSAGE" in line]
        milter = sum(1 for line in lines if MILTER_CONNECTION.search(line))
        return len(lines) - milter, milter

    def log_tail(self) -> str:
        if self.server is not None:
            return self.server.log_tail()
        return log_tail(self.milter.log, 20) if self.milter is not None else ""

    def stop(self) -> None:
        try:
            self.instance.stop()
        finally:
            try:
                if self.server is not None:
                    self.server.stop()
            finally:
                self.procs.stop_all()


def scheduling_prefix(args: argparse.Namespace) -> tuple[str, ...]:
    """The command that starts the policy server with the scheduling asked for."""
    if args.policy_scheduling == "rr":
        return ("chrt", "--rr", "1")
    return ("nice", "-n", str(args.policy_nice)) if args.policy_nice else ()


def scheduling_label(args: argparse.Namespace) -> str:
    if args.policy_scheduling == "rr":
        return "real-time round-robin 1"
    return f"time-sharing, nice {args.policy_nice}"


def machine_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # guest time is counted in user already
    return total - idle, total


def segment(target: Target, pair: int, messages: int, args: argparse.Namespace,
            sink_count: Any, tag: str = "bench", sink_delays: Any = None,
            sink_pid: int | None = None) -> Segment:
    """Send ``messages`` through ``target`` and wait until the sink has them all."""
    base = sink_count.value
    parts_before = target.cpu_parts(sink_pid)
    cpu_before = target.policy_cpu()
    wait_before = target.policy_wait()
    load1 = os.getloadavg()[0]
    busy_before, total_before = machine_cpu()
    accept_latencies: list[float] = []
    started = time.monotonic()
    accept_s, refused = drive(target.instance.smtp_port, messages, args.per_connection, tag,
                              args.sessions, accept_latencies)
    poll(lambda: sink_count.value >= base + messages - refused, args.timeout,
         f"{messages} messages at the sink", interval_s=0.005)
    deliver_s = time.monotonic() - started
    policy_cpu_s = target.policy_cpu() - cpu_before
    policy_wait_s = target.policy_wait() - wait_before
    busy_after, total_after = machine_cpu()
    parts = {k: v - parts_before[k] for k, v in target.cpu_parts(sink_pid).items()}
    machine_busy = (busy_after - busy_before) / max(1, total_after - total_before)
    arrived = base + messages - refused
    deliver_latencies = ([d for d in sink_delays[base:min(arrived, len(sink_delays))]
                          if d >= 0] if sink_delays is not None else [])
    # Postfix finishes its deliveries (replies read, queue files removed) after the sink
    # has the mail: the next segment starts on an empty queue, not on that work
    poll(lambda: not target.instance.queue(), args.timeout, "an empty queue",
         interval_s=0.05)
    return Segment(target.mode, pair, messages, accept_s, deliver_s, refused, policy_cpu_s,
                   policy_wait_s, machine_busy, load1, parts, accept_latencies,
                   deliver_latencies)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", choices=tuple(SIDES), default="policy",
                        help="policy (default): Postfix alone against Postfix with the policy "
                             "server; milter-floor: Postfix alone, with a do-nothing milter, "
                             "and with the policy server and the milter")
    parser.add_argument("--pairs", type=int, default=7,
                        help="segment pairs, alternating which target goes first "
                             "(default 7); with --compare milter-floor, rounds of three "
                             "segments")
    parser.add_argument("--also", default="", metavar="SIDE,...",
                        help="with --compare milter-floor, more sides in each round: "
                             + "; ".join(f"{k}: {v}" for k, v in EXTRA_SIDES.items()))
    parser.add_argument("--floor-mode", choices=FLOOR_MODES, default="plain",
                        help="with --compare milter-floor: the floor milter does nothing "
                             "(plain, default) or adds one header per message (header)")
    parser.add_argument("--messages", type=int, default=1000,
                        help="messages per segment (default 1000)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=SESSIONS,
                        help=f"parallel SMTP sessions (default {SESSIONS})")
    parser.add_argument("--per-connection", type=int, default=20,
                        help="messages per SMTP connection (default 20)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--policy-socket", choices=("unix", "tcp"), default="unix",
                        help="how Postfix reaches the policy server: a unix socket in its "
                             "queue directory (default, as recommended) or loopback TCP")
    parser.add_argument("--policy-log-level", choices=("debug", "info", "warning"),
                        default="info", help="the policy server's log.level (default info: "
                        "one line per message; with --policy FILE, the file's own)")
    parser.add_argument("--policy", metavar="FILE",
                        help="bench this policy file instead of the built-in one (its listen "
                             "is replaced; its mail must not be deferred or held)")
    parser.add_argument("--policy-scheduling", choices=("other", "rr"), default="other",
                        help="how the policy server is scheduled: other (default) the default "
                             "time-sharing; rr: real-time round-robin at priority 1, ahead of "
                             "every Postfix process")
    parser.add_argument("--policy-nice", type=int, default=0, metavar="N",
                        help="with --policy-scheduling other: run the policy server with "
                             "nice -n N")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    args = parser.parse_args(argv)
    if args.policy_nice and args.policy_scheduling != "other":
        parser.error("--policy-nice applies to --policy-scheduling other (a real-time "
                     "policy has no nice value)")
    args.also = tuple(x for x in args.also.split(",") if x)
    unknown = [x for x in args.also if x not in EXTRA_SIDES]
    if unknown or (args.also and args.compare == "policy"):
        parser.error(f"--also takes sides of --compare milter-floor: {', '.join(EXTRA_SIDES)}")
    if min(args.pairs, args.messages, args.sessions, args.per_connection) < 1:
        parser.error("--pairs, --messages, --sessions and --per-connection are at least 1")
    return args


def round_order(targets: list[Target], n: int, compare: str) -> list[Target]:
    """The order of round ``n`` (from 1): pairs alternate which side goes first; rounds of
    more sides start one side later each time (ABC, BCA, CAB...)."""
    if compare == "policy":
        return targets if n % 2 else targets[::-1]
    shift = (n - 1) % len(targets)
    return targets[shift:] + targets[:shift]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


PERCENTILES = (0.5, 0.9, 0.99)


def print_round_segment(r: Segment) -> None:
    beside = (f", beside Postfix {1000 * r.policy_cpu_s / r.messages:.2f} ms CPU/msg"
              if r.mode != "postfix" else "")
    print(f"round {r.pair:>2} {r.mode:<16} {r.delivered_per_s:7.1f} msg/s delivered, "
          f"{r.accepted_per_s:7.1f} accepted, p50 accept "
          f"{1000 * percentile(r.accept_latencies, 0.5):6.1f} ms{beside}; CPUs "
          f"{100 * r.machine_busy:3.0f}% busy, load {r.load1:.1f}", flush=True)


def segment_json(r: Segment) -> dict[str, Any]:
    """A segment for ``--json``: its figures, not each message's latency."""
    return ({k: v for k, v in asdict(r).items() if not k.endswith("_latencies")}
            | {"delivered_per_s": r.delivered_per_s, "accepted_per_s": r.accepted_per_s})


def side_summary(mine: list[Segment]) -> dict[str, Any]:
    """One side over the whole run: all its messages over all its time, its latencies."""
    messages = sum(r.messages for r in mine)
    accepts = [x for r in mine for x in r.accept_latencies]
    delivers = [x for r in mine for x in r.deliver_latencies]
    return {
        "messages": messages,
        "seconds": sum(r.deliver_s for r in mine),
        "delivered_per_s": messages / sum(r.deliver_s for r in mine),
        "accepted_per_s": messages / sum(r.accept_s for r in mine),
        "delivered_per_s_median": statistics.median(r.delivered_per_s for r in mine),
        "accept_ms": {f"p{round(100 * q)}": 1000 * percentile(accepts, q)
                      for q in PERCENTILES},
        "deliver_ms": {f"p{round(100 * q)}": 1000 * percentile(delivers, q)
                       for q in PERCENTILES},
        "beside_cpu_ms_per_message": 1000 * sum(r.policy_cpu_s for r in mine) / messages,
        "beside_cpu_wait_ms_per_message": 1000 * sum(r.policy_wait_s for r in mine) / messages,
        "machine_busy": statistics.fmean(r.machine_busy for r in mine),
        "cpu_ms_per_message": {part: 1000 * sum(r.cpu.get(part, 0.0) for r in mine) / messages
                               for part in mine[0].cpu},
        "refused": sum(r.refused for r in mine),
    }


def summarise_rounds(args: argparse.Namespace, segments: list[Segment],
                     sides: tuple[str, ...], loadavg_before: tuple[float, ...]) -> int:
    """The summary of ``--compare milter-floor``: each side's whole-run throughput and
    latencies, and the wiring's share of the floor's throughput (the target: 90 %)."""
    base, floor, ours = sides[:3]
    summary: dict[str, Any] = {
        "compare": args.compare, "sessions": args.sessions,
        "messages_per_segment": args.messages, "rounds": args.pairs, "cpus": os.cpu_count(),
        "policy_socket": args.policy_socket, "policy": args.policy or "built-in",
        "policy_log_level": args.policy_log_level if args.policy is None else "as in the file",
        "floor_mode": args.floor_mode, "policy_scheduling": args.policy_scheduling,
        "policy_nice": args.policy_nice,
        "loadavg_before": loadavg_before, "loadavg_after": os.getloadavg(),
        "load1_during": [min(r.load1 for r in segments), max(r.load1 for r in segments)],
    }
    for mode in sides:
        summary[mode] = side_summary([r for r in segments if r.mode == mode])
    rate = {mode: summary[mode]["delivered_per_s"] for mode in sides}
    per_round = []
    for n in range(1, args.pairs + 1):
        by_mode = {r.mode: r for r in segments if r.pair == n}
        per_round.append(by_mode[ours].delivered_per_s / by_mode[floor].delivered_per_s)
    summary["ratio_overall"] = rate[ours] / rate[floor]  # the figure the target is about
    summary["ratio_floor_to_postfix"] = rate[floor] / rate[base]
    summary["ratio_ours_to_postfix"] = rate[ours] / rate[base]
    summary["ratio_per_round"] = per_round
    summary["ratio_median_of_rounds"] = statistics.median(per_round)
    summary["target_met"] = summary["ratio_overall"] >= 0.9
    summary["ratio_to_floor"] = {mode: rate[mode] / rate[floor] for mode in sides}
    if args.json:
        summary["segments"] = [segment_json(r) for r in segments]
        print(json.dumps(summary, indent=2))
        return 0
    print(f"\n{args.pairs} rounds of {args.messages}-message segments per side, "
          f"{args.sessions} parallel SMTP sessions, {os.cpu_count()} CPUs, "
          f"{summary['policy']} policy (log level {summary['policy_log_level']}), floor "
          f"milter {args.floor_mode}, {scheduling_label(args)}; whole run per side:")
    print(f"  {'side':<16} {'msg/s':>7} {'accept p50/p90/p99 ms':>22} "
          f"{'to sink p50/p90/p99 ms':>23} {'beside CPU ms/msg':>17} {'CPUs busy':>9}")
    for mode in sides:
        s = summary[mode]
        acc = "/".join(f"{v:.1f}" for v in s["accept_ms"].values())
        dlv = "/".join(f"{v:.1f}" for v in s["deliver_ms"].values())
        cpu = f"{s['beside_cpu_ms_per_message']:.2f}" if mode != base else "-"
        print(f"  {mode:<16} {s['delivered_per_s']:7.1f} {acc:>22} {dlv:>23} {cpu:>17} "
              f"{100 * s['machine_busy']:8.0f}%")
    parts = list(summary[base]["cpu_ms_per_message"])
    print("  CPU per message (ms), whole run: " + ", ".join(parts) + ", total:")
    for mode in sides:
        cpu = summary[mode]["cpu_ms_per_message"]
        print(f"  {mode:<16} " + " ".join(f"{cpu[part]:6.2f}" for part in parts)
              + f"  = {sum(cpu.values()):.2f}")
    print(f"  {ours} / {floor}, per round: "
          f"{' '.join(f'{100 * r:.0f}%' for r in per_round)}")
    print(f"  whole run: {ours} keeps {100 * summary['ratio_overall']:.1f}% of the "
          f"throughput of Postfix with the do-nothing milter (median of rounds "
          f"{100 * summary['ratio_median_of_rounds']:.1f}%); target 90%: "
          f"{'met' if summary['target_met'] else 'NOT met'}")
    print(f"  the floor keeps {100 * summary['ratio_floor_to_postfix']:.1f}% of Postfix "
          f"alone, {ours} {100 * summary['ratio_ours_to_postfix']:.1f}%")
    for mode in sides[3:]:
        print(f"  {mode} keeps {100 * rate[mode] / rate[floor]:.1f}% of the floor's "
              f"throughput, {100 * rate[mode] / rate[base]:.1f}% of Postfix alone")
    before = " ".join(f"{x:.2f}" for x in loadavg_before)
    after = " ".join(f"{x:.2f}" for x in summary["loadavg_after"])
    low, high = summary["load1_during"]
    print(f"  load average before {before}, after {after}; 1-minute load at segment "
          f"starts {low:.2f}-{high:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("postfix_e2e_bench: needs root (a private Postfix's master runs as root)",
              file=sys.stderr)
        return 2

    segments: list[Segment] = []
    workdir = Path(tempfile.mkdtemp(prefix="mqbench-", dir="/tmp"))
    workdir.chmod(0o755)
    targets: list[Target] = []
    sides = SIDES[args.compare] + args.also
    loadavg_before = os.getloadavg()
    expected = (args.warmup + args.pairs * args.messages) * len(sides)
    try:
        with sink_process(expected) as (sink_port, sink_count, sink_delays, sink_pid):
            for mode in sides:
                target = Target(mode, workdir / mode.replace("+", "-"), sink_port, args)
                targets.append(target)
                target.start()
            for target in targets:
                segment(target, 0, args.warmup, args, sink_count, "warmup")
            for pair in range(1, args.pairs + 1):
                for target in round_order(targets, pair, args.compare):
                    result = segment(target, pair, args.messages, args, sink_count,
                                     sink_delays=sink_delays, sink_pid=sink_pid)
                    segments.append(result)
                    if not args.json and args.compare != "policy":
                        print_round_segment(result)
                    elif not args.json:
                        cpu = ""
                        if target.mode == "mqpolicy":
                            cpu = (f", policy server CPU "
                                   f"{1000 * result.policy_cpu_s / result.messages:.2f} ms/msg,"
                                   f" waited for a CPU "
                                   f"{1000 * result.policy_wait_s / result.messages:.2f} ms/msg")
                        print(f"pair {pair} {target.mode:<9} {result.delivered_per_s:7.1f} "
                              f"msg/s delivered, {result.accepted_per_s:7.1f} msg/s accepted"
                              f"{cpu}", flush=True)
            sent = args.warmup + args.pairs * args.messages
            checked = args.policy is None and args.policy_log_level in ("debug", "info")
            time.sleep(0.2)  # the server writes its log lines every 50 ms
            for target in targets:
                policy_server, milter = target.decisions()
                hooks = target.mode in ("mqpolicy", "mqpolicy+milter")
                if hooks and checked and policy_server < sent:
                    raise RuntimeError(f"the policy server of {target.mode} logged "
                                       f"{policy_server} END-OF-MESSAGE decisions for {sent} "
                                       "messages")
                if target.with_milter and checked and milter < sent:
                    raise RuntimeError(f"the milter logged {milter} END-OF-MESSAGE "
                                       f"decisions for {sent} messages")
    finally:
        for target in targets:
            target.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.compare != "policy":
        return summarise_rounds(args, segments, sides, loadavg_before)

    summary: dict[str, Any] = {"sessions": args.sessions,
                               "messages_per_segment": args.messages,
                               "pairs": args.pairs, "cpus": os.cpu_count(),
                               "policy_socket": args.policy_socket,
                               "policy": args.policy or "built-in",
                               "policy_log_level": (args.policy_log_level if args.policy is None
                                                    else "as in the file"),
                               "policy_scheduling": args.policy_scheduling,
                               "policy_nice": args.policy_nice,
                               "loadavg_after": os.getloadavg()}
    for mode in ("postfix", "mqpolicy"):
        mine = [r for r in segments if r.mode == mode]
        summary[mode] = {
            "delivered_per_s_median": statistics.median(r.delivered_per_s for r in mine),
            "accepted_per_s_median": statistics.median(r.accepted_per_s for r in mine),
        }
    ratios = []
    for pair in range(1, args.pairs + 1):
        by_mode = {r.mode: r for r in segments if r.pair == pair}
        ratios.append(by_mode["mqpolicy"].delivered_per_s / by_mode["postfix"].delivered_per_s)
    ratio = statistics.median(ratios)
    # the same ratio read other ways, and split by which side went first in a pair (odd
    # pairs: Postfix alone first): the order's effect shows as a gap between the two
    summed = {mode: sum(r.delivered_per_s for r in segments if r.mode == mode)
              for mode in ("postfix", "mqpolicy")}
    summary["ratio_mean"] = statistics.fmean(ratios)
    summary["ratio_of_summed_rates"] = summed["mqpolicy"] / summed["postfix"]
    # the whole run's throughput: all messages each side delivered over all its time
    overall = {mode: sum(r.messages for r in segments if r.mode == mode)
               / sum(r.deliver_s for r in segments if r.mode == mode)
               for mode in ("postfix", "mqpolicy")}
    summary["overall_delivered_per_s"] = overall
    summary["ratio_overall"] = overall["mqpolicy"] / overall["postfix"]
    summary["ratio_median_postfix_first"] = statistics.median(ratios[0::2])
    summary["ratio_median_mqpolicy_first"] = (statistics.median(ratios[1::2])
                                              if len(ratios) > 1 else None)
    cpu_ms = statistics.median(1000 * r.policy_cpu_s / r.messages
                               for r in segments if r.mode == "mqpolicy")
    wait_ms = statistics.median(1000 * r.policy_wait_s / r.messages
                                for r in segments if r.mode == "mqpolicy")
    summary["ratio_per_pair"] = ratios
    summary["ratio_median"] = ratio
    summary["policy_server_cpu_ms_per_message"] = cpu_ms
    summary["policy_server_cpu_wait_ms_per_message"] = wait_ms
    summary["target_met"] = ratio >= 0.9
    if args.json:
        summary["segments"] = [segment_json(r) for r in segments]
        print(json.dumps(summary, indent=2))
    else:
        print(f"\n{args.pairs} pairs of {args.messages}-message segments, {args.sessions} parallel "
              f"SMTP sessions, {os.cpu_count()} CPUs, policy server on {args.policy_socket} "
              f"with {summary['policy']} policy, log level {summary['policy_log_level']}, "
              f"{scheduling_label(args)} "
              f"(medians):")
        for mode in ("postfix", "mqpolicy"):
            s = summary[mode]
            print(f"  {mode:<9} {s['delivered_per_s_median']:7.1f} msg/s delivered  "
                  f"{s['accepted_per_s_median']:7.1f} msg/s accepted")
        print(f"  policy server CPU: {cpu_ms:.2f} ms per message (RCPT + END-OF-MESSAGE);"
              f" runnable but waiting for a CPU: {wait_ms:.2f} ms per message")
        print(f"  with mqpolicy / without, per pair: "
              f"{' '.join(f'{100 * r:.0f}%' for r in ratios)}")
        print(f"  median: mqpolicy keeps {100 * ratio:.1f}% of Postfix's throughput; "
              f"target 90%: {'met' if ratio >= 0.9 else 'NOT met'}")
        mq_first = summary["ratio_median_mqpolicy_first"]
        print(f"  mean of pairs {100 * summary['ratio_mean']:.1f}%, summed rates "
              f"{100 * summary['ratio_of_summed_rates']:.1f}%; median where Postfix alone "
              f"went first {100 * summary['ratio_median_postfix_first']:.1f}%, where "
              f"mqpolicy did {'-' if mq_first is None else f'{100 * mq_first:.1f}%'}")
        print(f"  over the whole run: {overall['postfix']:.1f} msg/s without, "
              f"{overall['mqpolicy']:.1f} with: {100 * summary['ratio_overall']:.1f}%")
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"  load average at the end: {load} (other work on the machine skews both "
              "sides, the policy server more: it is on every message's path)")
    return 0


if __name__ == "__main__":
    try:
        with sigterm_as_interrupt():  # `timeout`, `kill PID`: unwind, stop every process
            sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
