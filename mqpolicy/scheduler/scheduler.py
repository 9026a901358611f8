"""The hold-queue scheduler: releases held mail highest lane first, FIFO within a lane,
never before its time, within the lanes' release budgets and the destination budgets.

It runs as ``mqpolicy scheduler`` (its own process; needs a Redis store, since the records
are written by the policy server and the milter) or as a task inside ``serve`` (any store;
required for ``memory://``). One scheduler per MTA instance is active: each holds the
record store's lease for ``lock_ttl`` and extends it every pass; the others wait.

A pass:

1. read every record, then list the MTA's queue (``postqueue -j``);
2. from the queue counts, decide whether the MTA is under load (``scheduler.load``): then
   the ``hold_lanes`` lowest lanes (never the highest) wait, and that set is published in
   the record store for the decision path (:func:`~mqpolicy.store.hold_records.waiting_lanes`);
3. plan (:mod:`mqpolicy.scheduler.planner`, pure): order, due times, clean-ups, reports;
4. delete the records of finished and stale holds;
5. budgets: for each due message in order, ONE ``store.evaluate`` with its lane's release
   check and its destination checks, against the counter store the policy server uses.
   A message whose lane budget is spent stops its lane for this pass (FIFO: no later
   message of the lane overtakes it); a message whose destination budget is spent waits,
   and so do later messages of any lane on that bucket, while the lane's messages to other
   destinations go on. Lower lanes go on too: a lane's own budget caps that lane only;
   what lanes share (``max_releases_per_pass`` and the destination budgets) goes to the
   highest lane first. A store error ends the budget step (nothing more is released in
   that pass);
6. release: mark the records ``releasing``, ``postsuper -H`` (one call, ids on stdin),
   ``postqueue -i`` for each released message, then delete their records.

Crash safety: a scheduler that dies after marking leaves ``releasing`` records. The next
pass (of this or another scheduler) deletes those whose message left hold (the release
happened) and releases again, without spending budgets twice, those still on hold. Postfix
itself never delivers a message twice, and ``postsuper -H`` on a message that is not on hold
does nothing, so a release is never repeated and a held message is never forgotten.

The next pass comes after ``scheduler.interval``, or sooner when a message becomes due or
a budget refills before that (never sooner than twice the last pass's own duration, nor
than 100 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mqpolicy.decision.engine import NO_RUNTIME, RuntimeState
from mqpolicy.decision.service import DecisionService, wall_clock_ms
from mqpolicy.metrics.instruments import LatencyHistogram
from mqpolicy.metrics.registry import HELD_MESSAGES, RELEASES, MetricsRegistry
from mqpolicy.policy.model import MtaKind, Policy, SchedulerSettings
from mqpolicy.policy.request import domain_of
from mqpolicy.scheduler.agent_queue import AgentQueue
from mqpolicy.scheduler.mta_queue import MtaQueue, QueueCommandError, QueueSnapshot
from mqpolicy.scheduler.planner import (
    Candidate,
    QueueSummary,
    ReleasePlan,
    hold_paused_destinations,
    lanes_to_pause,
    load_exceeded,
    plan_releases,
    record_grace_ms,
    release_checks,
    summarize,
)
from mqpolicy.scheduler.postfix_queue import PostfixQueue
from mqpolicy.store.budget import NEVER, BudgetCheck, CounterStore, StoreError
from mqpolicy.store.hold_records import (
    HoldRecordStore,
    RecordSet,
    RecordState,
    lease_owner_token,
)

__all__ = ["PassReport", "Scheduler", "SchedulerStats", "open_mta_queue", "queue_summary",
           "register_scheduler_metrics"]

log = logging.getLogger("mqpolicy.scheduler")

MIN_GAP_MS = 100
_DEFAULT_SETTINGS = SchedulerSettings()
# While one step keeps failing the same way, it is said again this often.
FAILURE_REMINDER_S = 300.0


@dataclass(slots=True)
class _FailureStreak:
    """Consecutive failures of one step with one error: logged at its start, its end."""

    step: str
    error: str
    count: int
    since: float
    logged: float


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class SchedulerStats:
    """Read by the metrics at scrape time; changed on the loop only."""

    active: bool = False  # holds the lease
    passes: int = 0
    errors: int = 0
    held_by_lane: dict[str, int] = field(default_factory=dict)
    released: Counter[str] = field(default_factory=Counter)  # by lane
    foreign: int = 0
    broken: int = 0
    waiting_lanes: frozenset[str] = frozenset()
    pass_latency: LatencyHistogram = field(default_factory=LatencyHistogram)


@dataclass
class PassReport:
    """What one pass did, with the time each step took (seconds)."""

    plan: ReleasePlan
    released: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    cleaned: int = 0
    budget_blocked: int = 0
    store_error: str = ""
    paused_lanes: frozenset[str] = frozenset()
    next_wake_ms: int = 0
    list_s: float = 0.0  # records + queue listing (and parsing)
    plan_s: float = 0.0  # join and plan
    budget_s: float = 0.0  # budget decisions
    release_s: float = 0.0  # MTA commands and record updates

    @property
    def overhead_s(self) -> float:
        """The scheduler's own work: listing, joining, deciding (not the releases)."""
        return self.list_s + self.plan_s + self.budget_s


class Scheduler:
    """Releases held mail for one MTA instance.

    ``service`` is the decision service whose policy (swapped on reload), counter store,
    destination groups and backoff factors the releases share with live decisions."""

    def __init__(
        self,
        service: DecisionService,
        records: HoldRecordStore,
        queue: MtaQueue,
        *,
        clock_ms: Callable[[], int] = _wall_clock_ms,
        owner: str | None = None,
    ) -> None:
        self.service = service
        self.records = records
        self.queue = queue
        self.clock_ms = clock_ms
        self.owner = owner or lease_owner_token()
        self.stats = SchedulerStats()
        self._load_high = False
        self._reported_broken: set[str] = set()
        self._last_overhead_ms = 0.0
        self._failing: _FailureStreak | None = None
        self._reconciled = False  # a pass has worked since the lease was acquired

    @property
    def policy(self) -> Policy:
        return self.service.policy

    @property
    def store(self) -> CounterStore:
        return self.service.store

    @property
    def settings(self) -> SchedulerSettings:
        return self.policy.scheduler or _DEFAULT_SETTINGS

    # ------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Hold the lease and run passes until ``stop`` is set; then give the lease up."""
        try:
            while not stop.is_set():
                wait_ms = await self._step()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_ms / 1000):
                        await stop.wait()
        finally:
            with contextlib.suppress(StoreError):
                if await self.records.release_lease(self.owner):
                    log.info("scheduler lease released", extra={"fields": self._where()})
            self.stats.active = False

    async def _step(self) -> int:
        """One turn of the loop: the lease, then a pass if we hold it. Returns the wait."""
        settings = self.settings
        try:
            holding = await self.records.acquire_lease(self.owner, settings.lock_ttl_ms)
        except StoreError as exc:
            self._failed("lease", exc)
            return settings.interval_ms
        if not holding:
            if self.stats.active:
                log.warning("scheduler lease lost to another scheduler",
                            extra={"fields": self._where()})
            self.stats.active = False
            return settings.interval_ms
        if not self.stats.active:
            self.stats.active = True
            self._reconciled = False
            log.info("scheduler lease acquired, reconciling", extra={"fields": self._where()})
        starting = not self._reconciled
        failures_before = self.stats.errors
        try:
            report = await self.run_pass()
        except (StoreError, QueueCommandError) as exc:
            self._failed("pass", exc)  # reconciled by the first pass that works
            return settings.interval_ms
        if self.stats.errors == failures_before:
            self._recovered()
        if starting:
            self._reconciled = True
            plan = report.plan
            log.info("reconciled", extra={"fields": {
                "finished_releases": len(plan.finished), "resumed_releases": len(plan.resume),
                "stale_records": len(plan.stale), "held": sum(plan.held_by_lane.values()),
                "foreign": len(plan.foreign), "broken": len(plan.broken)}})
        if log.isEnabledFor(logging.DEBUG):
            plan = report.plan
            log.debug("pass", extra={"fields": {
                "due": len(plan.due), "waiting": len(plan.waiting), "paused": len(plan.paused),
                "released": len(report.released), "budget_blocked": report.budget_blocked,
                "next_wake_ms": report.next_wake_ms,
                "took_ms": round((report.overhead_s + report.release_s) * 1000, 1)}})
        return report.next_wake_ms

    def _failed(self, what: str, exc: BaseException) -> None:
        """A step failed: said when a run of failures starts (or its error changes), then
        again every ``FAILURE_REMINDER_S`` while it lasts; :meth:`_recovered` says its end."""
        self.stats.errors += 1
        now = time.monotonic()
        error = str(exc)
        streak = self._failing
        if streak is not None and (streak.step, streak.error) == (what, error):
            streak.count += 1
            if now - streak.logged >= FAILURE_REMINDER_S:
                streak.logged = now
                log.warning("scheduler step still failing, retrying every interval",
                            extra={"fields": {"step": what, "error": error,
                                              "failures": streak.count,
                                              "since_s": round(now - streak.since)}})
            return
        self._failing = _FailureStreak(what, error, count=1, since=now, logged=now)
        log.warning("scheduler step failed, retrying next interval",
                    extra={"fields": {"step": what, "error": error}})

    def _recovered(self) -> None:
        """A pass without a failure ends a run of failures, and says so."""
        streak, self._failing = self._failing, None
        if streak is not None:
            log.info("scheduler step works again", extra={"fields": {
                "step": streak.step, "failures": streak.count,
                "after_s": round(time.monotonic() - streak.since, 1)}})

    def _where(self) -> dict[str, object]:
        return {"instance": self.queue.instance, "owner": self.owner}

    # ------------------------------------------------------------ one pass

    async def run_pass(self) -> PassReport:
        """List, plan, decide and release once (the caller holds the lease)."""
        policy = self.policy
        settings = policy.scheduler or _DEFAULT_SETTINGS
        started = time.perf_counter()
        records = await self.records.load()
        snapshot = await self.queue.snapshot()
        listed = time.perf_counter()

        now_ms = self.clock_ms()
        paused = await self._load(policy, settings, snapshot)
        runtime = self.service.runtime
        plan = plan_releases(snapshot.entries, records, now_ms=now_ms, lanes=policy.lanes,
                             paused_lanes=paused | frozenset(runtime.paused_lanes),
                             grace_ms=record_grace_ms(settings.interval_ms))
        planned = time.perf_counter()
        report = PassReport(plan=plan, paused_lanes=paused, list_s=listed - started,
                            plan_s=planned - listed)
        self._account(plan, snapshot)

        destinations = await self._destinations(policy, settings, plan,
                                                bool(runtime.paused_destinations))
        hold_paused_destinations(plan, runtime.paused_destinations, destinations)
        chosen, retry_ms = await self._decide(policy, settings, plan, now_ms, report,
                                              destinations)
        decided = time.perf_counter()
        report.budget_s = decided - planned

        report.cleaned = await self._clean(plan, records)
        await self._release(chosen, report)
        report.release_s = time.perf_counter() - decided
        held = self.stats.held_by_lane
        released = set(report.released)
        for candidate in chosen:
            if candidate.queue_id in released and held.get(candidate.record.lane):
                held[candidate.record.lane] -= 1

        self.stats.passes += 1
        overhead_ms = report.overhead_s * 1000
        self._last_overhead_ms = overhead_ms
        self.stats.pass_latency.observe(round(report.overhead_s * 1e9))
        report.next_wake_ms = self._next_wake(settings, plan, now_ms, retry_ms, chosen,
                                              len(plan.due))
        return report

    async def _load(self, policy: Policy, settings: SchedulerSettings,
                    snapshot: QueueSnapshot) -> frozenset[str]:
        high = load_exceeded(snapshot.counts, settings.load, self._load_high)
        if high != self._load_high:
            counts = {k: snapshot.counts.get(k, 0) for k in ("active", "incoming", "deferred")}
            log.warning("queue load high: lowest lanes wait" if high
                        else "queue load back to normal: lanes resume",
                        extra={"fields": counts})
            self._load_high = high
        paused = lanes_to_pause(policy.lanes, settings.load.hold_lanes) if high else frozenset()
        self.stats.waiting_lanes = paused
        try:
            await self.records.set_waiting_lanes(paused, max(15_000, 3 * settings.interval_ms))
        except StoreError as exc:
            self._failed("waiting_lanes", exc)
        return paused

    def _account(self, plan: ReleasePlan, snapshot: QueueSnapshot) -> None:
        stats = self.stats
        held = {lane.name: 0 for lane in self.policy.lanes}
        held.update(plan.held_by_lane)
        stats.held_by_lane = held
        stats.foreign = len(plan.foreign)
        stats.broken = len(plan.broken)
        for broken in plan.broken:
            if broken.queue_id not in self._reported_broken:
                self._reported_broken.add(broken.queue_id)
                log.error("held message with an unreadable record: not released",
                          extra={"fields": {"qid": broken.queue_id, "problem": broken.problem}})
        if len(self._reported_broken) > 10_000:
            self._reported_broken = {b.queue_id for b in plan.broken}
        for lane in sorted(plan.unknown_lanes):
            log.warning("held messages of a lane that is no longer configured: released last",
                        extra={"fields": {"lane": lane}})
        for problem in snapshot.problems:
            log.warning("unreadable queue listing line", extra={"fields": {"line": problem}})

    async def _destinations(self, policy: Policy, settings: SchedulerSettings,
                            plan: ReleasePlan, every: bool = False) -> dict[str, str]:
        """Destination groups of the due messages' recipient domains (as live decisions
        resolve them; cached by the decision service's finder): of those this pass may
        release, or of ``every`` due message (a destination is paused)."""
        if not policy.destinations:
            return {}
        domains: dict[str, str] = {}
        for candidate in (plan.due if every else plan.due[:settings.max_releases_per_pass * 4]):
            for recipient in candidate.entry.recipients:
                domain = domain_of(recipient)
                if domain and domain not in domains:
                    domains[domain] = await self.service.destination_of(domain, policy)
        return domains

    async def _decide(self, policy: Policy, settings: SchedulerSettings, plan: ReleasePlan,
                      now_ms: int, report: PassReport, destinations: dict[str, str],
                      ) -> tuple[list[Candidate], int | None]:
        """The messages to release this pass; plus the soonest budget refill (ms) seen.

        Decisions go to the store in windows of at most the pass's remaining room, all at
        once (a Redis store sends a window in one or two script calls; decisions are applied
        in order, each all-or-nothing). Lanes and buckets found spent in a window are left
        out of the next. Inside one window a lane never overtakes itself (its release checks
        all cost 1, so once one fails the later ones fail too); a smaller message may pass
        a larger one on a destination bucket the larger one did not fit."""
        backoff = self.service.runtime.backoff
        limit = settings.max_releases_per_pass
        chosen: list[Candidate] = list(plan.resume[:limit])
        report.resumed = [c.queue_id for c in chosen]
        blocked_lanes: set[str] = set()
        blocked_keys: set[str] = set()
        soonest: int | None = None
        evaluate = self.store.evaluate
        due = iter(plan.due)
        exhausted = False
        while len(chosen) < limit and not exhausted:
            window: list[tuple[Candidate, BudgetCheck | None, list[BudgetCheck]]] = []
            while len(chosen) + len(window) < limit:
                candidate = next(due, None)
                if candidate is None:
                    exhausted = True
                    break
                if candidate.record.lane in blocked_lanes:
                    continue
                lane_check, checks = release_checks(policy, candidate, settings.interval_ms,
                                                    destinations=destinations, backoff=backoff)
                if any(c.blocking and c.key in blocked_keys for c in checks):
                    continue
                if lane_check is not None:
                    checks = [lane_check, *checks]
                if not checks:
                    chosen.append(candidate)
                    continue
                window.append((candidate, lane_check, checks))
            if not window:
                break
            results = await asyncio.gather(*(evaluate(checks, now_ms) for _, _, checks in window),
                                           return_exceptions=True)
            failed: StoreError | None = None
            for (candidate, lane_check, checks), result in zip(window, results, strict=True):
                if isinstance(result, StoreError):
                    failed = result
                    continue
                if isinstance(result, BaseException):
                    raise result
                if result.committed:
                    chosen.append(candidate)
                    continue
                report.budget_blocked += 1
                for check, outcome in zip(checks, result.results, strict=True):
                    if outcome.allowed or not check.blocking:
                        continue
                    if check is lane_check:
                        blocked_lanes.add(candidate.record.lane)
                    else:
                        blocked_keys.add(check.key)
                    soonest = _soonest(soonest, check, outcome.retry_after_ms)
            if failed is not None:  # what did commit is released; nothing more this pass
                report.store_error = str(failed)
                self._failed("budgets", failed)
                break
        return chosen, soonest

    async def _clean(self, plan: ReleasePlan, records: RecordSet) -> int:
        gone = plan.finished + plan.stale
        if not gone:
            return 0
        removed = await self.records.delete(gone)
        for queue_id in plan.finished:
            log.info("release completed earlier, record removed",
                     extra={"fields": {"qid": queue_id}})
        for queue_id in plan.stale:
            record = records.records.get(queue_id)
            log.info("record of a message no longer on hold removed",
                     extra={"fields": {"qid": queue_id,
                                       "lane": record.lane if record else ""}})
        return removed

    async def _release(self, chosen: list[Candidate], report: PassReport) -> None:
        if not chosen:
            return
        by_id = {c.queue_id: c for c in chosen}
        ids = list(by_id)
        marked = await self.records.mark(ids, RecordState.RELEASING, self.clock_ms())
        if not marked:
            return
        try:
            released = await self.queue.release(marked)
        except QueueCommandError as exc:
            released = exc.released & set(marked)
            self._failed("release", exc)
        ordered = [q for q in marked if q in released]
        if ordered:
            try:
                await self.queue.deliver_now(ordered)
            except QueueCommandError as exc:  # released all the same: the next queue run
                self._failed("deliver_now", exc)
            await self.records.delete(ordered)
        now_ms = self.clock_ms()
        resumed = set(report.resumed)
        for queue_id in ordered:
            candidate = by_id[queue_id]
            record = candidate.record
            self.stats.released[record.lane] += 1
            log.info("released", extra={"fields": {
                "qid": queue_id, "lane": record.lane, "reason": record.reason,
                "held_s": round((now_ms - record.created_ms) / 1000, 1),
                "late_s": round(max(0, now_ms - record.not_before_ms) / 1000, 1),
                "resumed": "yes" if queue_id in resumed else "no"}})
        report.released = ordered

    def _next_wake(self, settings: SchedulerSettings, plan: ReleasePlan, now_ms: int,
                   retry_ms: int | None, chosen: list[Candidate], due: int) -> int:
        wake = settings.interval_ms
        if plan.waiting:
            wake = min(wake, plan.waiting[0].record.not_before_ms - now_ms)
        if retry_ms is not None:
            wake = min(wake, retry_ms)
        if len(chosen) >= settings.max_releases_per_pass and due > len(chosen):
            wake = 0  # more is due than one pass may release
        floor = min(settings.interval_ms, max(MIN_GAP_MS, round(2 * self._last_overhead_ms)))
        return max(floor, wake)


def _soonest(current: int | None, check: BudgetCheck, retry_ms: int) -> int | None:
    if retry_ms == NEVER:
        retry_ms = round(check.interval_ms * max(1, check.cost))
    return retry_ms if current is None else min(current, retry_ms)


def register_scheduler_metrics(registry: MetricsRegistry, scheduler: Scheduler) -> None:
    """Held messages and releases by lane, and the scheduler's own state."""
    stats = scheduler.stats
    registry.gauge(HELD_MESSAGES, "Messages held by mqpolicy in the MTA hold queue, by lane",
                   lambda: {(lane,): n for lane, n in stats.held_by_lane.items()},
                   labels=("lane",))
    registry.counter(RELEASES, "Held messages released by the scheduler, by lane",
                     lambda: {(lane,): n for lane, n in stats.released.items()},
                     labels=("lane",))
    registry.gauge("mqpolicy_held_foreign_messages",
                   "Messages on hold without an mqpolicy record (left alone)",
                   lambda: stats.foreign)
    registry.gauge("mqpolicy_held_broken_records",
                   "Messages on hold whose record cannot be read (reported, not released)",
                   lambda: stats.broken)
    registry.gauge("mqpolicy_scheduler_active",
                   "1 when this process holds the scheduler lease", lambda: int(stats.active))
    registry.gauge("mqpolicy_scheduler_waiting_lanes",
                   "1 for each lane waiting because the MTA's queues are swollen",
                   lambda: {(lane.name,): int(lane.name in stats.waiting_lanes)
                            for lane in scheduler.policy.lanes},
                   labels=("lane",))
    registry.counter("mqpolicy_scheduler_errors_total",
                     "Scheduler steps that failed (store or MTA command)", lambda: stats.errors)
    registry.histogram("mqpolicy_scheduler_pass_seconds",
                       "The scheduler's own work per pass: listing, joining, deciding",
                       stats.pass_latency.snapshot)


def open_mta_queue(settings: SchedulerSettings, *, through_agent: bool = True) -> MtaQueue:
    """The queue adapter ``scheduler.mta`` names. With ``scheduler.release_agent`` (and
    ``through_agent``), what needs root goes through ``mqpolicy release-agent``: the
    releases, and Sendmail's listing; Postfix's listing stays ``postqueue -j``, run here.
    ``through_agent=False`` is the agent's own: the MTA's commands run in this process."""
    direct: MtaQueue
    if settings.mta is MtaKind.SENDMAIL:
        from mqpolicy.scheduler.sendmail_queue import SendmailQueue  # noqa: PLC0415 - optional MTA

        direct = SendmailQueue(settings.sendmail_cf)
    else:
        direct = PostfixQueue(settings.postfix_config_dir)
    if settings.release_agent is None or not through_agent:
        return direct
    return AgentQueue(settings.release_agent, direct.instance,
                      direct if settings.mta is MtaKind.POSTFIX else None)


async def queue_summary(policy: Policy, records: HoldRecordStore, queue: MtaQueue,
                        runtime: RuntimeState = NO_RUNTIME,
                        destination_of: Callable[[str], Awaitable[str]] | None = None,
                        ) -> QueueSummary:
    """What ``mqpolicy queue`` shows: the records joined with the MTA's hold queue, per
    lane and destination (StoreError, QueueCommandError). ``runtime``: the pauses, whose
    held mail is counted as paused (``destination_of``: a recipient domain's destination,
    as decisions find it)."""
    settings = policy.scheduler or SchedulerSettings()
    record_set = await records.load()
    paused = await records.get_waiting_lanes()
    snapshot = await queue.snapshot()
    now = wall_clock_ms()
    plan = plan_releases(snapshot.entries, record_set, now_ms=now, lanes=policy.lanes,
                         paused_lanes=paused | frozenset(runtime.paused_lanes),
                         grace_ms=record_grace_ms(settings.interval_ms))
    if runtime.paused_destinations:
        found: dict[str, str] = {}
        for candidate in plan.due:
            for domain in {domain_of(r) for r in candidate.entry.recipients} - set(found):
                found[domain] = (await destination_of(domain) if destination_of is not None
                                 else domain)
        hold_paused_destinations(plan, runtime.paused_destinations, found)
    summary = summarize(plan, now, snapshot.counts, paused)
    summary.paused = [*(f"lane {d}" for _, d in sorted(runtime.paused_lanes.items())),
                      *(f"destination {d}"
                        for _, d in sorted(runtime.paused_destinations.items()))]
    return summary
