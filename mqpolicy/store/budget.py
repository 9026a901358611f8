"""Rate budgets: the contract between the engine and the counter stores, and GCRA math.

A decision hands the store a list of :class:`BudgetCheck` and gets one :class:`Evaluation`
back from ONE atomic operation (one Lua call on Redis, one step under a lock in memory):

* every check is tested against its bucket at ``now_ms``;
* if any *blocking* check fails, nothing is spent (all-or-nothing);
* otherwise every check with ``consume`` that passed is spent; a failing non-blocking
  check (monitor, demote) is simply not spent;
* with a ``once_key``: if the key already exists, the message was already counted and
  nothing is tested or spent (``duplicate``); otherwise the key is set when the decision
  commits, so the next front-end that sees the same message does not count it again.

GCRA ("generic cell rate algorithm"): each key stores one number, the theoretical arrival
time ``tat`` in ms. ``interval_ms`` is the time one unit of budget takes to come back
(period / count); ``burst`` units may be spent at once. The Lua script
``lua/gcra_batch.lua`` implements exactly :func:`gcra_step`; both are tested by one suite.

Per-decision values are NamedTuples: immutable and about 3x cheaper to build than frozen
dataclasses, which matters at thousands of decisions per second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

NEVER = -1
"""``retry_after_ms`` when a cost can never fit in the bucket (cost larger than burst)."""

DEFAULT_ONCE_TTL_MS = 3_600_000
"""How long a once key lives. It only has to outlive the SMTP transaction: the policy
server's END-OF-MESSAGE and the milter's end of message for one message are seconds apart.
Longer costs memory (one key per message) and mistakes: Postfix's short queue ids are
reused over time, and a later message under a recycled id would pass as already counted."""


class StoreError(Exception):
    """A counter store could not answer (connection lost, timeout, script error)."""


class StoreTimeout(StoreError):
    """A counter store did not answer within its deadline."""


class BudgetCheck(NamedTuple):
    """One bucket to test (and maybe spend) in a decision."""

    key: str
    interval_ms: float
    burst: int
    cost: int
    consume: bool = True
    blocking: bool = True


class BudgetResult(NamedTuple):
    """What one check found. ``remaining`` is what is left after this decision."""

    allowed: bool
    remaining: int
    retry_after_ms: int = 0


class Evaluation(NamedTuple):
    results: tuple[BudgetResult, ...]
    committed: bool
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class BucketState:
    """A bucket as ``counters`` shows it."""

    key: str
    tat_ms: float
    ttl_ms: int


class GcraOutcome(NamedTuple):
    allowed: bool
    new_tat_ms: float
    remaining: int
    retry_after_ms: int


def whole_units(span_ms: float, interval_ms: float, burst: int) -> int:
    """How many whole units of ``interval_ms`` fit in ``span_ms`` (0 when none).

    ``span_ms`` is always computed relative to now (``tolerance - (tat - now)``, where
    ``tat - now`` is exact), never from epoch-ms values, whose rounding (0.24 ms near
    1.7e12) is larger than one unit of a fractional interval (50MB/1h: 0.072 ms per byte).
    What is left is the rounding of ``interval * burst`` and of the division, a few ulps
    of ``burst``: the slack is ``1e-9 + burst * 1e-12`` units, so a full bucket holds
    exactly ``burst``. ``lua/gcra_batch.lua`` has the same expression.
    """
    return max(0, math.floor(span_ms / interval_ms + (1e-9 + burst * 1e-12)))


def free_units(interval_ms: float, burst: int, tat_ms: float, now_ms: int) -> int:
    """Units a bucket holds at ``now_ms`` (``tat_ms`` already raised to at least ``now_ms``)."""
    return whole_units(interval_ms * burst - (tat_ms - now_ms), interval_ms, burst)


def gcra_step(
    tat_ms: float | None, now_ms: int, interval_ms: float, burst: int, cost: int
) -> GcraOutcome:
    """Test ``cost`` units against a bucket whose stored tat is ``tat_ms`` (None = empty).

    ``new_tat_ms`` is the tat to store if the caller decides to spend. ``remaining`` is
    counted relative to now (see :func:`whole_units`); ``allowed`` compares ``allow_at``
    with ``now_ms``.
    """
    tat = now_ms if tat_ms is None or tat_ms < now_ms else tat_ms
    tolerance = interval_ms * burst
    increment = interval_ms * cost
    new_tat = tat + increment
    allow_at = new_tat - tolerance
    free_ms = tolerance - (tat - now_ms)
    if increment > tolerance:
        return GcraOutcome(False, tat, whole_units(free_ms, interval_ms, burst), NEVER)
    if allow_at <= now_ms:
        left = whole_units(free_ms - increment, interval_ms, burst)
        return GcraOutcome(True, new_tat, left, 0)
    left = whole_units(free_ms, interval_ms, burst)
    return GcraOutcome(False, tat, left, max(1, math.ceil(allow_at - now_ms)))


def ttl_for(tat_ms: float, now_ms: int) -> int:
    """How long a key must live: until its bucket is full again (at least 1 ms)."""
    return max(1, math.ceil(tat_ms - now_ms))


class CounterStore(Protocol):
    """A place where budgets live. Implementations: memory, redis."""

    async def evaluate(
        self,
        checks: Sequence[BudgetCheck],
        now_ms: int,
        once_key: str | None = None,
        once_ttl_ms: int = DEFAULT_ONCE_TTL_MS,
    ) -> Evaluation:
        """Test and spend atomically, as described in this module's docstring."""
        ...

    async def inspect(self, keys: Sequence[str], now_ms: int) -> list[BucketState | None]:
        """The stored state of each key (None when absent or expired)."""
        ...

    async def scan(self, pattern: str, count: int = 1000) -> list[str]:
        """Keys (without the store's prefix) matching a glob ``pattern``, at most ``count``."""
        ...

    async def reset(self, keys: Sequence[str]) -> int:
        """Delete buckets; returns how many existed."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers."""
        ...

    async def close(self) -> None: ...
