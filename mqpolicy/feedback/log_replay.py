"""Replay a Postfix log through a policy: what it would have decided over that mail.

:class:`MailLog` rebuilds messages from log lines (read by
:func:`~mqpolicy.feedback.delivery_log.read_log_line`): smtpd's client and
``sasl_username``, qmgr's sender, size and recipient count, each recipient from its
delivery results (``orig_to`` when Postfix logged one: what the client sent), and the
RCPT attempts smtpd refused (``NOQUEUE: reject: RCPT ...``), each one attempt of one
recipient. A refused attempt that is retried (the same sender and recipient logged again
within ``maximal_queue_lifetime``) is one mail: the retries are merged into the first.

:func:`replay` feeds, in log time, the decisions Postfix would have asked for (one RCPT
per recipient, then END-OF-MESSAGE with the recipients accepted) to the real engine,
through the decision service's steps, on a private memory store whose clock is the
simulation's. Mail deferred by the
policy is tried again as a Postfix client does: after ``clamp(age, minimal_backoff_time,
maximal_backoff_time)``, until accepted, refused, held, or older than
``maximal_queue_lifetime`` (then it counts as expired). No real waiting. Before a
retry, the buckets of the limits the last try planned are looked at (nothing spent): when
each deferred part would be deferred again (the worst limit without room defers, as the
engine weighs them), the try is not made, only counted; the tries a mail waits through
cost one look each instead of a decision.

What a log does not carry is not replayed: headers (rules and limits that read them
skip as at the policy server), the size a client announced (the queued size is used),
DNS (destinations match by domain), the live backoff factors and pauses.

Beside the decisions: the lane that delivered each recipient, read from its transport in
the log (:attr:`ReplayReport.logged_lanes`), and what feedback would have done to the
configured destinations from the log's delivery results (:func:`feedback_replay`).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from mqpolicy.decision.engine import (
    NO_LIMITS_EVALUATION,
    NO_RUNTIME,
    Action,
    Verdict,
    decide,
    make_plan,
    store_key,
)
from mqpolicy.decision.engine import ledger_key as make_ledger_key
from mqpolicy.decision.mx_resolver import DestinationFinder
from mqpolicy.feedback.decision_log import (
    REFUSED_CODES,
    DecisionMessages,
    NotADecision,
    is_decision_line,
    read_decision_line,
)
from mqpolicy.feedback.delivery_log import (
    OTHER,
    UNPARSABLE,
    DeliveryEvent,
    MessageLine,
    compile_patterns,
    read_log_line,
    slow_down_reason,
)
from mqpolicy.policy.backoff import BackoffState, on_slow_down, on_success
from mqpolicy.policy.model import FeedbackSettings, Limit, Policy
from mqpolicy.policy.request import STAGE_END_OF_MESSAGE, STAGE_RCPT, Request, domain_of
from mqpolicy.store.budget import BudgetCheck, Evaluation, StoreError
from mqpolicy.store.memory import MemoryStore

_new = tuple.__new__  # positional NamedTuples without their keyword __new__ (2x cheaper)

# Postfix's defaults (postconf -d)
MINIMAL_BACKOFF_S = 300
MAXIMAL_BACKOFF_S = 4000
MAXIMAL_QUEUE_LIFETIME_S = 5 * 86400

OUTCOMES = ("accepted", "held", "rejected", "expired")
COLUMNS = (*OUTCOMES, "deferred", "demoted")
"""What a lane's tally counts: every recipient ends in one of OUTCOMES; "deferred" counts
those deferred at least once (however they ended), "demoted" those let in a lower lane."""
SAMPLES_KEPT = 5
BUSIEST_SHOWN = 10


@dataclass(frozen=True)
class RetrySchedule:
    """A Postfix client's retry schedule, in seconds (``postconf`` names)."""

    minimal_backoff_time: int = MINIMAL_BACKOFF_S
    maximal_backoff_time: int = MAXIMAL_BACKOFF_S
    maximal_queue_lifetime: int = MAXIMAL_QUEUE_LIFETIME_S

    def next_try_ms(self, first_ms: int, now_ms: int) -> int | None:
        """When a mail first tried at ``first_ms`` and deferred at ``now_ms`` is tried
        again; None when it is too old to be tried again (it expires)."""
        if now_ms - first_ms >= self.maximal_queue_lifetime * 1000:
            return None
        age = now_ms - first_ms
        backoff = min(max(age, self.minimal_backoff_time * 1000),
                      self.maximal_backoff_time * 1000)
        return now_ms + backoff


@dataclass
class Mail:
    """One message as the log shows it arriving."""

    arrival_ms: int
    queue_id: str = ""
    client_name: str = ""
    client_address: str = ""
    sasl_username: str = ""
    sender: str = ""
    size: int = 0
    nrcpt: int = 0
    # recipient -> what the log says happened to it (sent, deferred, bounced, refused, ...)
    recipients: dict[str, str] = field(default_factory=dict)
    refused_code: int = 0  # a NOQUEUE refusal: its SMTP code
    held: bool = False
    order: int = 0  # its first line's number: log order among mail of the same second
    # recipient -> the transport its delivery line names (postfix/mq-bulk/smtp: mq-bulk)
    transports: dict[str, str] = field(default_factory=dict)
    intake: bool = False  # smtpd's client= line seen (else: local submission, or cut off)
    queued: bool = False  # qmgr's from= line seen (else the sender and size are unknown)
    # from mqpolicy's decision log: what Postfix's log does not carry
    helo_name: str = ""
    protocol_name: str = ""
    reverse_client_name: str = ""
    headers: tuple[tuple[str, str], ...] | None = None  # None: not known (the milter's)
    logged_lane: str = ""  # the lane the live policy chose


@dataclass
class InputSummary:
    lines: int = 0
    other: int = 0
    unparsable: int = 0
    unparsable_samples: list[str] = field(default_factory=list)
    no_time: int = 0  # lines without a usable timestamp
    retries_merged: int = 0
    no_intake: int = 0  # queued mail without smtpd's client= line: replayed as from no client
    no_sender: int = 0  # queued mail without qmgr's from= line: replayed with sender <>
    decision_lines: int = 0  # mqpolicy's decision lines (then the mail replayed is theirs)
    unreadable_decisions: int = 0  # lines that say they are decisions, but cannot be read
    no_rcpt_decisions: int = 0  # messages with an end-of-message decision and no RCPT one
    mail_log_messages_ignored: int = 0  # Postfix's messages, when decision lines give them
    first: datetime | None = None
    last: datetime | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "lines": self.lines, "other": self.other, "unparsable": self.unparsable,
            "unparsable_samples": list(self.unparsable_samples), "no_time": self.no_time,
            "retries_merged": self.retries_merged, "no_intake": self.no_intake,
            "no_sender": self.no_sender, "decision_lines": self.decision_lines,
            "unreadable_decisions": self.unreadable_decisions,
            "no_rcpt_decisions": self.no_rcpt_decisions,
            "mail_log_messages_ignored": self.mail_log_messages_ignored,
            "first": self.first.isoformat() if self.first else None,
            "last": self.last.isoformat() if self.last else None,
        }


class MailLog:
    """Messages rebuilt from log lines fed in any order (several files, interleaved
    hosts); :meth:`mails` gives them in arrival order. Never raises on a line."""

    def __init__(self, reference: datetime | None = None) -> None:
        self.reference = reference
        self.summary = InputSummary()
        self._mails: dict[tuple[str, str], Mail] = {}
        self._attempts: list[Mail] = []  # NOQUEUE refusals: one attempt each
        #: delivery results for feedback: (ms, domain, event; None for a success)
        self.results: list[tuple[int, str, DeliveryEvent | None]] = []
        self._decisions = DecisionMessages()  # mqpolicy's own decision lines
        # a queue id's last message removed (qmgr): when; the earlier messages of reused ids
        self._removed: dict[tuple[str, str], int] = {}
        self._reused: list[Mail] = []
        self._last_time: datetime | None = None  # the last line's time, and in ms
        self._last_ms = 0

    def feed(self, line: str, reference: datetime | None = None) -> None:
        summary = self.summary
        summary.lines += 1
        read = read_log_line(line, reference=reference or self.reference)
        if read is UNPARSABLE or read is OTHER or isinstance(read, str):
            if is_decision_line(line):
                self._decision(line, reference or self.reference)
            elif read == UNPARSABLE:
                summary.unparsable += 1
                if len(summary.unparsable_samples) < SAMPLES_KEPT:
                    summary.unparsable_samples.append(_printable(str(line)[:200]))
            else:
                summary.other += 1
            return
        if read.timestamp is None:
            summary.no_time += 1
            return
        ts = read.timestamp
        if ts is self._last_time:  # a line of the same second: the same (cached) datetime
            ms = self._last_ms
        else:
            if summary.first is None or ts < summary.first:
                summary.first = ts
            if summary.last is None or ts > summary.last:
                summary.last = ts
            ms = self._last_ms = int(ts.timestamp() * 1000)
            self._last_time = ts
        if isinstance(read, DeliveryEvent):
            self._delivery(read, ms)
        else:
            self._message_line(read, ms)

    def _decision(self, line: str, reference: datetime | None) -> None:
        summary = self.summary
        try:
            decision = read_decision_line(line, reference)
        except NotADecision:
            summary.unreadable_decisions += 1
            if len(summary.unparsable_samples) < SAMPLES_KEPT:
                summary.unparsable_samples.append(_printable(str(line)[:200]))
            return
        summary.decision_lines += 1
        ts = datetime.fromtimestamp(decision.ms / 1000, UTC)
        if summary.first is None or ts < summary.first:
            summary.first = ts
        if summary.last is None or ts > summary.last:
            summary.last = ts
        self._decisions.add(decision, summary.lines)

    def _mail(self, host: str, queue_id: str, ms: int, starts: bool = False) -> Mail:
        """The mail a line of ``queue_id`` belongs to. A line that ``starts`` a message
        (smtpd's client=, qmgr's from=) later than the id's last message was removed
        starts a new mail: Postfix gives the id of a removed queue file to later messages
        (never within the second: a short id holds the microseconds it was made at)."""
        key = (host, queue_id)
        mail = self._mails.get(key)
        if mail is not None and starts:
            removed = self._removed.get(key)
            if removed is not None and ms > removed:
                self._reused.append(mail)
                del self._removed[key]
                mail = None
        if mail is None:
            mail = self._mails[key] = Mail(ms, queue_id, order=self.summary.lines)
        elif ms < mail.arrival_ms:
            mail.arrival_ms = ms
        return mail

    def _delivery(self, event: DeliveryEvent, ms: int) -> None:
        if not event.recipient:
            return  # a message's expiry: no recipient
        mail = self._mail(event.host, event.queue_id, ms)
        rcpt = event.orig_recipient or event.recipient
        mail.recipients[rcpt] = event.status
        if event.program in ("smtp", "lmtp"):
            mail.transports[rcpt] = event.transport
        if not event.suspended and event.status in ("sent", "deferred", "bounced"):
            self.results.append((ms, event.domain,
                                 None if event.status == "sent" else event))

    def _message_line(self, line: MessageLine, ms: int) -> None:
        if line.kind == "refused" and line.queue_id == "NOQUEUE":
            if line.action in ("reject", "milter-reject") and line.recipient:
                self._attempts.append(Mail(ms, "", line.client_name, line.client_address,
                                           "", line.sender, 0, 0,
                                           {line.recipient: f"refused {line.code}"},
                                           refused_code=line.code,
                                           order=self.summary.lines))
            return
        if line.kind == "removed":
            key = (line.host, line.queue_id)
            if key in self._mails:
                self._removed[key] = ms
            return
        mail = self._mail(line.host, line.queue_id, ms,
                          starts=line.kind in ("client", "queued"))
        if line.kind == "client":
            mail.client_name, mail.client_address = line.client_name, line.client_address
            mail.sasl_username = line.sasl_username
            mail.intake = True
        elif line.kind == "queued":
            mail.sender, mail.size, mail.nrcpt = line.sender, line.size, line.nrcpt
            mail.queued = True
        elif line.action.endswith("hold"):
            mail.held = True
        elif line.recipient:
            mail.client_name = mail.client_name or line.client_name
            mail.client_address = mail.client_address or line.client_address
            mail.sender = mail.sender or line.sender
            mail.recipients[line.recipient] = f"refused {line.code}"

    def mails(self, schedule: RetrySchedule) -> list[Mail]:
        """Every mail in arrival order, retries of refused attempts merged into them.
        When the input held mqpolicy's decision lines, the mail is theirs (Postfix's log
        beside them gives only delivery results)."""
        if self._decisions.lines:
            mails = self._logged_mails()
            self.summary.mail_log_messages_ignored = (
                sum(bool(m.recipients) for m in (*self._reused, *self._mails.values()))
                + len(self._attempts))
        else:
            mails = [m for m in (*self._reused, *self._mails.values()) if m.recipients]
            self.summary.no_intake = sum(not m.intake for m in mails)
            self.summary.no_sender = sum(not m.queued for m in mails)
            mails.extend(self._attempts)
        mails.sort(key=lambda m: (m.arrival_ms, m.order))
        lifetime_ms = schedule.maximal_queue_lifetime * 1000
        waiting: dict[tuple[str, str], int] = {}  # a temporarily refused (sender, rcpt)
        kept: list[Mail] = []
        for mail in mails:
            sender = mail.sender.lower()
            for rcpt in list(mail.recipients):
                pair = (sender, rcpt.lower())
                first = waiting.get(pair)
                if first is not None and mail.arrival_ms - first <= lifetime_ms:
                    del mail.recipients[rcpt]  # a retry: the first attempt replays it
                    self.summary.retries_merged += 1
                    if mail.refused_code == 0:
                        del waiting[pair]  # it got in at last
                elif mail.refused_code and 400 <= mail.refused_code < 500:
                    waiting[pair] = mail.arrival_ms
            if mail.recipients:
                kept.append(mail)
        return kept


    def _logged_mails(self) -> list[Mail]:
        """The mail of the decision lines: one per transaction with recipients."""
        mails: list[Mail] = []
        for message in self._decisions.messages():
            if not message.rcpts:
                self.summary.no_rcpt_decisions += 1
                continue
            first = message.rcpts[0].request
            end = message.end
            last = end.request if end else None
            refused = [d.action for d in message.rcpts if d.action in REFUSED_CODES]
            code = (REFUSED_CODES["defer" if "defer" in refused else "reject"]
                    if len(refused) == len(message.rcpts) else 0)
            mails.append(Mail(
                message.first_ms, message.queue_id, first.client_name, first.client_address,
                first.sasl_username, first.sender,
                size=last.size if last and last.size else first.size,
                nrcpt=last.recipient_count if last else 0, recipients=message.recipients,
                refused_code=code, held=end is not None and end.action == "hold",
                order=message.order, intake=True, queued=end is not None,
                helo_name=first.helo_name, protocol_name=first.protocol_name,
                reverse_client_name=first.reverse_client_name,
                headers=last.headers if last else None,
                logged_lane=end.lane if end else ""))
        return mails


def _printable(line: str) -> str:
    """A line as it can be printed: undecodable bytes (read with surrogateescape) and
    control characters as escapes."""
    raw = line.rstrip("\r\n").encode("utf-8", "surrogateescape")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ---------------------------------------------------------------- the replay


@dataclass
class Tally:
    messages: Counter[str] = field(default_factory=Counter)
    recipients: Counter[str] = field(default_factory=Counter)
    waits_s: list[float] = field(default_factory=list)  # deferred, then let in

    def wait_summary(self) -> dict[str, float]:
        """The waits of the recipients deferred, then let in: count, mean, p50, p95, max."""
        waits = sorted(self.waits_s)
        if not waits:
            return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
        def at(q: float) -> float:  # nearest rank
            return round(waits[max(0, -(-int(q * 100) * len(waits) // 100) - 1)], 1)
        return {"count": len(waits), "mean": round(sum(waits) / len(waits), 1),
                "p50": at(0.5), "p95": at(0.95), "max": round(waits[-1], 1)}

    def as_json(self) -> dict[str, object]:
        return {
            "messages": {k: self.messages[k] for k in COLUMNS},
            "recipients": {k: self.recipients[k] for k in COLUMNS},
            "wait_s": self.wait_summary(),
        }


@dataclass
class LimitTally:
    """What one limit did. ``first_tries`` and the counts after it are about the mail's
    first tries, the decisions a live server made over this log (found spent in a
    decision: ``rcpt`` or ``end_of_message``; ``recipients`` in those decisions;
    ``decided``: it gave the answer). ``retries``: later tries it deferred (the simulated
    clients' retries, made or not: see the module's docstring)."""

    action: str
    first_tries: int = 0
    rcpt: int = 0
    end_of_message: int = 0
    recipients: int = 0
    decided: int = 0
    retries: int = 0

    def as_json(self) -> dict[str, object]:
        return {"action": self.action, "first_tries": self.first_tries, "rcpt": self.rcpt,
                "end_of_message": self.end_of_message, "recipients": self.recipients,
                "decided": self.decided, "retries": self.retries}


@dataclass
class DestinationTally:
    """What feedback would have done to one configured destination over the log."""

    slow_downs: int = 0  # results that mean "slow down"
    backoffs: int = 0  # decreases of its budget's factor
    lowest_factor: float = 1.0
    pauses: int = 0  # pauses by a feedback rule
    reason: str = ""  # of the first slow-down or pause
    evidence: str = ""

    def as_json(self) -> dict[str, object]:
        return {"slow_downs": self.slow_downs, "backoffs": self.backoffs,
                "lowest_factor": round(self.lowest_factor, 3), "pauses": self.pauses,
                "reason": self.reason, "evidence": self.evidence}


def feedback_replay(policy: Policy, results: Iterable[tuple[int, str, DeliveryEvent | None]]
                    ) -> dict[str, DestinationTally]:
    """Feedback's backoff and pause rules over the log's delivery results, in log time,
    for the policy's configured destinations (as ``mqpolicy feedback`` handles a line)."""
    if not policy.destinations:
        return {}
    settings = policy.feedback or FeedbackSettings()
    patterns = compile_patterns(settings.slow_down_patterns)
    finder = DestinationFinder(None)
    names = {d.name for d in policy.destinations}
    states: dict[str, BackoffState] = {}
    paused_until: dict[str, int] = {}
    tallies: dict[str, DestinationTally] = {}
    for ms, domain, event in sorted(results, key=lambda r: r[0]):
        destination = finder.find_now(domain, policy.destinations) or domain
        if destination not in names:
            continue
        state = states.get(destination, BackoffState())
        if event is None:
            if state.backed_off:
                states[destination], _ = on_success(state, settings.backoff, ms)
            continue
        tally = tallies.setdefault(destination, DestinationTally())
        text = f"{event.dsn} {event.detail or event.reply}"
        for rule in settings.rules:
            if rule.destination is not None and rule.destination != destination:
                continue
            found = rule.match.search(text)
            if found is None:
                continue
            if paused_until.get(destination, 0) <= ms:
                paused_until[destination] = ms + rule.for_ms
                tally.pauses += 1
                tally.reason = tally.reason or f"rule:{rule.match.pattern}"
                tally.evidence = tally.evidence or event.line[:300]
            break
        reason = slow_down_reason(event, patterns)
        if reason is None:
            continue
        tally.slow_downs += 1
        tally.reason = tally.reason or reason
        tally.evidence = tally.evidence or event.line[:300]
        state, change = on_slow_down(state, settings.backoff, ms, reason)
        states[destination] = state
        if change is not None and change.kind == "decrease":
            tally.backoffs += 1
            tally.lowest_factor = min(tally.lowest_factor, change.new_factor)
    return {name: t for name, t in tallies.items() if t.slow_downs or t.pauses}


@dataclass
class ReplayReport:
    policy: str
    schedule: RetrySchedule
    input: InputSummary
    mails: int = 0
    recipients: int = 0
    decisions: int = 0
    retries_skipped: int = 0  # tries whose deciding limits still had no room: not made
    lanes: dict[str, Tally] = field(default_factory=dict)
    limits: dict[str, LimitTally] = field(default_factory=dict)
    keys: Counter[tuple[str, str]] = field(default_factory=Counter)  # found spent, 1st tries
    logged: Counter[str] = field(default_factory=Counter)  # what the log says happened
    # recipients by the lane whose transport delivered them (lanes sharing one: "a|b")
    logged_lanes: Counter[str] = field(default_factory=Counter)
    destinations: dict[str, DestinationTally] = field(default_factory=dict)

    def lane(self, name: str) -> Tally:
        tally = self.lanes.get(name)
        if tally is None:
            tally = self.lanes[name] = Tally()
        return tally

    def as_json(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "retry": {"minimal_backoff_time": self.schedule.minimal_backoff_time,
                      "maximal_backoff_time": self.schedule.maximal_backoff_time,
                      "maximal_queue_lifetime": self.schedule.maximal_queue_lifetime},
            "input": self.input.as_json(),
            "mails": self.mails, "recipients": self.recipients, "decisions": self.decisions,
            "retries_skipped": self.retries_skipped,
            "logged": dict(sorted(self.logged.items())),
            "logged_lanes": dict(sorted(self.logged_lanes.items())),
            "lanes": {name: t.as_json() for name, t in self.lanes.items()},
            "limits": {name: t.as_json() for name, t in sorted(self.limits.items())},
            "busiest_keys": [{"limit": limit, "key": key, "first_tries": n}
                             for (limit, key), n in self.keys.most_common(BUSIEST_SHOWN)],
            "destinations": {name: t.as_json()
                             for name, t in sorted(self.destinations.items())},
        }


_UNBOUNDED = 1 << 40


class _Decider:
    """The decision service's synchronous steps (:meth:`DecisionService.decide_now`
    without a resolver, on the replay's private memory store): the recipient's
    destination, :func:`~mqpolicy.decision.engine.make_plan`, the store's evaluation of
    the plan's checks, :func:`~mqpolicy.decision.engine.decide`. Without what the replay
    has no use for: the service's stats, latency timers, lock and decision log; the
    decisions are counted here. A test holds its verdicts to the service's."""

    def __init__(self, policy: Policy, store: MemoryStore) -> None:
        self.policy = policy
        self.store = store
        self.decisions = 0
        self._finder = DestinationFinder(None)
        self._once_ttl_ms = policy.store.once_ttl_ms

    def destination(self, recipient: str) -> str:
        """The destination the service gives a recipient's request ('' when the policy
        has none: the request's own domain)."""
        destinations = self.policy.destinations
        if not destinations or not recipient:
            return ""
        return self._finder.find_now(domain_of(recipient), destinations) or ""

    def __call__(self, request: Request, now_ms: int) -> Verdict:
        policy = self.policy
        if policy.destinations and request.recipient and not request.destination:
            request = request._replace(destination=self.destination(request.recipient))
        plan = make_plan(request, policy, NO_RUNTIME)
        evaluation: Evaluation | None = NO_LIMITS_EVALUATION
        if plan.limits:
            ledger = plan.ledger_key
            try:
                evaluation = self.store.evaluate_now(
                    [p.check for p in plan.limits], now_ms, plan.once_key, self._once_ttl_ms,
                    *((ledger,) if ledger else ()))
            except StoreError:  # at its bound, every entry in use: not with this one's
                evaluation = None
        self.decisions += 1
        return decide(plan, evaluation, policy)


@dataclass(slots=True)  # slots: a retry reads a few of them, long after the last time
class _Try:
    """One mail's recipients still trying."""

    mail: Mail
    recipients: list[str]
    first_ms: int
    tries: int = 0
    deferred: set[str] = field(default_factory=set)
    mail_lane: str = ""  # the lane of its last decision
    # the limits found spent when it was last deferred, looked at before the next try
    peeks: list[_Peek] = field(default_factory=list)
    skippable: bool = True  # every part of the last deferral was decided by a limit
    # the peeks as _skip looks at them (made at the first look after a try)
    looks: _Looks | None = None


def replay(policy: Policy, mails: Iterable[Mail], *, name: str = "",
           results: Iterable[tuple[int, str, DeliveryEvent | None]] = (),
           schedule: RetrySchedule | None = None, summary: InputSummary | None = None,
           progress: Callable[[int, int], None] | None = None,
           skip_spent_tries: bool = True) -> ReplayReport:
    """The policy's decisions over ``mails`` (in arrival order), simulated in log time.

    ``skip_spent_tries``: a retry whose deciding limits still have no room is counted,
    not made (see the module's docstring); False makes every try.
    """
    schedule = schedule or RetrySchedule()
    report = ReplayReport(name, schedule, summary or InputSummary())
    for lane in policy.lanes:
        report.lane(lane.name)
    # private, and bounded only by memory: an eviction would change what the log's mail
    # found (a live server's bound is its own operators' choice)
    store = MemoryStore(max_entries=_UNBOUNDED)
    decider = _Decider(policy, store)
    by_transport: dict[str, list[str]] = {}
    for lane in policy.lanes:
        by_transport.setdefault(lane.transport, []).append(lane.name)
    lanes_of = {t: "|".join(names) for t, names in by_transport.items()}
    logged, logged_lanes = report.logged, report.logged_lanes
    # The mail in arrival order (the order given when it is so: a stable sort), then the
    # retries, in a heap ordered by (time, seq): a mail's first try comes before the
    # retries due at the same time, as in one heap of both where each mail's seq is its
    # place in this list and a retry's is larger.
    arrivals: list[tuple[int, _Try]] = []
    for mail in mails:
        report.mails += 1
        report.recipients += len(mail.recipients)
        for status in mail.recipients.values():
            logged[status.split(" ")[0]] += 1
        for transport in mail.transports.values():
            logged_lanes[lanes_of.get(transport, f"transport {transport}")] += 1
        if mail.logged_lane:  # the live policy's lane, from its decision log
            logged_lanes[mail.logged_lane] += sum(
                status in ("accepted", "held") for status in mail.recipients.values())
        if mail.held:
            logged["held messages"] += 1
        arrivals.append((mail.arrival_ms, _Try(mail, list(mail.recipients),
                                               mail.arrival_ms)))
    if any(arrivals[i][0] > arrivals[i + 1][0] for i in range(len(arrivals) - 1)):
        arrivals.sort(key=lambda a: a[0])
    total = len(arrivals)
    seq = total
    # the retries due, a heap of (time, seq) each as one integer (cheaper to compare than
    # a tuple), and the mail each one is
    due: list[int] = []
    waiting: dict[int, _Try] = {}
    done = 0
    end_headers: tuple[tuple[str, str], ...] | None = () if policy.end_checks_only else None
    limits: dict[str, Limit] = {lim.name: lim for lim in policy.limits}
    limits.update({lim.name: lim for lim in policy.destination_limits.values()})
    next_arrival = 0
    heappop, heappush, next_try_ms = heapq.heappop, heapq.heappush, schedule.next_try_ms
    while True:
        if next_arrival < total and (not due
                                     or arrivals[next_arrival][0] <= due[0] >> _SEQ_BITS):
            now_ms, attempt = arrivals[next_arrival]
            next_arrival += 1
        elif due:
            key = heappop(due)
            attempt = waiting.pop(key)
            now_ms = key >> _SEQ_BITS
        else:
            break
        if skip_spent_tries and _skip(report, attempt, store, now_ms):
            again = attempt.recipients
        else:
            again = _try(decider, report, attempt, seq, now_ms, end_headers, limits)
        seq += 1
        if again:
            later = next_try_ms(attempt.first_ms, now_ms)
            if later is None:
                _finish(report, attempt, again, "expired", attempt.mail_lane, now_ms)
            else:
                attempt.recipients = again
                key = later << _SEQ_BITS | seq
                waiting[key] = attempt
                heappush(due, key)
                continue
        done += 1
        if progress is not None and done % 50_000 == 0:
            progress(done, total)
    report.decisions = decider.decisions
    report.destinations = feedback_replay(policy, results)
    return report


_SEQ_BITS = 48  # a retry's seq below 2**48: more tries than any replay makes


class _Peek(NamedTuple):
    """A limit that refuses or holds, planned in a deferred part of a try, looked at again
    (nothing spent) before the next try."""

    part: int  # the deferred part of the try (a recipient at RCPT, or the message's end)
    name: str
    rank: int  # the engine's severity of its action: reject 3, defer 2, hold 1
    check: BudgetCheck


_RANK = {"reject": 3, "defer": 2, "hold": 1}
_DEFER_RANK = 2


def _skip(report: ReplayReport, attempt: _Try, store: MemoryStore, now_ms: int) -> bool:
    """Whether the try due now can be left unmade: every part of the last try would be
    deferred again. The limits that part planned are looked at as the engine weighs them
    (severity, then the longest wait): when the worst one without room defers, the part
    is deferred by it, and counted so."""
    looks = attempt.looks
    if looks is None:
        if not attempt.peeks:
            return False
        looks = attempt.looks = _looks(attempt.peeks, report)
    checks, parts, alone = looks
    results = store.look_now(checks, now_ms)
    if alone is not None:  # the usual: one deferring limit, the only one of every part
        if results[0][0]:
            return False  # it has room: make the try
        report.retries_skipped += 1
        alone[0].retries += alone[1]
        return True
    deciding: list[str] = []
    for part in parts:
        if len(part) == 1:  # one limit: it decides the part when it has no room
            [(i, worst_rank, worst)] = part
            if results[i][0]:
                return False  # the part gets in: make the try
        else:
            worst_rank = worst_wait = 0
            worst = ""
            for i, rank, name in part:
                allowed, wait = results[i]
                if not allowed and (rank, wait) > (worst_rank, worst_wait):
                    worst_rank, worst_wait, worst = rank, wait, name
        if worst_rank != _DEFER_RANK:
            return False  # a part gets in, or is refused or held: make the try
        deciding.append(worst)
    report.retries_skipped += 1
    for name in deciding:
        report.limits[name].retries += 1
    return True


_Looks = tuple[list[BudgetCheck], list[list[tuple[int, int, str]]],
               tuple[LimitTally, int] | None]


def _looks(peeks: list[_Peek], report: ReplayReport) -> _Looks:
    """What :func:`_skip` looks at: each check once (a look spends nothing: the same
    check finds the same), and per part, in order, each of its limits once, as (its
    check's place, rank, name). Last, when one deferring check is the only limit of every
    part: its limit's tally and the number of parts (the retries a skip counts to it)."""
    where: dict[BudgetCheck, int] = {}
    parts: dict[int, dict[int, tuple[int, int, str]]] = {}
    for p in peeks:
        i = where.setdefault(p.check, len(where))
        parts.setdefault(p.part, {}).setdefault(i, (i, p.rank, p.name))
    by_part = [list(part.values()) for part in parts.values()]
    alone = None
    if len(where) == 1 and all(len(part) == 1 for part in by_part):
        _, rank, name = by_part[0][0]
        if rank == _DEFER_RANK:
            alone = (report.limits[name], len(by_part))
    return list(where), by_part, alone


def _deferred_by(attempt: _Try, verdict: Verdict, limits: dict[str, Limit]) -> None:
    """Note the limits a deferred part of a try planned, to look at before the next. A
    deferral no known limit decided (the store's failure) makes no try skippable."""
    part = attempt.peeks[-1].part + 1 if attempt.peeks else 0  # parts come one by one
    peeks: list[_Peek] = []
    decided = False
    for o in verdict.limits:
        limit = limits.get(o.name)
        rank = _RANK.get(o.action._value_, 0)  # _value_: a plain attribute, value is not
        if o.monitor or limit is None or not rank:
            continue
        decided |= o.name == verdict.deciding
        # its cost in that decision (at least one: a peek at RCPT counts nothing), looked
        # at without spending (consume False, after 0)
        cost = o.cost if o.cost > 1 else 1
        peeks.append(_new(_Peek, (part, o.name, rank, _new(BudgetCheck, (
            store_key(limit, o.key), limit.refill, limit.unit, limit.burst, cost, False,
            limit.blocking, 0)))))
    attempt.looks = None
    if decided and attempt.skippable:
        attempt.peeks.extend(peeks)
    else:
        attempt.skippable = False
        attempt.peeks = []


def _hits(report: ReplayReport, verdict: Verdict, stage: str, recipients: int,
          first: bool) -> None:
    for o in verdict.limits:
        if o.allowed:
            continue
        tally = report.limits.get(o.name)
        if tally is None:
            tally = report.limits[o.name] = LimitTally(
                "monitor" if o.monitor else o.action.value)
        if not first:
            tally.retries += verdict.deciding == o.name
            continue
        tally.first_tries += 1
        if stage == STAGE_RCPT:
            tally.rcpt += 1
        else:
            tally.end_of_message += 1
        tally.recipients += recipients
        tally.decided += verdict.deciding == o.name
        report.keys[(o.name, o.key)] += 1


# read once: an Enum's member costs a lookup each time
_ACCEPT, _HOLD, _DEFER, _REJECT = Action.ACCEPT, Action.HOLD, Action.DEFER, Action.REJECT
_RECIPIENT = Request._fields.index("recipient")
_DESTINATION = Request._fields.index("destination")
assert _RECIPIENT < _DESTINATION


def _try(decide_now: _Decider, report: ReplayReport, attempt: _Try, seq: int, now_ms: int,
         end_headers: tuple[tuple[str, str], ...] | None,
         limits: dict[str, Limit]) -> list[str]:
    """One try of a mail's recipients; the recipients to try again later."""
    mail = attempt.mail
    first = attempt.tries == 0
    attempt.tries += 1
    instance = f"replay{seq:x}"
    base = Request(stage=STAGE_RCPT, client_address=mail.client_address,
                   client_name=mail.client_name,
                   reverse_client_name=mail.reverse_client_name or mail.client_name,
                   helo_name=mail.helo_name, sasl_username=mail.sasl_username,
                   sender=mail.sender, size=mail.size, instance=instance,
                   protocol_name=mail.protocol_name)
    accepted: list[str] = []
    later: list[str] = []
    held_at_rcpt = False
    lane = ""
    attempt.peeks = []
    attempt.looks = None
    attempt.skippable = True
    destination = decide_now.destination
    # each recipient's request: the base with its recipient and destination (as _replace
    # would make it, at a third of the cost)
    head, middle, tail = base[:_RECIPIENT], base[_RECIPIENT + 1:_DESTINATION], \
        base[_DESTINATION + 1:]
    for rcpt in attempt.recipients:
        verdict = decide_now(_new(Request, (*head, rcpt, *middle, destination(rcpt), *tail)),
                             now_ms)
        _hits(report, verdict, STAGE_RCPT, 1, first)
        lane = verdict.lane.name
        action = verdict.action
        if action is _ACCEPT or action is _HOLD:
            accepted.append(rcpt)
            held_at_rcpt |= action is _HOLD
        elif action is _DEFER:
            later.append(rcpt)
            _deferred_by(attempt, verdict, limits)
        else:
            _finish(report, attempt, [rcpt], "rejected", lane, now_ms)
    attempt.mail_lane = lane
    if not accepted:
        attempt.deferred.update(later)
        return later
    unknown = max(0, mail.nrcpt - len(mail.recipients))  # queued, never seen delivered
    # each try is a transaction of its own (a client sends a deferred message again): a
    # queue id of its own, whatever the log's (Postfix reuses queue ids over a day)
    queue_id = f"{mail.queue_id or 'NOQUEUE'}.{seq:x}"
    verdict = decide_now(base._replace(
        stage=STAGE_END_OF_MESSAGE, queue_id=queue_id, recipients=tuple(accepted),
        recipient_count=len(accepted) + unknown,
        headers=end_headers if mail.headers is None else mail.headers), now_ms)
    _hits(report, verdict, STAGE_END_OF_MESSAGE, len(accepted), first)
    lane = verdict.lane.name
    attempt.mail_lane = lane
    action = verdict.action
    if action is not _ACCEPT:
        decide_now.store.give_back_now(make_ledger_key("i:" + instance), now_ms)
    if action is _DEFER:
        later = accepted + later
        _deferred_by(attempt, verdict, limits)
    elif action is _REJECT:
        _finish(report, attempt, accepted, "rejected", lane, now_ms)
    else:
        held = action is _HOLD or held_at_rcpt
        _finish(report, attempt, accepted, "held" if held else "accepted", lane, now_ms,
                demoted=verdict.demoted)
    attempt.deferred.update(later)
    return later


def _finish(report: ReplayReport, attempt: _Try, recipients: list[str], outcome: str,
            lane: str, now_ms: int, *, demoted: bool = False) -> None:
    tally = report.lane(lane or "?")
    deferred = [r for r in recipients if r in attempt.deferred]
    tally.recipients[outcome] += len(recipients)
    tally.messages[outcome] += 1
    if deferred:
        tally.recipients["deferred"] += len(deferred)
        tally.messages["deferred"] += 1
        if outcome in ("accepted", "held"):
            tally.waits_s.extend([(now_ms - attempt.first_ms) / 1000] * len(deferred))
    if demoted:
        tally.recipients["demoted"] += len(recipients)
        tally.messages["demoted"] += 1


# ---------------------------------------------------------------- compare


def compare(a: ReplayReport, b: ReplayReport) -> dict[str, object]:
    """What changes from ``a`` to ``b`` (b - a), per lane, per limit, and the keys whose
    first-try hits change most."""
    lanes: dict[str, object] = {}
    for name in sorted(set(a.lanes) | set(b.lanes)):
        lanes[name] = _diff(a.lanes[name].as_json() if name in a.lanes else {},
                            b.lanes[name].as_json() if name in b.lanes else {})
    limits: dict[str, object] = {}
    for name in sorted(set(a.limits) | set(b.limits)):
        before = a.limits[name].as_json() if name in a.limits else {}
        after = b.limits[name].as_json() if name in b.limits else {}
        row: dict[str, object] = {"action": after.get("action") or before.get("action")}
        row.update({k: {"a": before.get(k, 0), "b": after.get(k, 0)}
                    for k in ("first_tries", "rcpt", "end_of_message", "recipients",
                              "decided", "retries")})
        limits[name] = row
    changed = Counter({k: b.keys[k] - a.keys[k] for k in set(a.keys) | set(b.keys)})
    most = sorted(changed.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:BUSIEST_SHOWN]
    return {
        "a": a.policy, "b": b.policy,
        "lanes": lanes, "limits": limits,
        "keys_most_affected": [{"limit": limit, "key": key, "a": a.keys[(limit, key)],
                                "b": b.keys[(limit, key)], "change": n}
                               for (limit, key), n in most if n],
    }


def _diff(a: object, b: object) -> object:
    if isinstance(a, dict) or isinstance(b, dict):
        ad = a if isinstance(a, dict) else {}
        bd = b if isinstance(b, dict) else {}
        return {k: _diff(ad.get(k, 0), bd.get(k, 0)) for k in dict.fromkeys([*ad, *bd])}
    return {"a": a, "b": b}


__all__ = ["InputSummary", "Mail", "MailLog", "ReplayReport", "RetrySchedule", "compare",
           "replay"]
