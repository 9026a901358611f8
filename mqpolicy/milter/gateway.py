"""The milter's way to the decisions: from libmilter's threads to the decision service.

Every decision is made by :class:`~mqpolicy.decision.service.DecisionService`, which lives
on ONE asyncio loop (in ``serve`` the loop of the policy server too). libmilter runs the
callbacks (:mod:`mqpolicy.milter.callbacks`) on its own threads. A decision that needs no I/O
(the embedded memory store) is made right there on the callback's thread; any other (Redis,
a destination found by MX) is handed to the loop and waited for at most ``milter.timeout``
(by default 50 ms above the store deadline). A decision that misses that deadline, a loop
that is gone and any exception in policy code become :class:`DecisionUnavailable`, logged
once per burst, and the callback applies the configured ``on_error`` action: a milter
callback never raises into libmilter. Hold records are written on the loop the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from dataclasses import dataclass, field

from mqpolicy.daemon.structured_log import LogBurst
from mqpolicy.decision.engine import Verdict
from mqpolicy.decision.service import DecisionService
from mqpolicy.metrics.registry import MetricsRegistry
from mqpolicy.policy.model import MilterSettings, Policy
from mqpolicy.policy.request import STAGE_END_OF_MESSAGE, Request
from mqpolicy.store.budget import StoreError
from mqpolicy.store.hold_records import HoldRecord, HoldRecordStore, record_ttl_for

__all__ = ["DecisionGateway", "DecisionUnavailable", "MilterCounters", "register_milter_metrics"]

log = logging.getLogger("mqpolicy.milter")

RECORD_WAIT_S = 2.0  # how long end of message waits for a hold record to be written


class DecisionUnavailable(Exception):
    """No verdict in time (deadline, loop gone, or an error in policy code)."""


@dataclass
class MilterCounters:
    """Monotonic counts (``messages_active`` and ``connections_active`` are gauges)."""

    connections_active: int = 0
    messages_active: int = 0
    decisions: int = 0
    failures: int = 0
    timeouts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    idle: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        self.idle.set()

    def add(self, name: str, delta: int = 1) -> None:
        with self.lock:
            value = getattr(self, name) + delta
            setattr(self, name, value)
            if name == "messages_active":
                if not value:
                    self.idle.set()
                elif value == delta:  # from none to some
                    self.idle.clear()


class DecisionGateway:
    """Decisions for libmilter's threads: made on the calling thread when they need no
    I/O, else handed to the loop that owns the DecisionService and waited for."""

    def __init__(
        self,
        service: DecisionService,
        loop: asyncio.AbstractEventLoop,
        settings: MilterSettings,
        records: HoldRecordStore | None = None,
    ) -> None:
        self.service = service
        self.loop = loop
        self.settings = settings
        self.records = records
        self.counters = MilterCounters()
        self._failure_log = LogBurst()

    @property
    def policy(self) -> Policy:
        """The policy in force (swapped whole on reload; reading it is atomic)."""
        return self.service.policy

    def decide(self, request: Request, *, logged: bool = True) -> Verdict:
        """The verdict, or :class:`DecisionUnavailable` after logging why.

        Made here, on libmilter's thread, when it needs no I/O (the memory store:
        :meth:`~mqpolicy.decision.service.DecisionService.decide_now`); else on the loop.
        ``logged=False``: the caller logs the decision (with the action it took)."""
        try:
            verdict = self.service.decide_now(request, logged=logged)
        except Exception as exc:
            self.failed(request.stage, f"{type(exc).__name__}: {exc}", exc)
            raise DecisionUnavailable(str(exc)) from exc
        if verdict is None:
            verdict = self._decide_on_loop(request, logged)
        self.counters.add("decisions")
        return verdict

    def _decide_on_loop(self, request: Request, logged: bool = True) -> Verdict:
        """Like ``asyncio.run_coroutine_threadsafe``, with one callback each way instead of
        two: a thread hand-off is most of what such a decision costs the milter."""
        future: concurrent.futures.Future[Verdict] = concurrent.futures.Future()
        tasks: list[asyncio.Task[Verdict]] = []
        try:
            self.loop.call_soon_threadsafe(self._start, request, future, tasks, logged)
        except RuntimeError as exc:  # the loop is closed or gone
            self.failed(request.stage, f"decision loop unavailable: {exc}")
            raise DecisionUnavailable(str(exc)) from None
        wait_s = self.settings.wait_s(self.service.policy.store.timeout_ms)
        try:
            verdict = future.result(timeout=wait_s)
        except concurrent.futures.TimeoutError:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._cancel, tasks)
            self.counters.add("timeouts")
            self.failed(request.stage, f"no decision within {round(wait_s * 1000)} ms")
            raise DecisionUnavailable("timeout") from None
        except concurrent.futures.CancelledError:
            self.failed(request.stage, "decision cancelled")
            raise DecisionUnavailable("cancelled") from None
        except Exception as exc:
            self.failed(request.stage, f"{type(exc).__name__}: {exc}", exc)
            raise DecisionUnavailable(str(exc)) from exc
        return verdict

    def give_back(self, ledger: str) -> None:
        """Give back a message's ledger (``DecisionService.give_back``): on this thread
        with the memory store, else on the loop, waited for like a decision."""
        if self.service.give_back_now(ledger) is not None:
            return
        future: concurrent.futures.Future[int] = concurrent.futures.Future()

        def start() -> None:  # on the loop: the coroutine is made only if still wanted
            if not future.set_running_or_notify_cancel():
                return
            task = self.loop.create_task(self.service.give_back(ledger))
            task.add_done_callback(
                lambda done: future.set_result(0 if done.cancelled() else done.result()))

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError as exc:
            self.failed(STAGE_END_OF_MESSAGE, f"give-back: loop unavailable: {exc}")
            return
        try:
            future.result(timeout=self.settings.wait_s(self.service.policy.store.timeout_ms))
        except concurrent.futures.TimeoutError:
            future.cancel()
            self.failed(STAGE_END_OF_MESSAGE, "give-back: no answer in time")

    def put_record(self, record: HoldRecord) -> bool:
        """Write a hold record on the loop; False (logged) when it could not be written."""
        records = self.records
        if records is None:
            return False
        policy = self.service.policy
        ttl = record_ttl_for(policy)
        try:
            future = asyncio.run_coroutine_threadsafe(records.put(record, ttl), self.loop)
        except RuntimeError as exc:
            self.failed(STAGE_END_OF_MESSAGE, f"hold record: loop unavailable: {exc}")
            return False
        try:
            future.result(timeout=max(RECORD_WAIT_S,
                                      self.settings.wait_s(policy.store.timeout_ms)))
        except concurrent.futures.TimeoutError:
            future.cancel()
            self.failed(STAGE_END_OF_MESSAGE, "hold record: no answer in time")
            return False
        except (StoreError, concurrent.futures.CancelledError) as exc:
            self.failed(STAGE_END_OF_MESSAGE, f"hold record: {exc}")
            return False
        return True

    def _start(self, request: Request, future: concurrent.futures.Future[Verdict],
               tasks: list[asyncio.Task[Verdict]], logged: bool = True) -> None:
        """On the loop: run the decision, hand its outcome to the waiting thread."""
        if not future.set_running_or_notify_cancel():
            return
        task = self.loop.create_task(self.service.decide(request, logged=logged))
        tasks.append(task)

        def done(task: asyncio.Task[Verdict]) -> None:
            if future.done():  # the milter gave up already
                return
            if task.cancelled():
                future.set_exception(concurrent.futures.CancelledError())
            elif (exc := task.exception()) is not None:
                future.set_exception(exc)
            else:
                future.set_result(task.result())

        task.add_done_callback(done)

    @staticmethod
    def _cancel(tasks: list[asyncio.Task[Verdict]]) -> None:
        for task in tasks:
            task.cancel()

    def failed(self, where: str, why: str, exc: BaseException | None = None) -> None:
        """Count and log (once per burst) a failure that applies ``on_error``."""
        self.counters.add("failures")
        suppressed = self._failure_log.take()
        if suppressed is None:
            return
        fields = {"stage": where, "error": why, "on_error": self.settings.on_error.value,
                  "suppressed": suppressed}
        log.warning("milter decision failed, applying on_error", extra={"fields": fields},
                    exc_info=exc)


def register_milter_metrics(registry: MetricsRegistry, counters: MilterCounters) -> None:
    registry.gauge("mqpolicy_milter_connections", "Open MTA connections to the milter",
                   lambda: counters.connections_active)
    registry.gauge("mqpolicy_milter_messages", "Messages the milter is in the middle of",
                   lambda: counters.messages_active)
    registry.counter("mqpolicy_milter_decisions_total", "Decisions the milter applied",
                     lambda: counters.decisions)
    registry.counter("mqpolicy_milter_failures_total",
                     "Milter steps that applied milter.on_error (no decision, or an error)",
                     lambda: counters.failures)
    registry.counter("mqpolicy_milter_timeouts_total",
                     "Milter decisions handed to the event loop that missed milter.timeout",
                     lambda: counters.timeouts)
