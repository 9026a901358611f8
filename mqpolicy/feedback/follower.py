"""Feedback from delivery results: follow the MTA's log, back destinations off and let
them recover. The I/O around three pure parts: :mod:`mqpolicy.feedback.delivery_log` (parsing and
the slow-down classifier), :mod:`mqpolicy.policy.backoff` (the controller) and the destination
rollup of :class:`~mqpolicy.decision.service.DecisionService`.

Only configured ``destinations`` are backed off: their budget is what a factor scales.
A slow-down from an unconfigured domain is logged at debug level and changes nothing.

Beside backoff, ``feedback.rules`` pause a configured destination when a deferred or
bounced result's DSN or reply matches (``{match: "TSS04|4\\.7\\.28", action: pause,
for: 2h}``): from the time of that line, for ``for``. A destination already paused (by an
operator or a rule) is left as it is: further matches do not extend the pause, so mail
retried from the MTA's deferred queue cannot keep it paused for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

from mqpolicy.feedback.delivery_log import DeliveryEvent, compile_patterns, parse_delivery_line
from mqpolicy.feedback.delivery_log import slow_down_reason as classify_reply
from mqpolicy.feedback.log_follower import LogFollower
from mqpolicy.policy.backoff import (
    MAX_EVIDENCE,
    BackoffChange,
    BackoffSettings,
    BackoffState,
    on_slow_down,
    on_success,
)
from mqpolicy.policy.model import FeedbackRule, FeedbackSettings, Policy
from mqpolicy.policy.pauses import Pause, one_line
from mqpolicy.store.backoff_states import BackoffStore
from mqpolicy.store.budget import StoreError

log = logging.getLogger("mqpolicy.feedback")

DestinationOf = Callable[[str], Awaitable[str]]
Step = Callable[[BackoffState], tuple[BackoffState, BackoffChange | None]]


@dataclass
class FeedbackStats:
    lines: int = 0
    results: int = 0
    slow_downs: int = 0
    changes: int = 0
    store_errors: int = 0
    pauses: int = 0  # destinations paused by a rule


class FeedbackService:
    """Reads delivery results and updates the shared backoff states."""

    def __init__(
        self,
        policy: Callable[[], Policy],
        store: BackoffStore,
        destination_of: DestinationOf,
        *,
        clock_ms: Callable[[], int],
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``on_change`` runs after every factor change, before it is logged (``serve``
        refreshes its decisions' view at once instead of at the next second)."""
        self._on_change = on_change
        self._policy = policy
        self._store = store
        self._destination_of = destination_of
        self._clock_ms = clock_ms
        self._backed_off: dict[str, float] = {}
        self.stats = FeedbackStats()

    @property
    def backed_off(self) -> dict[str, float]:
        """Destinations in backoff as this service last saw them (for metrics)."""
        return dict(self._backed_off)

    async def refresh(self) -> None:
        self._backed_off = await self._store.factors()

    async def handle_line(self, line: str) -> BackoffChange | None:
        """One log line: a change of some destination's factor, or None."""
        self.stats.lines += 1
        now = datetime.now(UTC).astimezone()
        event = parse_delivery_line(line, reference=now)
        if event is None or not event.recipient or event.suspended:
            return None
        if event.status not in ("sent", "deferred", "bounced"):
            return None
        self.stats.results += 1
        policy = self._policy()
        settings = policy.feedback or FeedbackSettings()
        destination = await self._destination_of(event.domain)
        if not any(d.name == destination for d in policy.destinations):
            if event.status != "sent" and _reason(event, settings) is not None:
                log.debug("slow-down from an unconfigured destination",
                          extra={"fields": {"destination": destination, "evidence": line}})
            return None
        at_ms = _event_ms(event, self._clock_ms())
        if settings.rules and event.status != "sent":
            await self.pause_by_rule(destination, event, settings.rules, at_ms)
        reason = _reason(event, settings)
        if reason is not None:
            self.stats.slow_downs += 1
            change = await self._update(destination, partial(
                on_slow_down, settings=settings.backoff, now_ms=at_ms, reason=reason,
                evidence=line, destination=destination))
        elif event.status == "sent" and destination in self._backed_off:
            change = await self._update(destination, partial(
                on_success, settings=settings.backoff, now_ms=at_ms, evidence=line,
                destination=destination))
        else:
            return None
        if change is not None:
            self.stats.changes += 1
            if change.new_factor < 1.0:
                self._backed_off[destination] = change.new_factor
            else:
                self._backed_off.pop(destination, None)
            if self._on_change is not None:
                await self._on_change()
            level = logging.WARNING if change.kind == "decrease" else logging.INFO
            log.log(level, "destination backed off" if change.kind == "decrease"
                    else "destination recovering", extra={"fields": change.log_fields()})
        return change

    async def pause_by_rule(self, destination: str, event: DeliveryEvent,
                            rules: tuple[FeedbackRule, ...], at_ms: int) -> Pause | None:
        """Pause ``destination`` by the first rule ``event`` matches; the pause, or None
        (no rule matched, the evidence is older than the rule's ``for``, the destination
        is paused already, or the store failed)."""
        text = f"{event.dsn} {event.detail or event.reply}"
        for rule in rules:
            if rule.destination is not None and rule.destination != destination:
                continue
            found = rule.match.search(text)
            if found is not None:
                break
        else:
            return None
        now = self._clock_ms()
        if at_ms + rule.for_ms <= now:
            return None  # old evidence (a log read again): its pause would be over
        evidence = event.line or text
        pause = Pause("destination", destination, at_ms, at_ms + rule.for_ms,
                      reason=one_line(found.group(0)),  # what the reply said; by: the rule
                      by=f"rule:{rule.match.pattern}", evidence=evidence[:MAX_EVIDENCE])
        try:
            if any(p.kind == "destination" and p.name == destination and p.active(now)
                   for p in await self._store.pauses()):
                return None
            await self._store.set_pause(pause)
        except StoreError as exc:
            self.stats.store_errors += 1
            log.warning("pause store unavailable, rule not applied",
                        extra={"fields": {"destination": destination, "error": str(exc)}})
            return None
        self.stats.pauses += 1
        if self._on_change is not None:
            await self._on_change()
        log.warning("destination paused by rule", extra={"fields": {
            "destination": destination, "rule": rule.match.pattern,
            "for_s": rule.for_ms // 1000, "until_ms": pause.until_ms, "evidence": evidence}})
        return pause

    async def _update(self, destination: str, step: Step) -> BackoffChange | None:
        try:
            return await self._store.update(destination, step)
        except StoreError as exc:
            self.stats.store_errors += 1
            log.warning("backoff store unavailable, result not recorded",
                        extra={"fields": {"destination": destination, "error": str(exc)}})
            return None

    async def run(self, stop: asyncio.Event, check_interval_s: float = 1.0) -> None:
        """Follow the log while the policy has a feedback section, until ``stop``; a reload
        that adds, changes or removes the section takes effect within ``check_interval_s``."""
        while not stop.is_set():
            settings = self._policy().feedback
            if settings is None:
                await _wait(stop, check_interval_s)
                continue
            inner = asyncio.Event()
            task = asyncio.create_task(self.follow(inner, settings))
            while not stop.is_set() and not task.done() and self._policy().feedback == settings:
                await _wait(stop, check_interval_s)
            inner.set()
            try:
                await task
            except Exception:
                log.exception("feedback stopped by an error; starting again")
                await _wait(stop, check_interval_s)

    async def follow(self, stop: asyncio.Event, settings: FeedbackSettings | None = None) -> None:
        """Follow the log of ``settings`` (default: the policy's) until ``stop`` is set."""
        settings = settings or self._policy().feedback or FeedbackSettings()
        follower = LogFollower(settings.log, state_path=settings.state_file,
                               poll_interval_s=settings.poll_interval_ms / 1000)
        log.info("following the delivery log", extra={"fields": {"log": settings.log}})
        with contextlib.suppress(StoreError):
            await self.refresh()
        batches = aiter(follower.batches())
        try:
            while not stop.is_set():
                next_batch = asyncio.ensure_future(anext(batches))
                stopper = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait({next_batch, stopper},
                                             return_when=asyncio.FIRST_COMPLETED)
                if next_batch not in done:
                    next_batch.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await next_batch
                    break
                stopper.cancel()
                for line in next_batch.result():
                    await self.handle_line(line)
        finally:
            closer = getattr(batches, "aclose", None)
            if closer is not None:
                await closer()  # the follower saves its position
            follower.close()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _reason(event: DeliveryEvent, settings: FeedbackSettings) -> str | None:
    patterns = _patterns(settings.slow_down_patterns)
    return classify_reply(event, patterns)


@functools.lru_cache(maxsize=8)
def _patterns(texts: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    """The operator's patterns, compiled once per policy (the config validated them)."""
    return compile_patterns(texts)


def _event_ms(event: DeliveryEvent, fallback_ms: int) -> int:
    if event.timestamp is None:
        return fallback_ms
    return int(event.timestamp.timestamp() * 1000)


__all__ = ["BackoffSettings", "FeedbackService", "FeedbackStats"]
