"""The decision service: one engine plan, one store round trip, one verdict.

Shared by every front-end (policy server, milter, ``explain``). Owns the current policy
(swapped whole on reload), the store deadline and the failure contract: a store that
errs or misses its deadline yields ``evaluation=None`` and the engine applies each
limit's ``on_store_error``.

A decision that needs no I/O (the in-process memory store, a destination found without
DNS) is made synchronously by :meth:`DecisionService.decide_now`, which any thread may
call: the milter's threads decide there without a hand-off to the event loop. Both it and
:meth:`DecisionService.decide` go through one sequence of steps and differ only in how they
answer the two that need I/O (the recipient's destination, the store's evaluation).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any, Final, NamedTuple

from mqpolicy.daemon.outage_log import OutageLog
from mqpolicy.decision.engine import (
    NO_LIMITS_EVALUATION,
    NO_RUNTIME,
    Action,
    Plan,
    RuntimeState,
    Verdict,
    decide,
    make_plan,
)
from mqpolicy.decision.mx_resolver import DestinationFinder, MxResolver
from mqpolicy.metrics.instruments import BusiestKeys, LatencyHistogram
from mqpolicy.metrics.registry import Labels, MetricsRegistry
from mqpolicy.policy.model import Policy
from mqpolicy.policy.request import STAGE_END_OF_MESSAGE, Request, domain_of
from mqpolicy.store.budget import (
    BatchingStore,
    BoundedStore,
    CounterStore,
    DeadlineKeepingStore,
    Evaluation,
    InProcessStore,
    StoreError,
    StoreTimeout,
)

log = logging.getLogger("mqpolicy.decision")
store_log = logging.getLogger("mqpolicy.store")


def wall_clock_ms() -> int:
    """Milliseconds since the epoch: the clock shared by every process and host."""
    return time.time_ns() // 1_000_000


# (checks, now_ms, once_key, once_ttl_ms[, ledger_key]) -> Evaluation
_EvaluateNow = Callable[..., Evaluation]
"""``MemoryStore.evaluate_now``: a store's decision without I/O or coroutine."""


_ACCEPT: Final = Action.ACCEPT  # read once: an Enum's member costs a lookup each time


class _Destination(NamedTuple):
    """A decision's step that needs I/O: the destination of the recipient's ``domain``."""

    domain: str


_Steps = Generator[_Destination | Plan | Verdict, Any, None]
"""A decision's steps (:meth:`DecisionService._steps`): what needs I/O, then the verdict."""


def _verdict(steps: _Steps, step: _Destination | Plan | Verdict) -> Verdict:
    """The verdict a decision's ``steps`` yielded last (``step``); they are let end (cheaper
    than closing them half-way)."""
    if type(step) is not Verdict:
        raise TypeError(f"a decision ended on {type(step).__name__}, not its verdict")
    next(steps, None)
    return step


@dataclass
class DecisionStats:
    """Counters for metrics and ``top``, read at scrape time; changed under the service's
    lock (decisions come from the loop and from the milter's threads)."""

    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (action, lane)
    limits_hit: Counter[tuple[str, str]] = field(default_factory=Counter)  # (limit, action)
    store_errors: int = 0
    store_timeouts: int = 0
    decision_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    store_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    busiest: BusiestKeys = field(default_factory=BusiestKeys)  # limit keys found spent


class DecisionService:
    def __init__(
        self,
        policy: Policy,
        store: CounterStore,
        *,
        clock_ms: Callable[[], int] = wall_clock_ms,
        error_log_interval_s: float = 60.0,  # an outage's reminders
        deadline_ms: int | None = None,
        resolver: MxResolver | None = None,
    ) -> None:
        """``deadline_ms`` overrides the policy's ``store.timeout_ms`` (tools that run
        once, like ``explain``, may wait longer than a live decision). ``resolver`` finds
        the MX hosts of recipient domains for destinations matched by ``mx``; without
        one, destinations match by domain only."""
        self.policy = policy
        self.store = store
        self.clock_ms = clock_ms
        self._deadline_ms = deadline_ms
        # A store that answers without I/O (the memory store) cannot miss a deadline and
        # needs no coroutine: decide_now() uses it directly.
        self._evaluate_now: _EvaluateNow | None = (
            store.evaluate_now if isinstance(store, InProcessStore) and store.in_process else None)
        # A store that keeps the deadline itself (the Redis stores) needs no timer either.
        self._needs_deadline = (self._evaluate_now is None
                                and not isinstance(store, DeadlineKeepingStore))
        #: Held while ``stats`` changes (decisions come from the loop and from the milter's
        #: threads): readers that iterate its mappings hold it too.
        self.stats_lock = threading.Lock()
        self.resolver = resolver
        #: Backoff factors and waiting lanes from the store, refreshed by the front-end.
        self.runtime: RuntimeState = NO_RUNTIME
        self.stats = DecisionStats()
        self._destinations = DestinationFinder(resolver)
        self._outages = OutageLog(store_log, down="store unavailable, applying on_store_error",
                                  still="store still unavailable",
                                  up="store available again",
                                  count_field="answered_on_store_error",
                                  reminder_s=error_log_interval_s)

    def replace_policy(self, policy: Policy) -> None:
        """Swap the policy; decisions in flight finish with the one they started with."""
        self.policy = policy

    async def decide(self, request: Request, *, consume: bool = True,
                     account: bool = True, logged: bool = True) -> Verdict:
        """The verdict on ``request``; ``consume=False`` spends nothing. ``account=False``
        (``explain``: someone asks, no mail waits): neither counted in the stats nor logged
        as a decision. ``logged=False``: counted, and logged by the caller (the milter
        logs the action it took)."""
        if consume and account and self._evaluate_now is not None:
            verdict = self.decide_now(request, logged=logged)
            if verdict is not None:
                return verdict
        policy = self.policy
        steps = self._steps(request, policy, consume, account, logged)
        step = next(steps)
        if type(step) is _Destination:
            step = steps.send(await self.destination_of(step.domain, policy))
        if type(step) is Plan:
            timeout_ms = self._deadline_ms or policy.store.timeout_ms
            step = steps.send(await self._evaluate(step, timeout_ms))
        return _verdict(steps, step)

    def decide_now(self, request: Request, *, logged: bool = True) -> Verdict | None:
        """The decision, made synchronously, when it needs no I/O: an in-process store
        and a destination found without DNS. None: use :meth:`decide`. Any thread."""
        evaluate_now = self._evaluate_now
        if evaluate_now is None:
            return None
        policy = self.policy
        steps = self._steps(request, policy, True, True, logged)
        step = next(steps)
        if type(step) is _Destination:
            destination = self._destinations.find_now(step.domain, policy.destinations)
            if destination is None:
                return None  # it needs DNS: decide() looks it up on the loop
            step = steps.send(destination)
        if type(step) is Plan:
            try:
                evaluation: Evaluation | None = evaluate_now(
                    [p.check for p in step.limits], self.clock_ms(), step.once_key,
                    policy.store.once_ttl_ms, *((step.ledger_key,) if step.ledger_key else ()))
            except StoreError as exc:  # the memory store at its bound, every entry in use
                self._store_failed("store_errors", str(exc))
                evaluation = None
            step = steps.send(evaluation)
        return _verdict(steps, step)

    def _steps(self, request: Request, policy: Policy, consume: bool, account: bool,
               logged: bool = True) -> _Steps:
        """A decision, from the request to the verdict, whichever way its I/O is done: the
        one sequence :meth:`decide_now` and :meth:`decide` drive.

        It yields what needs I/O and is sent the answer: a :class:`_Destination` (sent the
        destination's name), then the plan when it has limits (sent the store's evaluation
        of its checks, None when the store failed); last, the verdict. :meth:`decide_now`
        answers on the calling thread, :meth:`decide` awaits the answers on the loop."""
        started = perf_counter_ns()
        if policy.destinations and request.recipient and not request.destination:
            request = request._replace(
                destination=(yield _Destination(domain_of(request.recipient))))
        plan = make_plan(request, policy, self.runtime)
        if not consume:
            plan = _dry(plan)
        evaluation: Evaluation | None = NO_LIMITS_EVALUATION
        store_ns: int | None = None
        if plan.limits:
            store_started = perf_counter_ns()
            evaluation = yield plan
            store_ns = perf_counter_ns() - store_started
            if evaluation is not None:
                self._outages.succeeded()
        verdict = decide(plan, evaluation, policy)
        if account:
            self._account(plan.request, verdict, perf_counter_ns() - started, store_ns,
                          logged)
        yield verdict

    async def destination_of(self, domain: str, policy: Policy | None = None) -> str:
        """The destination group of a recipient domain, else the domain itself. Never
        raises and never waits past the resolver's deadline (DNS trouble: the domain)."""
        return await self._destinations.find(domain, (policy or self.policy).destinations)

    async def _evaluate(self, plan: Plan, timeout_ms: int) -> Evaluation | None:
        checks = [p.check for p in plan.limits]
        try:
            answer = self.store.evaluate(checks, self.clock_ms(), plan.once_key,
                                         self.policy.store.once_ttl_ms,
                                         *((plan.ledger_key,) if plan.ledger_key else ()))
            if not self._needs_deadline:  # the store keeps it, or answers without I/O
                return await answer
            async with asyncio.timeout(timeout_ms / 1000):
                return await answer
        except TimeoutError:
            self._store_failed("store_timeouts", f"no answer within {timeout_ms} ms")
        except StoreTimeout as exc:  # a store that keeps the deadline itself
            self._store_failed("store_timeouts", str(exc))
        except StoreError as exc:
            self._store_failed("store_errors", str(exc))
        return None

    async def give_back(self, ledger: str) -> int:
        """Give back a message's ledger (:func:`~mqpolicy.decision.engine.ledger_key`): the
        RCPT spends of a message refused or held at its end. A store error is counted and
        logged; those spends then stay (they refill with time). How many were given."""
        given = self.give_back_now(ledger)
        if given is not None:
            return given
        try:
            return await self.store.give_back(ledger, self.clock_ms())
        except StoreError as exc:
            self._store_failed("store_errors", f"give-back: {exc}")
            return 0

    def give_back_now(self, ledger: str) -> int | None:
        """:meth:`give_back` on the calling thread when it needs no I/O (the memory
        store); None: use :meth:`give_back`."""
        store = self.store
        if not (isinstance(store, InProcessStore) and store.in_process):
            return None
        return store.give_back_now(ledger, self.clock_ms())

    async def move_ledger(self, ledger: str, to: str) -> None:
        """Keep a message's ledger under another key (wiring B: from the policy server's
        instance to the queue id the milter knows)."""
        try:
            await self.store.move_ledger(ledger, to)
        except StoreError as exc:
            self._store_failed("store_errors", f"ledger: {exc}")

    def _store_failed(self, counter: str, why: str) -> None:
        """Count (``store_errors`` or ``store_timeouts``); log an outage's start, its end
        at the next answer (how many decisions followed on_store_error, how long)."""
        with self.stats_lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self._outages.failed(why)

    def _account(self, request: Request, verdict: Verdict, decision_ns: int,
                 store_ns: int | None, logged: bool = True) -> None:
        stats = self.stats
        spoke = False  # a limit found spent
        with self.stats_lock:
            # _value_, not value: an Enum's value is a property, ten times slower to read
            stats.decisions[(verdict.action._value_, verdict.lane.name)] += 1
            for o in verdict.limits:
                if o.allowed:
                    continue
                spoke = True
                action = "monitor" if o.monitor else o.action.value
                stats.limits_hit[(o.name, action)] += 1
                stats.busiest.hit(o.name, action, o.key)
            stats.decision_latency.observe(decision_ns)
            if store_ns is not None:
                stats.store_latency.observe(store_ns)
        facts = self.policy.logged_headers  # log.decisions: all
        quiet = (
            facts is None
            and verdict.action is _ACCEPT
            and not spoke
            and not verdict.store_error
            and request.stage != STAGE_END_OF_MESSAGE
        )
        level = logging.DEBUG if quiet else logging.INFO
        if logged and log.isEnabledFor(level):
            log.log(level, "decision",
                    extra={"fields": decision_fields(request, verdict, facts)})


def decision_fields(request: Request, verdict: Verdict,
                    facts: frozenset[str] | None = None) -> dict[str, object]:
    """The fields of a decision's log line. ``facts`` (``log.decisions: all``, the
    policy's :attr:`~mqpolicy.policy.model.Policy.logged_headers`): also every other fact a
    policy can read, and those headers, so that ``mqpolicy replay`` can decide it again."""
    fields: dict[str, object] = {
        "stage": request.stage,
        "action": verdict.action.value,
        "lane": verdict.lane.name,
    }
    if request.queue_id:
        fields["qid"] = request.queue_id
    if request.instance:
        fields["instance"] = request.instance
    fields["sender"] = request.sender or "<>"
    if request.recipient:
        fields["rcpt"] = request.recipient
    if request.recipient_count:
        fields["nrcpt"] = request.recipient_count
    if request.client_address:
        fields["client"] = request.client_address
    if request.sasl_username:
        fields["user"] = request.sasl_username
    if verdict.rule:
        fields["rule"] = verdict.rule
    if verdict.demoted:
        fields["demoted_from"] = verdict.classified_lane.name
    if verdict.deciding:
        fields["by"] = verdict.deciding
    if verdict.retry_after_ms > 0:
        fields["retry_after_s"] = round(verdict.retry_after_ms / 1000, 1)
    if verdict.oversize:
        fields["reason"] = "oversize"
    if verdict.store_error:
        fields["store_error"] = "yes"
    if verdict.duplicate:
        fields["duplicate"] = "yes"
    hits = [
        f"{o.name}:{'monitor' if o.monitor else o.action.value}:{o.key}"
        for o in verdict.limits
        if not o.allowed
    ]
    if hits:
        fields["limits"] = ",".join(hits)
    if facts is not None:
        _add_facts(fields, request, facts)
    return fields


HEADER_VALUE_KEPT: Final = 256
"""The characters of a header's value a decision's line keeps (``log.decisions: all``)."""


def _add_facts(fields: dict[str, object], request: Request, headers: frozenset[str]) -> None:
    """The facts ``decision_fields`` leaves out, when the policy logs every decision;
    ``headers`` (the kept ones, as ``[[name, value], ...]`` in JSON) only when the
    front-end knew them (the milter), empty when none of ``headers`` was there."""
    if request.size:
        fields["size"] = request.size
    if request.client_name:
        fields["client_name"] = request.client_name
    if request.reverse_client_name and request.reverse_client_name != request.client_name:
        fields["reverse_client_name"] = request.reverse_client_name
    if request.helo_name:
        fields["helo"] = request.helo_name
    if request.protocol_name:
        fields["proto"] = request.protocol_name
    if request.headers is not None:
        fields["headers"] = json.dumps(
            [[name, value[:HEADER_VALUE_KEPT]] for name, value in request.headers
             if name.lower() in headers], ensure_ascii=False)


def _dry(plan: Plan) -> Plan:
    """The same plan, spending nothing (``explain`` without ``--consume``)."""
    limits = tuple(p._replace(check=p.check._replace(consume=False)) for p in plan.limits)
    return plan._replace(limits=limits, once_key=None, ledger_key=None)


# ---------------------------------------------------------------- metrics

_ACTIONS: Final = ("accept", "defer", "hold", "reject")
#: Busiest keys listed in ``/top.json`` (section ``busiest_keys``).
BUSIEST_SHOWN: Final = 50


def register_decision_metrics(registry: MetricsRegistry, service: DecisionService) -> None:
    def decisions() -> dict[Labels, int]:
        lanes = [lane.name for lane in service.policy.lanes]
        values: dict[Labels, int] = {(a, lane): 0 for lane in lanes for a in _ACTIONS}
        with service.stats_lock:  # the milter's threads count decisions too
            counted = list(service.stats.decisions.items())
        values.update(counted)
        return values

    def limit_hits() -> dict[Labels, int]:
        values: dict[Labels, int] = {
            (lim.name, "monitor" if lim.monitor else lim.action.value): 0
            for lim in service.policy.limits
        }
        with service.stats_lock:
            counted = list(service.stats.limits_hit.items())
        values.update(counted)
        return values

    stats = service.stats
    registry.counter("mqpolicy_decisions_total", "Decisions made, by action and final lane",
                     decisions, labels=("action", "lane"))
    registry.counter("mqpolicy_limit_hits_total",
                     "Limits found spent, by limit and action (monitor: dry run)",
                     limit_hits, labels=("limit", "action"))
    registry.histogram("mqpolicy_decision_seconds",
                       "Time to decide one request, store round trip included",
                       stats.decision_latency.snapshot)
    registry.histogram("mqpolicy_store_seconds",
                       "Time of one store round trip as a decision sees it (queueing included)",
                       stats.store_latency.snapshot)
    registry.counter("mqpolicy_store_errors_total",
                     "Store round trips that failed (on_store_error applied), by kind",
                     lambda: {("error",): stats.store_errors, ("timeout",): stats.store_timeouts},
                     labels=("kind",))
    registry.gauge("mqpolicy_lane_priority", "Priority of each configured lane (0 = highest)",
                   lambda: {(lane.name,): lane.priority for lane in service.policy.lanes},
                   labels=("lane",))
    registry.gauge("mqpolicy_busiest_keys_tracked",
                   "Limit keys tracked for the busiest-keys view (bounded)",
                   lambda: len(stats.busiest))
    def busiest_keys() -> list[dict[str, object]]:
        with service.stats_lock:
            top = stats.busiest.top(BUSIEST_SHOWN)
        return [h._asdict() for h in top]

    registry.json_section("busiest_keys", busiest_keys)


def register_store_metrics(registry: MetricsRegistry, store: CounterStore) -> None:
    """Batching counters of stores that have them (Redis); entries and evictions of the
    memory store."""
    if isinstance(store, BoundedStore):  # the memory store
        registry.gauge("mqpolicy_memory_store_entries",
                       "Buckets and once keys in the memory store (bound: store.max_entries)",
                       lambda: len(store))
        registry.counter("mqpolicy_memory_store_evictions_total",
                         "Entries dropped to make room at store.max_entries, by kind: full "
                         "(a bucket with no debt) or once (a message's counted-once mark)",
                         lambda: {("full",): store.evicted_full,
                                  ("once",): store.evicted_once},
                         labels=("kind",))
        registry.counter("mqpolicy_memory_store_refusals_total",
                         "Decisions refused because every entry left was a budget in use "
                         "(each limit followed its on_store_error)",
                         lambda: store.refused)
    if isinstance(store, BatchingStore):
        registry.counter("mqpolicy_store_batches_total",
                         "Batches sent to the store (one script call each)",
                         lambda: store.batches_sent)
        registry.counter("mqpolicy_store_batched_decisions_total",
                         "Decisions sent to the store inside batches",
                         lambda: store.decisions_sent)
