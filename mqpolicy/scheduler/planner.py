"""The release planner. Pure: held messages + records + now + lanes → what to release in
which order, what waits and why, what to clean up, what to report.

Order: highest lane first (policy order; a record whose lane is no longer configured comes
last), then FIFO by the time the message was held (``created_ms``, then arrival, then queue
id). A message is never due before its record's ``not_before_ms``.

Which held messages are ours: those with a record. A held message without a record was held
by someone else (an operator's ``postsuper -h``, another filter) and is left alone
(``foreign``). A record that cannot be parsed is reported (``broken``), never released
blindly. A held message that arrived well after its record was written (more than
``reuse_slack_ms``) is another message under a queue id Postfix has since reused: the record
is stale, and the message foreign.

Records whose message is not on hold:

* state ``releasing``: a release was under way (maybe the scheduler died after
  ``postsuper -H``): the message left hold, so the release happened; the record goes
  (``finished``);
* state ``held``: someone released or deleted the message, or it is not in the hold queue
  *yet* (the record is written before the MTA finishes queueing the message): the record
  goes only once it is older than ``grace_ms`` (``stale``).

A ``releasing`` record whose message is still on hold (the scheduler died before
``postsuper -H``) is released again without spending budgets a second time (``resume``).

Budgets (:func:`release_checks`): one list of checks per message for ONE atomic
``store.evaluate``: the lane's release budget (key ``release:<lane>:...``, from
``Lane.release_rate``/``release_burst``), every recipient-keyed limit that applies to
one of its recipients (the very buckets live RCPT decisions spend, so a destination's
budget is shared between live traffic and releases), and the message budgets its hold
left unspent (the record's ``spends``: a limit with ``action: hold`` and the others the
held END-OF-MESSAGE decision would have spent, in the buckets live decisions spend). A
check's cost is capped at its bucket's burst (several recipients on one bucket are one
check): a message with more recipients at a destination than that destination's burst, or
more bytes than a byte budget's burst, would otherwise never fit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from mqpolicy.decision.engine import RuntimeState, make_plan, store_key
from mqpolicy.policy.model import Lane, LoadThresholds, Policy
from mqpolicy.policy.rates import BUCKET_VERSION, largest_burst
from mqpolicy.policy.request import STAGE_RCPT, Request, domain_of
from mqpolicy.scheduler.mta_queue import HOLD, QueueEntry
from mqpolicy.store.budget import BudgetCheck, budget_check
from mqpolicy.store.hold_records import BrokenRecord, HeldSpend, HoldRecord, RecordSet, RecordState

__all__ = [
    "LOAD_RESUME_FRACTION",
    "Candidate",
    "HeldGroup",
    "QueueSummary",
    "ReleasePlan",
    "held_spend_checks",
    "hold_paused_destinations",
    "lane_release_check",
    "lanes_to_pause",
    "load_exceeded",
    "plan_releases",
    "release_checks",
    "summarize",
]

_NOTHING: Mapping[str, str] = MappingProxyType({})
_NOTHING_F: Mapping[str, float] = MappingProxyType({})

LOAD_RESUME_FRACTION = 0.8
"""Paused lanes resume once every watched queue is back under this share of its threshold
(hysteresis: a queue hovering at the threshold does not flap the lanes)."""


class Candidate(NamedTuple):
    """A held message of ours."""

    entry: QueueEntry
    record: HoldRecord
    lane: Lane | None  # None: the record's lane is no longer configured
    priority: int  # the lane's priority (0 = highest); unknown lanes come last

    @property
    def queue_id(self) -> str:
        return self.entry.queue_id


@dataclass
class ReleasePlan:
    """One pass's view of the hold queue."""

    due: list[Candidate] = field(default_factory=list)  # in release order
    waiting: list[Candidate] = field(default_factory=list)  # not before a later time
    # due, but their lane waits for load or is paused, or a recipient's destination is paused
    paused: list[Candidate] = field(default_factory=list)
    resume: list[Candidate] = field(default_factory=list)  # interrupted releases: finish
    finished: list[str] = field(default_factory=list)  # records of completed releases
    stale: list[str] = field(default_factory=list)  # records whose message is not on hold
    broken: list[BrokenRecord] = field(default_factory=list)  # held messages, bad records
    foreign: list[QueueEntry] = field(default_factory=list)  # held by someone else
    unknown_lanes: set[str] = field(default_factory=set)

    @property
    def held_by_lane(self) -> dict[str, int]:
        """Our held messages per lane (for metrics)."""
        counts: Counter[str] = Counter()
        for group in (self.due, self.waiting, self.paused, self.resume):
            for c in group:
                counts[c.record.lane] += 1
        return dict(counts)


def _order(c: Candidate) -> tuple[int, int, int, str]:
    return (c.priority, c.record.created_ms, c.entry.arrival_time, c.entry.queue_id)


def record_grace_ms(interval_ms: int) -> int:
    """How old a record must be before its message, missing from the queue, counts as gone:
    three scheduler passes, at least a minute (the scheduler and ``mqpolicy queue`` alike)."""
    return max(60_000, 3 * interval_ms)


def plan_releases(
    entries: Iterable[QueueEntry],
    records: RecordSet,
    *,
    now_ms: int,
    lanes: Sequence[Lane],
    paused_lanes: frozenset[str] = frozenset(),
    grace_ms: int = 60_000,
    reuse_slack_ms: int = 300_000,
) -> ReleasePlan:
    """``grace_ms``: how old a record must be before a missing message counts as gone.
    ``reuse_slack_ms``: a held message that arrived more than this after its record was
    written is another message under a reused queue id (allows for clock differences
    between the hosts of the MTA and of the writer)."""
    plan = ReleasePlan()
    by_name = {lane.name: lane for lane in lanes}
    lowest = len(lanes)
    held_ids: set[str] = set()
    queued_ids: set[str] = set()
    for entry in entries:
        queued_ids.add(entry.queue_id)
        if entry.queue_name != HOLD or entry.queue_id in held_ids:
            continue  # (a listing may show a message twice while the MTA moves it)
        held_ids.add(entry.queue_id)
        record = records.records.get(entry.queue_id)
        if record is None:
            broken = records.broken.get(entry.queue_id)
            if broken is not None:
                plan.broken.append(broken)
            else:
                plan.foreign.append(entry)
            continue
        if entry.arrival_time and entry.arrival_time * 1000 > record.created_ms + reuse_slack_ms:
            plan.foreign.append(entry)  # arrived after the record: a reused queue id
            plan.stale.append(record.queue_id)
            continue
        lane = by_name.get(record.lane)
        if lane is None:
            plan.unknown_lanes.add(record.lane)
        candidate = Candidate(entry, record, lane, lane.priority if lane else lowest)
        if record.state is RecordState.RELEASING:
            plan.resume.append(candidate)
        elif record.not_before_ms > now_ms:
            plan.waiting.append(candidate)
        elif record.lane in paused_lanes:
            plan.paused.append(candidate)
        else:
            plan.due.append(candidate)
    for queue_id, record in records.records.items():
        if queue_id in held_ids:
            continue
        if record.state is RecordState.RELEASING:
            plan.finished.append(queue_id)
        elif now_ms - record.created_ms >= grace_ms:
            plan.stale.append(queue_id)
    plan.due.sort(key=_order)
    plan.resume.sort(key=_order)
    plan.paused.sort(key=_order)
    plan.waiting.sort(key=lambda c: (c.record.not_before_ms, *_order(c)))
    return plan


def hold_paused_destinations(plan: ReleasePlan, paused: Mapping[str, str],
                             destinations: Mapping[str, str]) -> None:
    """Move the due messages with a recipient at a paused destination to ``plan.paused``:
    a message is never split, so it waits while any of its destinations is paused.
    ``destinations`` maps recipient domains to their destination group (a domain that is
    not there is its own destination)."""
    if not paused:
        return
    due: list[Candidate] = []
    for candidate in plan.due:
        domains = (domain_of(r) for r in candidate.entry.recipients)
        if any(destinations.get(d, d) in paused for d in domains):
            plan.paused.append(candidate)
        else:
            due.append(candidate)
    plan.due = due
    plan.paused.sort(key=_order)


# ---------------------------------------------------------------- budgets


def lane_release_check(lane: Lane, pass_interval_ms: int) -> BudgetCheck | None:
    """The lane's release budget, None when it has no ``release_rate``. Without an explicit
    ``release_burst`` the burst is what one pass interval earns (at least 1): a smaller one
    would cap the lane at ``burst`` messages per pass, below its rate."""
    rate = lane.release_rate
    if rate is None:
        return None
    burst = lane.release_burst or max(1, pass_interval_ms * rate.count // rate.period_ms)
    burst = min(burst, largest_burst(rate.count, rate.period_ms))
    key = f"release:{lane.name}:{rate.count}/{rate.period_ms}/{burst}/{BUCKET_VERSION}"
    return budget_check(key, rate.count, rate.period_ms, burst, 1, True, True)


def release_checks(
    policy: Policy,
    candidate: Candidate,
    pass_interval_ms: int,
    *,
    destinations: Mapping[str, str] = _NOTHING,
    backoff: Mapping[str, float] = _NOTHING_F,
) -> tuple[BudgetCheck | None, list[BudgetCheck]]:
    """(the lane's release check, the destination checks) of one held message.

    The destination checks are exactly the recipient-keyed checks ``engine.make_plan``
    builds for each recipient's RCPT decision (same buckets, scope, backoff scaling), in
    the record's lane rather than a lane classified again from the bare envelope;
    recipients that share a bucket are merged into one check of their summed cost.
    ``destinations`` maps recipient domains to their destination group (resolved by the
    caller, as the decision service does before planning); ``backoff`` holds the
    destinations' backoff factors."""
    lane = candidate.lane
    entry = candidate.entry
    runtime = RuntimeState(backoff=backoff)
    merged: dict[str, BudgetCheck] = {}
    order: list[str] = []

    def add(check: BudgetCheck) -> None:
        known = merged.get(check.key)
        if known is None:
            order.append(check.key)
            merged[check.key] = check._replace(cost=min(check.cost, check.burst))
        else:
            merged[check.key] = known._replace(cost=min(known.cost + check.cost, known.burst))

    for recipient in entry.recipients:
        request = Request(stage=STAGE_RCPT, sender=entry.sender, recipient=recipient,
                          size=entry.size, queue_id=entry.queue_id,
                          destination=destinations.get(domain_of(recipient), ""))
        plan = make_plan(request, policy, runtime, lane or policy.lane(policy.default_lane),
                         releasing=True)
        for planned in plan.limits:
            if planned.limit.recipient_keyed:
                add(planned.check)
    for check in held_spend_checks(policy, candidate.record.spends):
        add(check)
    lane_check = lane_release_check(lane, pass_interval_ms) if lane is not None else None
    return lane_check, [merged[k] for k in order]


def held_spend_checks(policy: Policy, spends: Iterable[HeldSpend]) -> Iterator[BudgetCheck]:
    """The checks of the budgets a held message did not spend (its record's ``spends``):
    the buckets the held decision looked at, under the limits as configured now. A limit
    no longer configured, or recipient-keyed now (the recipients' checks cover it), is
    not spent; one whose rate or burst changed is spent in its new buckets, as live
    decisions are."""
    for spend in spends:
        limit = policy.limits_by_name.get(spend.limit)
        if limit is None or limit.recipient_keyed:
            continue
        yield BudgetCheck(store_key(limit, spend.key), limit.refill, limit.unit, limit.burst,
                          spend.cost, True, limit.blocking)


# ---------------------------------------------------------------- load


def load_exceeded(counts: Mapping[str, int], thresholds: LoadThresholds,
                  was_exceeded: bool) -> bool:
    """Whether the MTA's queues are swollen: a watched queue (threshold > 0) above its
    threshold; once exceeded, until every watched queue is under
    :data:`LOAD_RESUME_FRACTION` of its threshold."""
    watched = [(name, limit) for name, limit in (("active", thresholds.active),
                                                 ("incoming", thresholds.incoming),
                                                 ("deferred", thresholds.deferred))
               if limit > 0]
    if any(counts.get(name, 0) > limit for name, limit in watched):
        return True
    if was_exceeded:
        return any(counts.get(name, 0) > limit * LOAD_RESUME_FRACTION
                   for name, limit in watched)
    return False


def lanes_to_pause(lanes: Sequence[Lane], hold_lanes: int) -> frozenset[str]:
    """The ``hold_lanes`` lowest lanes, never the highest one."""
    count = min(hold_lanes, len(lanes) - 1)
    if count <= 0:
        return frozenset()
    ordered = sorted(lanes, key=lambda lane: lane.priority)
    return frozenset(lane.name for lane in ordered[-count:])


# ---------------------------------------------------------------- the queue view


@dataclass(slots=True)
class HeldGroup:
    """The held messages of one lane, or of one lane and destination (``mqpolicy queue``)."""

    lane: str
    destination: str | None = None  # None: the whole lane
    held: int = 0
    due: int = 0  # due now (including releases to finish)
    paused: int = 0  # due, their lane waits for the queues to drain
    waiting: int = 0  # not before a later time
    next_due_ms: int | None = None
    last_due_ms: int | None = None
    oldest_held_ms: int | None = None

    def add(self, state: str, due_ms: int, created_ms: int) -> None:
        """Count one message in ``state`` (a :class:`ReleasePlan` group's name)."""
        self.held += 1
        if state in ("due", "resume"):
            self.due += 1
        elif state == "paused":
            self.paused += 1
        else:
            self.waiting += 1
        self.next_due_ms = due_ms if self.next_due_ms is None else min(self.next_due_ms,
                                                                         due_ms)
        self.last_due_ms = due_ms if self.last_due_ms is None else max(self.last_due_ms,
                                                                         due_ms)
        self.oldest_held_ms = (created_ms if self.oldest_held_ms is None
                               else min(self.oldest_held_ms, created_ms))

    def as_json(self) -> dict[str, object]:
        row: dict[str, object] = {"lane": self.lane}
        if self.destination is not None:
            row["destination"] = self.destination
        row.update(held=self.held, due=self.due, paused=self.paused, waiting=self.waiting,
                   next_due_ms=self.next_due_ms, last_due_ms=self.last_due_ms,
                   oldest_held_ms=self.oldest_held_ms)
        return row


@dataclass(slots=True)
class QueueSummary:
    """What is held, per lane and per destination, with due times (``mqpolicy queue``)."""

    now_ms: int
    lanes: list[HeldGroup]
    destinations: list[HeldGroup]  # per lane, most held first
    foreign: list[QueueEntry]  # held by someone else: left alone
    broken: list[BrokenRecord]
    unknown_lanes: list[str]
    queues: dict[str, int]  # the MTA's queue sizes
    waiting_lanes: list[str]  # waiting for the MTA's queues
    paused: list[str] = field(default_factory=list)  # "destination google (why)", "lane bulk"

    @property
    def held(self) -> int:
        return sum(group.held for group in self.lanes)

    def as_json(self) -> dict[str, object]:
        return {
            "now_ms": self.now_ms,
            "lanes": [group.as_json() for group in self.lanes],
            "destinations": [group.as_json() for group in self.destinations],
            "foreign": [{"queue_id": e.queue_id, "sender": e.sender,
                         "arrival_time": e.arrival_time} for e in self.foreign],
            "broken": [{"queue_id": b.queue_id, "problem": b.problem} for b in self.broken],
            "unknown_lanes": self.unknown_lanes,
            "queues": self.queues,
            "waiting_lanes": self.waiting_lanes,
            "paused": self.paused,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QueueSummary:
        """The summary :meth:`as_json` gave (a running server's, through its admin
        socket), as far as the queue view shows it: of the messages held by others and
        the unreadable records, what ``as_json`` keeps. KeyError, TypeError or ValueError
        when ``data`` is not one."""
        return cls(
            now_ms=int(data["now_ms"]),
            lanes=[HeldGroup(**group) for group in data["lanes"]],
            destinations=[HeldGroup(**group) for group in data["destinations"]],
            foreign=[QueueEntry(str(e["queue_id"]), HOLD, int(e["arrival_time"]), 0,
                                str(e["sender"]), ()) for e in data["foreign"]],
            broken=[BrokenRecord(str(b["queue_id"]), str(b["problem"]), {})
                    for b in data["broken"]],
            unknown_lanes=[str(lane) for lane in data["unknown_lanes"]],
            queues={str(k): int(v) for k, v in data["queues"].items()},
            waiting_lanes=[str(lane) for lane in data["waiting_lanes"]],
            paused=[str(p) for p in data.get("paused", ())],
        )


def summarize(plan: ReleasePlan, now_ms: int, queues: Mapping[str, int] | None = None,
              waiting_lanes: Iterable[str] = ()) -> QueueSummary:
    """What ``plan`` holds, per lane and per destination, with due times; with the MTA's
    queue sizes and the lanes waiting for them, when given."""
    lanes: dict[str, HeldGroup] = {}
    destinations: dict[tuple[str, str], HeldGroup] = {}
    groups = (("due", plan.due), ("resume", plan.resume), ("paused", plan.paused),
              ("waiting", plan.waiting))
    for state, group in groups:
        for c in group:
            record = c.record
            due_ms = max(record.not_before_ms, 0)
            lane = lanes.setdefault(record.lane, HeldGroup(record.lane))
            lane.add(state, due_ms, record.created_ms)
            domains = {domain_of(r) or "(none)" for r in c.entry.recipients} or {"(none)"}
            for domain in sorted(domains):
                dest = destinations.setdefault((record.lane, domain),
                                               HeldGroup(record.lane, domain))
                dest.add(state, due_ms, record.created_ms)
    return QueueSummary(
        now_ms=now_ms,
        lanes=sorted(lanes.values(), key=lambda g: g.lane),
        destinations=sorted(destinations.values(),
                            key=lambda g: (g.lane, -g.held, g.destination or "")),
        foreign=list(plan.foreign),
        broken=list(plan.broken),
        unknown_lanes=sorted(plan.unknown_lanes),
        queues=dict(queues or {}),
        waiting_lanes=sorted(waiting_lanes),
    )
