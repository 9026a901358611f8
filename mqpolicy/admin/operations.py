"""What ``serve`` answers on its admin socket (:mod:`mqpolicy.admin.server`): one handler
per operation, each working on the running server's own parts (its decision service,
store, backoff and runtime state, hold records, MTA queue), so that ``queue``,
``counters`` and ``explain`` see what the server sees when those live in its memory.

Operations (arguments; result):

* ``counters.show`` (``limit``, ``key``, ``max``, each optional; ``{"rows": [...]}``,
  the rows of :class:`~mqpolicy.decision.counter_report.CounterRow`);
* ``counters.reset`` (``limit``, and ``key`` or ``all: true``; ``{"limit", "reset"}``);
* ``explain`` (``request``: the ``name=value`` lines, ``consume``; the
  :class:`~mqpolicy.delegation.explanation.Explanation`), decided by the server's own decision path;
* ``queue`` (none; the :class:`~mqpolicy.scheduler.planner.QueueSummary` of the records
  this server holds joined with the MTA's hold queue);
* ``pause`` (``kind``: destination or lane, ``name``, ``for_ms`` and ``reason`` optional;
  the stored :class:`~mqpolicy.policy.pauses.Pause` as a dict), in effect at once;
* ``resume`` (``kind``, ``name``; ``{"resumed": the pause that ended, or null}``);
* ``pauses`` (none; ``{"pauses": [...]}``, every stored pause, with ``now_ms``);
* ``destinations`` (none; ``{"now_ms", "destinations": [...]}``, the rows of
  :class:`~mqpolicy.decision.destination_report.DestinationRow`);
* ``destinations.reset`` (``name``; ``{"name", "old_factor"}``): ends a backoff.

A new operation is a method here and one entry in :meth:`AdminOperations.handlers`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from mqpolicy.admin.codec import BadArguments, OperationFailed
from mqpolicy.admin.server import AdminHandler
from mqpolicy.decision.counter_report import counter_rows, reset_budgets
from mqpolicy.decision.destination_report import destination_rows, reset_backoff
from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.codec import PolicyProtocolError
from mqpolicy.delegation.explanation import explain, parse_request_text
from mqpolicy.policy.model import Limit
from mqpolicy.policy.pauses import KINDS, new_pause, pause_target_problem
from mqpolicy.policy.request import Request
from mqpolicy.scheduler.mta_queue import MtaQueue, QueueCommandError
from mqpolicy.scheduler.scheduler import queue_summary
from mqpolicy.store.backoff_states import BackoffStore
from mqpolicy.store.budget import StoreError
from mqpolicy.store.hold_records import HoldRecordStore

__all__ = ["AdminOperations"]

T = TypeVar("T")

_DEFAULT_MAX_KEYS = 1000


class AdminOperations:
    """The operations of one ``serve`` process. ``queue``: the MTA's queue the records
    describe (the scheduler's, when serve runs one)."""

    def __init__(self, service: DecisionService, records: HoldRecordStore | None,
                 queue: MtaQueue, backoff: BackoffStore | None = None,
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        """``backoff``: where backoff states and pauses live; ``refresh``: brings the
        decision service's runtime state up to date after a pause or resume."""
        self.service = service
        self.records = records
        self.mta_queue = queue
        self.backoff = backoff
        self.refresh = refresh

    def handlers(self) -> dict[str, AdminHandler]:
        return {
            "counters.show": self.counters_show,
            "counters.reset": self.counters_reset,
            "explain": self.explain,
            "queue": self.queue,
            "pause": self.pause,
            "resume": self.resume,
            "pauses": self.pauses,
            "destinations": self.destinations,
            "destinations.reset": self.destinations_reset,
        }

    async def counters_show(self, args: Mapping[str, Any]) -> object:
        _only(args, {"limit", "key", "max"})
        name = _optional(args, "limit", str)
        limits = [self._limit(name)] if name is not None else list(self.service.policy.limits)
        key = _optional(args, "key", str)
        maximum = _optional(args, "max", int)
        if maximum is not None and maximum < 0:
            raise BadArguments("max: a number of keys, 0 or more")
        store = self.service.store
        try:
            rows = await counter_rows(store, limits, key, _DEFAULT_MAX_KEYS
                                      if maximum is None else maximum, self.service.clock_ms(),
                                      self.service.runtime.backoff)
        except StoreError as exc:
            raise OperationFailed(f"store error: {exc}") from None
        return {"rows": [row._asdict() for row in rows]}

    async def counters_reset(self, args: Mapping[str, Any]) -> object:
        _only(args, {"limit", "key", "all"})
        name = _optional(args, "limit", str)
        if name is None:
            raise BadArguments("limit: the limit whose budgets are reset")
        limit = self._limit(name)
        key = _optional(args, "key", str)
        every = _optional(args, "all", bool) or False
        if (key is None) == (not every):
            raise BadArguments("give key (one key's budget) or all: true (every key's)")
        try:
            removed = await reset_budgets(self.service.store, limit, None if every else key)
        except StoreError as exc:
            raise OperationFailed(f"store error: {exc}") from None
        return {"limit": limit.name, "reset": removed}

    async def explain(self, args: Mapping[str, Any]) -> object:
        _only(args, {"request", "consume"})
        text = _optional(args, "request", str)
        if text is None:
            raise BadArguments("request: the request's name=value lines")
        try:
            attrs = parse_request_text(text)
        except PolicyProtocolError as exc:
            raise BadArguments(f"malformed request: {exc}") from None
        consume = _optional(args, "consume", bool) or False
        explanation = await explain(self.service, Request.from_policy_attributes(attrs),
                                    consume)
        return explanation.as_json()

    async def queue(self, args: Mapping[str, Any]) -> object:
        _only(args, set())
        if self.records is None:
            raise OperationFailed("this server keeps no hold records")
        try:
            summary = await queue_summary(self.service.policy, self.records, self.mta_queue,
                                          self.service.runtime, self.service.destination_of)
        except (StoreError, QueueCommandError) as exc:
            raise OperationFailed(str(exc)) from None
        return summary.as_json()

    async def pause(self, args: Mapping[str, Any]) -> object:
        _only(args, {"kind", "name", "for_ms", "reason"})
        kind, name = self._target(args)
        for_ms = _optional(args, "for_ms", int)
        if for_ms is not None and for_ms <= 0:
            raise BadArguments("for_ms: a duration in ms, more than 0")
        pause = new_pause(kind, name, self.service.clock_ms(), for_ms,
                          _optional(args, "reason", str) or "")
        store = self._pauses()
        try:
            await store.set_pause(pause)
            if self.refresh is not None:
                await self.refresh()
        except StoreError as exc:
            raise OperationFailed(f"store error: {exc}") from None
        return pause.to_dict()

    async def resume(self, args: Mapping[str, Any]) -> object:
        _only(args, {"kind", "name"})
        kind, name = self._target(args, known=False)
        store = self._pauses()
        try:
            ended = await store.clear_pause(kind, name)
            if self.refresh is not None:
                await self.refresh()
        except StoreError as exc:
            raise OperationFailed(f"store error: {exc}") from None
        return {"resumed": ended.to_dict() if ended is not None else None}

    async def pauses(self, args: Mapping[str, Any]) -> object:
        _only(args, set())
        try:
            stored = await self._pauses().pauses()
        except StoreError as exc:
            raise OperationFailed(f"store error: {exc}") from None
        return {"now_ms": self.service.clock_ms(), "pauses": [p.to_dict() for p in stored]}

    async def destinations(self, args: Mapping[str, Any]) -> object:
        _only(args, set())
        now = self.service.clock_ms()
        try:
            rows = await destination_rows(self.service.policy, self._pauses(), self.records,
                                          self.service.destination_of, now)
        except StoreError as exc:
            raise OperationFailed(f"store error: {exc}") from None
        return {"now_ms": now, "destinations": [row.as_json() for row in rows]}

    async def destinations_reset(self, args: Mapping[str, Any]) -> object:
        _only(args, {"name"})
        name = _optional(args, "name", str)
        names = [d.name for d in self.service.policy.destinations]
        if name not in names:
            raise BadArguments(f"no destination named {name!r} "
                               f"(destinations: {', '.join(names) or 'none'})")
        try:
            old = await reset_backoff(self._pauses(), name, self.service.clock_ms())
            if self.refresh is not None:
                await self.refresh()
        except StoreError as exc:
            raise OperationFailed(f"store error: {exc}") from None
        return {"name": name, "old_factor": old}

    def _pauses(self) -> BackoffStore:
        if self.backoff is None:
            raise OperationFailed("this server keeps no pauses")
        return self.backoff

    def _target(self, args: Mapping[str, Any], known: bool = True) -> tuple[Any, str]:
        kind = _optional(args, "kind", str)
        name = _optional(args, "name", str)
        if kind not in KINDS or not name:
            raise BadArguments("kind: destination or lane, and name")
        policy = self.service.policy
        problem = pause_target_problem(kind, name, (lane.name for lane in policy.lanes),
                                       (d.name for d in policy.destinations))
        if problem is not None and known:
            raise BadArguments(problem)
        return kind, name

    def _limit(self, name: str) -> Limit:
        limits = self.service.policy.limits
        for limit in limits:
            if limit.name == name:
                return limit
        raise BadArguments(f"no limit named {name!r} "
                           f"(limits: {', '.join(sorted(x.name for x in limits))})")


def _only(args: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise BadArguments(f"unknown argument(s) {', '.join(map(repr, unknown))} (this "
                           f"operation takes {', '.join(sorted(allowed)) or 'none'})")


def _optional(args: Mapping[str, Any], name: str, kind: type[T]) -> T | None:
    """``args[name]`` when it is a ``kind`` (None: absent or null); BadArguments else."""
    value = args.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadArguments(f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value
