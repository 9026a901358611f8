"""``mqpolicy demo``: a private Postfix, an SMTP sink and mqpolicy, and a realistic mix.

Starts a :class:`~mqpolicy.lab.mail_stack.MailStack` (private Postfix configured from
``mqpolicy postfix-config``, an SMTP sink as the internet, ``mqpolicy serve``) with the
demo policy, sends password resets, a newsletter in batches, a flooding sender and some
ordinary mail, waits for what should be delivered, prints a short report per lane and
per limit, and stops everything (even on failure or Ctrl-C).
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from mqpolicy.lab.mail_stack import MailStack
from mqpolicy.lab.smtp_client import Submission
from mqpolicy.lab.smtp_sink import SinkMessage
from mqpolicy.policy.model import Policy

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"  # conf/demo.yaml
DEMO_HEADER = "X-Demo-Id"
NEWSLETTER_BATCHES = 6
BATCH_SIZE = 50
FLOOD = 40
RESETS = 20
DOMAINS = ("gmail.example", "yahoo.example", "outlook.example", "corp.example")


@dataclass
class Sent:
    """One message the demo sent, and what became of it."""

    group: str
    sender: str
    recipients: tuple[str, ...]
    demo_id: str
    submitted_at: float
    result: Submission


@dataclass
class DemoRun:
    sent: list[Sent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, stack: MailStack, group: str, sender: str, recipients: Iterable[str],
             subject: str) -> None:
        rcpts = tuple(recipients)
        demo_id = uuid.uuid4().hex[:12]
        started = time.time()
        result = stack.send(sender, rcpts, subject, headers={DEMO_HEADER: demo_id})
        with self.lock:
            self.sent.append(Sent(group, sender, rcpts, demo_id, started, result))


def _recipients(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:03d}@{DOMAINS[i % len(DOMAINS)]}" for i in range(count)]


def send_mix(stack: MailStack, run: DemoRun) -> None:
    """The mix: a newsletter (in batches, on its own thread) while password resets,
    a flooding account and colleagues send."""
    def newsletter() -> None:
        for batch in range(NEWSLETTER_BATCHES):
            run.send(stack, "newsletter", "weekly@news.example.com",
                     _recipients(f"reader{batch}-", BATCH_SIZE),
                     f"Weekly news, batch {batch + 1}")

    bulk = threading.Thread(target=newsletter, name="newsletter")
    bulk.start()
    try:
        for i in range(RESETS):
            run.send(stack, "password resets", "noreply@auth.example.com",
                     [f"user{i:02d}@{DOMAINS[i % len(DOMAINS)]}"], "Reset your password")
            if i % 4 == 0:
                run.send(stack, "colleagues", f"alice{i}@example.com",
                         [f"bob{i}@corp.example"], "Lunch?")
        for i in range(FLOOD):
            run.send(stack, "flooding sender", "mallory@example.com",
                     [f"victim{i:02d}@{DOMAINS[i % len(DOMAINS)]}"], "You won a prize")
    finally:
        bulk.join()


# ---------------------------------------------------------------- report


def _status(sent: Sent, held_ids: set[str]) -> str:
    result = sent.result
    if result.queued:
        return "held" if result.queue_id in held_ids else "accepted"
    replies = [reply for _, reply in result.rcpts] + ([result.data] if result.data else [])
    codes = {reply.code // 100 for reply in replies if not reply.ok}
    return "rejected" if codes == {5} else "deferred"


def _seconds(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f}s / {max(values):.2f}s"


def report(stack: MailStack, policy: Policy, run: DemoRun, delivered: list[SinkMessage],
           held_ids: set[str], out: TextIO) -> None:
    by_id = {m.header(DEMO_HEADER): m for m in delivered}
    groups: dict[str, Counter[str]] = defaultdict(Counter)
    samples: dict[str, str] = {}
    for sent in run.sent:
        status = _status(sent, held_ids)
        group = groups[sent.group]
        group["messages"] += 1
        group["recipients"] += len(sent.recipients)
        group[status] += 1
        if status in ("deferred", "rejected") and status not in samples:
            failed = [r for r in sent.result.replies() if not r.ok]
            samples[status] = str(failed[0]) if failed else status

    print("\nwhat was sent                 msgs  rcpts  accepted  deferred  held", file=out)
    for name, c in groups.items():
        print(f"  {name:<26} {c['messages']:>5} {c['recipients']:>6} {c['accepted']:>9} "
              f"{c['deferred'] + c['rejected']:>9} {c['held']:>5}", file=out)
    for status, text in samples.items():
        print(f"  a {status} client saw: {text}", file=out)

    lanes: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    rcpts: Counter[str] = Counter()
    sent_by_id = {s.demo_id: s for s in run.sent}
    examples: dict[str, str] = {}
    for message in delivered:
        demo = sent_by_id.get(message.header(DEMO_HEADER) or "")
        if demo is None:
            continue
        delivery = stack.delivery_of(message)
        lanes[delivery.transport][demo.group].append(message.received_at - demo.submitted_at)
        rcpts[delivery.transport] += len(message.rcpt_tos)
        examples.setdefault(delivery.transport, delivery.line.split(": ", 1)[0])
    lane_of: dict[str, str] = {}
    for lane in policy.lanes:
        lane_of.setdefault(lane.transport, lane.name)
    print("\nper lane        transport          msgs  rcpts  latency median / max  "
          "(transport from the Postfix log)", file=out)
    for lane in policy.lanes:
        per_group = lanes.get(lane.transport)
        if lane_of[lane.transport] != lane.name:
            continue
        if not per_group:
            print(f"  {lane.name:<13} {lane.transport:<16} {0:>6} {0:>6}", file=out)
            continue
        latencies = [x for values in per_group.values() for x in values]
        print(f"  {lane.name:<13} {lane.transport:<16} {len(latencies):>6} "
              f"{rcpts[lane.transport]:>6}  {_seconds(latencies):<21} "
              f"{', '.join(sorted(per_group))}", file=out)
        print(f"  {'':<13} log: {examples[lane.transport].rsplit(' ', 1)[-1]}: ... "
              "status=sent", file=out)

    time.sleep(0.2)  # the policy server writes its log lines every 50 ms
    hits = limit_hits(stack.server.log_file.read_text("utf-8", "replace").splitlines())
    print("\nper limit                action      messages  (from the policy server log)",
          file=out)
    if not hits:
        print("  (no limit was reached)", file=out)
    for (limit, action), count in sorted(hits.items()):
        print(f"  {limit:<22} {action:<8} {count:>12}", file=out)

    queue = stack.postfix.queue()
    held = [m for m in queue if m.queue_name == "hold"]
    others = [m for m in queue if m.queue_name != "hold"]
    print(f"\nhold queue (postqueue -j): {len(held)} message(s), "
          f"{sum(len(m.recipients) for m in held)} recipient(s): released later by "
          "priority and budget; nothing refused, nothing lost", file=out)
    if others:
        print(f"still queued elsewhere: {len(others)} message(s) "
              f"({', '.join(sorted({m.queue_name for m in others}))})", file=out)
    missing = sum(1 for s in run.sent if _status(s, held_ids) == "accepted"
                  and s.demo_id not in by_id)
    if missing:
        print(f"NOT delivered within the timeout: {missing} accepted message(s)", file=out)


def limit_hits(lines: Iterable[str]) -> Counter[tuple[str, str]]:
    """Messages (distinct ``instance``) each limit deferred, held or rejected, from the
    policy server's ``key=value`` decision lines."""
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    for line in lines:
        if "msg=decision" not in line or " by=" not in line:
            continue
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        by, action = fields.get("by", ""), fields.get("action", "")
        if by.startswith("lane:") or action == "accept":
            continue
        seen[(by, action)].add(fields.get("instance", line))
    return Counter({key: len(ids) for key, ids in seen.items()})
