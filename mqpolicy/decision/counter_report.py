"""What ``mqpolicy counters`` shows and resets, on any counter store: read from Redis by
the command itself, or from a memory:// store by the running server (its admin socket)
and printed by the command the same way."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from mqpolicy.decision.engine import store_key
from mqpolicy.policy.backoff import scale_budget
from mqpolicy.policy.model import Limit
from mqpolicy.store.budget import CounterStore

__all__ = ["CounterRow", "counter_rows", "render_counter_rows", "reset_budgets"]


class CounterRow(NamedTuple):
    """One bucket: what is left of the limit's burst for one key, and when it is full."""

    limit: str
    key: str
    remaining: int
    burst: int
    full_in_s: int | None  # None: no bucket (the key has its whole budget)

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> CounterRow:
        """A row from its JSON object (``_asdict()``); KeyError or TypeError otherwise."""
        full_in = row["full_in_s"]
        if full_in is not None and not isinstance(full_in, int):
            raise TypeError(f"full_in_s: {full_in!r}")
        return cls(str(row["limit"]), str(row["key"]), int(row["remaining"]),
                   int(row["burst"]), full_in)


_NO_BACKOFF: Mapping[str, float] = MappingProxyType({})


async def counter_rows(store: CounterStore, limits: Sequence[Limit], key: str | None,
                       maximum: int, now_ms: int,
                       backoff: Mapping[str, float] = _NO_BACKOFF) -> list[CounterRow]:
    """The buckets of ``limits`` in use (at most ``maximum`` per limit), or the one bucket
    of ``key`` of each (also when unused). A destination's budget is shown as decisions
    apply it now: scaled by its ``backoff`` factor (smaller burst, slower refill)."""
    rows: list[CounterRow] = []
    for limit in limits:
        unit, burst = limit.unit, limit.burst
        factor = backoff.get(limit.destination, 1.0) if limit.destination else 1.0
        if factor < 1.0:
            unit, burst = scale_budget(unit, burst, factor)
        keys = ([store_key(limit, key.lower())] if key
                else await store.scan(store_key(limit, "*"), count=maximum))
        states = await store.inspect(keys, now_ms)
        prefix = limit.bucket_prefix
        for k, state in zip(keys, states, strict=True):
            if state is None:
                if key:
                    rows.append(CounterRow(limit.name, k[len(prefix):], burst, burst, None))
                continue
            full_in_ms = state.full_at_ms(limit.refill, now_ms) - now_ms
            rows.append(CounterRow(limit.name, k[len(prefix):],
                                   state.free_units(limit.refill, unit, burst, now_ms),
                                   burst, math.ceil(full_in_ms / 1000)))
    return rows


def render_counter_rows(rows: Sequence[CounterRow]) -> str:
    lines = [f"{'limit':<24} {'key':<40} {'remaining':>10} {'burst':>8}  full in"]
    for row in rows:
        full_in = "(unused)" if row.full_in_s is None else f"{row.full_in_s}s"
        lines.append(f"{row.limit:<24} {row.key:<40} {row.remaining:>10} {row.burst:>8}  "
                     f"{full_in}")
    return "\n".join(lines)


async def reset_budgets(store: CounterStore, limit: Limit, key: str | None) -> int:
    """Give one key of ``limit`` (None: every key) its whole budget back; how many buckets
    there were."""
    keys = ([store_key(limit, key.lower())] if key is not None
            else await store.scan(store_key(limit, "*"), count=1_000_000))
    return await store.reset(keys) if keys else 0
