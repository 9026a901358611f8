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

A message counts when the sink has received it (end to end: SMTP in, queue, SMTP out);
the next segment starts once the queue is empty again.
The accept rate (250 after DATA) is shown too. The policy server's decision log is
checked: every message must have met it at END-OF-MESSAGE. Every process started is
stopped by its PID, also on error or Ctrl-C.

    python bench/postfix_e2e_bench.py                        # 7 pairs x 1000 messages
    python bench/postfix_e2e_bench.py --pairs 11 --messages 2000 --json

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
import shutil
import signal
import smtplib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_processes import (  # noqa: E402
    cpu_seconds,
    run_queue_seconds,
    sigterm_as_interrupt,
)

from mqpolicy.lab.mail_stack import policy_with_listen  # noqa: E402
from mqpolicy.lab.policy_server_process import PolicyServerProcess  # noqa: E402
from mqpolicy.lab.postfix_instance import PostfixInstance  # noqa: E402
from mqpolicy.lab.readiness import free_port, poll  # noqa: E402
from mqpolicy.lab.smtp_client import make_message, submit_on  # noqa: E402
from mqpolicy.lab.smtp_sink import SmtpSink  # noqa: E402
from mqpolicy.policy.endpoints import Endpoint  # noqa: E402

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


# ---------------------------------------------------------------- the sink process


def _sink_process(port: Any, count: Any, ready: multiprocessing.synchronize.Event) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)

        def arrived(_: object) -> None:
            with count.get_lock():
                count.value += 1

        sink = SmtpSink(keep_data=False, on_message=arrived)
        port.value = await sink.start()
        ready.set()
        await stop.wait()
        await sink.close()

    asyncio.run(main())


@contextlib.contextmanager
def sink_process() -> Iterator[tuple[int, Any]]:
    ctx = multiprocessing.get_context("fork")
    port = ctx.Value("i", 0)
    count = ctx.Value("q", 0)
    ready = ctx.Event()
    proc = ctx.Process(target=_sink_process, args=(port, count, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(10):
            raise RuntimeError("the SMTP sink did not start")
        yield int(port.value), count
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
    policy_cpu_s: float
    policy_wait_s: float  # the policy server's time runnable but waiting for a CPU

    @property
    def delivered_per_s(self) -> float:
        return self.messages / self.deliver_s

    @property
    def accepted_per_s(self) -> float:
        return self.messages / self.accept_s


def drive(port: int, messages: int, per_connection: int, tag: str,
          sessions: int = SESSIONS) -> tuple[float, int]:
    """``sessions`` in parallel; returns (seconds until the last 250, refusals)."""
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
                        rcpt = f"user{n % 97}@dest{n % 7}.example"
                        message = make_message(sender, [rcpt], f"{tag} {index}-{n}", BODY)
                        if not submit_on(conn, sender, [rcpt], message).queued:
                            refused[index] += 1
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
    """One private Postfix, with or without mqpolicy in the path."""

    def __init__(self, mode: str, root: Path, sink_port: int, args: argparse.Namespace) -> None:
        self.args = args
        self.server: PolicyServerProcess | None = None
        self.mode = mode
        self.root = root
        root.mkdir()
        root.chmod(0o755)
        self.instance = PostfixInstance(root / "postfix", relayhost=f"[127.0.0.1]:{sink_port}")
        self.instance.root.mkdir()
        self.instance.root.chmod(0o755)

    def start(self) -> None:
        if self.mode == "mqpolicy":
            if self.args.policy_socket == "unix":
                # inside the queue directory, as the README recommends: postfix-config
                # names it relative to it (what a chrooted smtpd reaches)
                socket_dir = self.instance.queue_dir / "mqpolicy"
                socket_dir.mkdir(parents=True)
                endpoint = Endpoint(path=str(socket_dir / "policy.sock"))
            else:
                endpoint = Endpoint(host="127.0.0.1", port=free_port())
            policy_file = self.root / "policy.yaml"
            text = (Path(self.args.policy).read_text() if self.args.policy
                    else POLICY.format(log_level=self.args.policy_log_level))
            policy_file.write_text(policy_with_listen(text, str(endpoint), "0666"))
            self.instance.configure_from(policy_file, (sys.executable, "-m", "mqpolicy"))
            self.server = PolicyServerProcess(policy_file, endpoint, self.root / "mqpolicy.log",
                                              (*scheduling_prefix(self.args), sys.executable,
                                               "-m", "mqpolicy"))
            self.server.start()
        else:
            self.instance.write_config()
        self.instance.start()

    def policy_cpu(self) -> float:
        return cpu_seconds(self.server.pid) if self.server else 0.0

    def policy_wait(self) -> float:
        return run_queue_seconds(self.server.pid) if self.server else 0.0

    def decisions(self) -> int:
        """END-OF-MESSAGE decisions the policy server logged (one per message)."""
        if self.server is None:
            return 0
        return self.server.log_file.read_text("utf-8", "replace").count("stage=END-OF-MESSAGE")

    def stop(self) -> None:
        try:
            self.instance.stop()
        finally:
            if self.server is not None:
                self.server.stop()


def scheduling_prefix(args: argparse.Namespace) -> tuple[str, ...]:
    """The command that starts the policy server with the scheduling asked for."""
    if args.policy_scheduling == "rr":
        return ("chrt", "--rr", "1")
    return ("nice", "-n", str(args.policy_nice)) if args.policy_nice else ()


def scheduling_label(args: argparse.Namespace) -> str:
    if args.policy_scheduling == "rr":
        return "real-time round-robin 1"
    return f"time-sharing, nice {args.policy_nice}"


def segment(target: Target, pair: int, messages: int, args: argparse.Namespace,
            sink_count: Any, tag: str = "bench") -> Segment:
    """Send ``messages`` through ``target`` and wait until the sink has them all."""
    base = sink_count.value
    cpu_before = target.policy_cpu()
    wait_before = target.policy_wait()
    started = time.monotonic()
    accept_s, refused = drive(target.instance.smtp_port, messages, args.per_connection, tag,
                              args.sessions)
    poll(lambda: sink_count.value >= base + messages - refused, args.timeout,
         f"{messages} messages at the sink", interval_s=0.005)
    deliver_s = time.monotonic() - started
    policy_cpu_s = target.policy_cpu() - cpu_before
    policy_wait_s = target.policy_wait() - wait_before
    # Postfix finishes its deliveries (replies read, queue files removed) after the sink
    # has the mail: the next segment starts on an empty queue, not on that work
    poll(lambda: not target.instance.queue(), args.timeout, "an empty queue",
         interval_s=0.05)
    return Segment(target.mode, pair, messages, accept_s, deliver_s, refused, policy_cpu_s,
                   policy_wait_s)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=7,
                        help="segment pairs, alternating which target goes first "
                             "(default 7)")
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
    if os.geteuid() != 0:
        print("postfix_e2e_bench: needs root (a private Postfix's master runs as root)",
              file=sys.stderr)
        return 2

    segments: list[Segment] = []
    workdir = Path(tempfile.mkdtemp(prefix="mqbench-", dir="/tmp"))
    workdir.chmod(0o755)
    targets: list[Target] = []
    try:
        with sink_process() as (sink_port, sink_count):
            for mode in ("postfix", "mqpolicy"):
                target = Target(mode, workdir / mode, sink_port, args)
                targets.append(target)
                target.start()
            for target in targets:
                segment(target, 0, args.warmup, args, sink_count, "warmup")
            for pair in range(1, args.pairs + 1):
                order = targets if pair % 2 else targets[::-1]
                for target in order:
                    result = segment(target, pair, args.messages, args, sink_count)
                    segments.append(result)
                    if not args.json:
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
            time.sleep(0.2)  # the policy server writes its log lines every 50 ms
            decisions = targets[1].decisions()
            checked = args.policy is None and args.policy_log_level in ("debug", "info")
            if checked and decisions < sent:
                raise RuntimeError(f"the policy server logged {decisions} END-OF-MESSAGE "
                                   f"decisions for {sent} messages")
    finally:
        for target in targets:
            target.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

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
        summary["segments"] = [asdict(r) | {"delivered_per_s": r.delivered_per_s,
                                            "accepted_per_s": r.accepted_per_s}
                               for r in segments]
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
