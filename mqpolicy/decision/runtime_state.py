"""Keeps a decision service's view of the shared runtime state fresh: destination backoff
factors (and, with the scheduler, the lanes that wait for the MTA's queues). Read about
once a second, so a decision never pays a store round trip for them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import MappingProxyType

from mqpolicy.decision.engine import RuntimeState
from mqpolicy.decision.mx_resolver import MxResolver
from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.destinations import needs_mx
from mqpolicy.policy.model import Policy
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
            factors = (MappingProxyType(await self._backoff.factors())
                       if self._backoff is not None else current.backoff)
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
        if dict(factors) != dict(current.backoff) or waiting != current.waiting_lanes:
            self._service.runtime = RuntimeState(factors, waiting)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)
