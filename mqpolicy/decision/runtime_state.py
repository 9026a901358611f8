"""Keeps a decision service's view of the shared runtime state fresh: destination backoff
factors, paused destinations and lanes (and, with the scheduler, the lanes that wait for
the MTA's queues). Read about once a second, so a decision never pays a store round trip
for them; a pause that runs out ends at the first read after its time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType

from mqpolicy.decision.engine import RuntimeState
from mqpolicy.decision.mx_resolver import MxResolver
from mqpolicy.decision.service import DecisionService
from mqpolicy.metrics.registry import (
    DESTINATION_BACKOFF_FACTOR,
    DESTINATION_PAUSED,
    LANE_PAUSED,
    MetricsRegistry,
)
from mqpolicy.policy.destinations import needs_mx
from mqpolicy.policy.model import Policy
from mqpolicy.policy.pauses import active_pauses
from mqpolicy.store.backoff_states import BackoffStore
from mqpolicy.store.budget import StoreError

log = logging.getLogger("mqpolicy.runtime")

WaitingLanes = Callable[[], Awaitable[frozenset[str]]]


def make_resolver(policy: Policy) -> MxResolver | None:
    """An MX resolver when some destination matches by MX, else None (no DNS at all)."""
    if not needs_mx([d.matcher for d in policy.destinations]):
        return None
    return MxResolver(nameservers=policy.dns.nameservers,
                      deadline_s=policy.dns.timeout_ms / 1000)


class RuntimeRefresher:
    def __init__(self, service: DecisionService, backoff: BackoffStore | None,
                 waiting_lanes: WaitingLanes | None = None, interval_s: float = 1.0) -> None:
        self._service = service
        self._backoff = backoff
        self._waiting_lanes = waiting_lanes
        self._interval_s = interval_s
        self._failing = False

    async def refresh(self) -> None:
        current = self._service.runtime
        try:
            factors: Mapping[str, float]
            paused_lanes: Mapping[str, str]
            paused_destinations: Mapping[str, str]
            if self._backoff is not None:
                states = await self._backoff.states()
                factors = MappingProxyType({name: state.factor for name, state in states.items()
                                            if state.factor < 1.0})
                lanes, destinations = active_pauses(await self._backoff.pauses(),
                                                    self._service.clock_ms())
                paused_lanes = MappingProxyType(lanes)
                paused_destinations = MappingProxyType(destinations)
            else:
                factors = current.backoff
                paused_lanes = current.paused_lanes
                paused_destinations = current.paused_destinations
            waiting = (await self._waiting_lanes() if self._waiting_lanes is not None
                       else current.waiting_lanes)
        except StoreError as exc:
            if not self._failing:
                log.warning("cannot read runtime state, keeping the last one",
                            extra={"fields": {"error": str(exc)}})
            self._failing = True
            return
        if self._failing:
            log.info("runtime state readable again")
        self._failing = False
        new = RuntimeState(factors, waiting, paused_lanes, paused_destinations)
        if _differs(new, current):
            _log_pauses(current, new)
            self._service.runtime = new

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)


def register_steering_metrics(registry: MetricsRegistry, service: DecisionService) -> None:
    """Backoff factors and pauses as this process applies them (its runtime state)."""
    def factors() -> dict[tuple[str, ...], float]:
        backoff = service.runtime.backoff
        return {(d.name,): backoff.get(d.name, 1.0) for d in service.policy.destinations}

    def paused_destinations() -> dict[tuple[str, ...], int]:
        paused = service.runtime.paused_destinations
        names = [d.name for d in service.policy.destinations]
        return {(name,): int(name in paused) for name in [*names, *sorted(set(paused) -
                                                                          set(names))]}

    def paused_lanes() -> dict[tuple[str, ...], int]:
        paused = service.runtime.paused_lanes
        return {(lane.name,): int(lane.name in paused) for lane in service.policy.lanes}

    registry.gauge(DESTINATION_BACKOFF_FACTOR, "Backoff factor of each destination's budget "
                   "(1: not backed off)", factors, labels=("destination",))
    registry.gauge(DESTINATION_PAUSED, "1 while a destination is paused (its mail held)",
                   paused_destinations, labels=("destination",))
    registry.gauge(LANE_PAUSED, "1 while a lane is paused (its mail held)", paused_lanes,
                   labels=("lane",))


def _differs(new: RuntimeState, old: RuntimeState) -> bool:
    return (dict(new.backoff) != dict(old.backoff) or new.waiting_lanes != old.waiting_lanes
            or dict(new.paused_lanes) != dict(old.paused_lanes)
            or dict(new.paused_destinations) != dict(old.paused_destinations))


def _log_pauses(old: RuntimeState, new: RuntimeState) -> None:
    for kind, before, after in (("lane", old.paused_lanes, new.paused_lanes),
                                ("destination", old.paused_destinations,
                                 new.paused_destinations)):
        for name in sorted(set(before) - set(after)):
            log.info("pause ended", extra={"fields": {kind: name}})
        for name in sorted(set(after) - set(before)):
            log.info("paused", extra={"fields": {kind: name, "pause": after[name]}})
