"""What ``mqpolicy destinations`` shows: every destination with its patterns, its budget and
backoff factor (the budget the server applies now), its pause, the last evidence line, and
the mail held for it; and ``destinations reset``, which ends a backoff.

Held mail is counted from the hold records (each record names its recipient domains; a
domain's destination is found as live decisions find it): a message with recipients at two
destinations counts at both. A destination that is not configured (a recipient domain that
was paused) has a row while it is paused or has held mail.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from mqpolicy.policy.backoff import BackoffState, scale_budget
from mqpolicy.policy.model import Policy
from mqpolicy.store.backoff_states import BackoffStore
from mqpolicy.store.hold_records import HoldRecord, HoldRecordStore

__all__ = ["DestinationRow", "destination_rows", "render_destinations", "reset_backoff"]

DestinationOf = Callable[[str], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class DestinationRow:
    name: str
    configured: bool
    domains: tuple[str, ...]
    mx: tuple[str, ...]
    rate: str  # as configured ("" when not configured)
    burst: int
    factor: float  # backoff: 1.0 = not backed off
    effective_burst: int  # the burst the server allows now (the factor applied)
    paused: bool
    paused_until_ms: int | None
    pause_reason: str
    paused_by: str
    backoff_reason: str  # the last slow-down's reason
    evidence: str  # the last evidence line (a rule's pause, else the last slow-down)
    held: int
    oldest_held_ms: int | None

    def as_json(self) -> dict[str, Any]:
        return {name: (list(value) if isinstance(value, tuple) else value)
                for name, value in ((f, getattr(self, f)) for f in self.__slots__)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DestinationRow:
        fields = {f: data[f] for f in cls.__slots__}
        fields["domains"] = tuple(fields["domains"])
        fields["mx"] = tuple(fields["mx"])
        return cls(**fields)


async def destination_rows(policy: Policy, backoff: BackoffStore,
                           records: HoldRecordStore | None, destination_of: DestinationOf,
                           now_ms: int) -> list[DestinationRow]:
    """Every destination: the configured ones in policy order, then others that are paused
    or have held mail (StoreError)."""
    states = await backoff.states()
    pauses = {p.name: p for p in await backoff.pauses()
              if p.kind == "destination" and p.active(now_ms)}
    held: dict[str, list[int]] = {}
    if records is not None:
        found: dict[str, str] = {}
        for record in (await records.load()).records.values():
            for name in await _destinations_of(record, destination_of, found):
                held.setdefault(name, []).append(record.created_ms)
    rows = []
    names = [d.name for d in policy.destinations]
    others = sorted((set(pauses) | set(held)) - set(names))
    for name in [*names, *others]:
        destination = next((d for d in policy.destinations if d.name == name), None)
        limit = policy.destination_limits.get(name)
        state = states.get(name, BackoffState())
        pause = pauses.get(name)
        times = held.get(name, [])
        burst = limit.burst if limit is not None else 0
        effective = (scale_budget(limit.unit, limit.burst, state.factor)[1]
                     if limit is not None and state.factor < 1.0 else burst)
        rows.append(DestinationRow(
            name=name, configured=destination is not None,
            domains=destination.matcher.domains if destination else (),
            mx=destination.matcher.mx if destination else (),
            rate=limit.rate_text if limit is not None else "", burst=burst,
            factor=state.factor, effective_burst=effective,
            paused=pause is not None,
            paused_until_ms=pause.until_ms if pause else None,
            pause_reason=pause.reason if pause else "", paused_by=pause.by if pause else "",
            backoff_reason=state.reason,
            evidence=(pause.evidence if pause and pause.evidence else state.evidence),
            held=len(times), oldest_held_ms=min(times) if times else None))
    return rows


async def _destinations_of(record: HoldRecord, destination_of: DestinationOf,
                           found: dict[str, str]) -> set[str]:
    names = set()
    for domain in record.destinations:
        if domain not in found:
            found[domain] = await destination_of(domain)
        names.add(found[domain])
    return names


async def reset_backoff(backoff: BackoffStore, name: str, now_ms: int) -> float:
    """End a destination's backoff (factor 1, the run of successes started again; the last
    reason and evidence kept); the factor it had."""
    def change(state: BackoffState) -> tuple[BackoffState, float]:
        return replace(state, factor=1.0, successes=0, last_change_ms=now_ms), state.factor

    return await backoff.update(name, change)


def _age(ms: int) -> str:
    seconds = max(0, ms) // 1000
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86_400:.1f}d"


def _stamp(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


def render_destinations(rows: list[DestinationRow], now_ms: int) -> str:
    """The text view: one block per destination."""
    if not rows:
        return "no destinations (the policy has no destinations: section, nothing paused)"
    out = []
    for row in rows:
        patterns = [*row.domains, *(f"mx {p}" for p in row.mx)]
        head = f"{row.name}: " + (", ".join(patterns) if patterns else "(a recipient domain)")
        lines = [head]
        if row.rate:
            budget = f"  budget {row.rate}, burst {row.burst}"
            if row.factor < 1.0:
                budget += (f"; backed off to {row.factor:g} (burst {row.effective_burst})"
                           + (f": {row.backoff_reason}" if row.backoff_reason else ""))
            lines.append(budget)
        if row.paused:
            until = ("until resumed" if row.paused_until_ms is None else
                     f"until {_stamp(row.paused_until_ms)} "
                     f"(in {_age(row.paused_until_ms - now_ms)})")
            lines.append(f"  PAUSED {until} by {row.paused_by}"
                         + (f": {row.pause_reason}" if row.pause_reason else ""))
        if row.held:
            oldest = now_ms - (row.oldest_held_ms or now_ms)
            lines.append(f"  held {row.held}, oldest {_age(oldest)} ago")
        if row.evidence:
            lines.append(f"  evidence: {row.evidence}")
        out.append("\n".join(lines))
    return "\n\n".join(out)
