"""What a budget must answer, written from the README's promise and nothing of the stores.

"``rate`` refills a bucket continuously, ``burst`` is its size, a budget of N admits exactly N
at one instant", plus the decision rules of ``mqpolicy.store.budget`` (all-or-nothing, once keys,
what ``remaining`` and ``retry_after_ms`` say) and what a clock that steps back does
(nothing is refilled, nothing is lost). Exact rational arithmetic (:class:`Fraction`): a
bucket is how many units it holds and since when, refilled ``count / period_ms`` units a ms
up to ``burst``. No scaled tokens, no gcd, no integer division tricks: the stores' own
arithmetic is what this checks.

A bucket's time moves only when it is spent (a read writes nothing, on either store), and
moves forward only: a decision at a ``now`` before it sees the bucket as it was at its time.
A full bucket is no bucket (the stores keep no key for it): it has no time of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

from mqpolicy.store.budget import NEVER, BudgetCheck, BudgetResult, Evaluation, budget_check


class RateCheck(NamedTuple):
    """A check as the promise states it: ``cost`` units of a bucket of ``burst`` units
    refilled at ``count`` every ``period_ms``."""

    key: str
    count: int
    period_ms: int
    burst: int
    cost: int
    consume: bool = True
    blocking: bool = True

    @property
    def rate(self) -> Fraction:
        """Units a ms."""
        return Fraction(self.count, self.period_ms)

    def for_store(self) -> BudgetCheck:
        return budget_check(self.key, self.count, self.period_ms, self.burst, self.cost,
                            self.consume, self.blocking)


@dataclass
class Oracle:
    """Buckets (units held, since when) and once keys (until when), as promised."""

    buckets: dict[str, tuple[Fraction, int]] = field(default_factory=dict)
    once: dict[str, int] = field(default_factory=dict)

    def held(self, check: RateCheck, now: int) -> tuple[Fraction, int]:
        """(units the bucket holds, the bucket's time) at ``now``."""
        state = self.buckets.get(check.key)
        if state is None:
            return Fraction(check.burst), now
        units, at = state
        if now <= at:  # the clock stepped back: nothing refilled, nothing lost
            return units, at
        return min(Fraction(check.burst), units + (now - at) * check.rate), now

    def evaluate(self, checks: Sequence[RateCheck], now: int, once_key: str | None = None,
                 once_ttl_ms: int = 1 << 50) -> Evaluation:
        if once_key is not None and self.once.get(once_key, -1) > now:
            return Evaluation(tuple(BudgetResult(True, math.floor(self.held(c, now)[0]), 0)
                                    for c in checks), committed=False, duplicate=True)
        original: dict[str, tuple[Fraction, int]] = {}
        current: dict[str, tuple[Fraction, int]] = {}
        last_spender: dict[str, int] = {}
        outcomes: list[tuple[bool, int, int]] = []  # allowed, own remaining, retry
        blocked = False
        for i, c in enumerate(checks):
            if c.key not in current:
                original[c.key] = current[c.key] = self.held(c, now)
            units, at = current[c.key]
            if c.cost > c.burst:
                outcomes.append((False, math.floor(units), NEVER))
                blocked = blocked or c.blocking
            elif c.cost <= units:
                if c.consume:
                    units -= c.cost
                    current[c.key] = (units, at)
                    last_spender[c.key] = i
                outcomes.append((True, math.floor(units), 0))
            else:
                # the first ms (of the callers' clock) at which the bucket holds the cost
                fits_at = at + math.ceil((c.cost - units) / c.rate)
                outcomes.append((False, math.floor(units), fits_at - now))
                blocked = blocked or c.blocking
        results = []
        for i, (c, (allowed, own, retry)) in enumerate(zip(checks, outcomes, strict=True)):
            if blocked:
                left = math.floor(original[c.key][0])
            elif last_spender.get(c.key) == i:
                left = own
            else:
                left = math.floor(current[c.key][0])
            results.append(BudgetResult(allowed, left, retry))
        if not blocked:
            for key in last_spender:
                if current[key][0] < checks[last_spender[key]].burst:
                    self.buckets[key] = current[key]
                else:
                    self.buckets.pop(key, None)
            if once_key is not None:
                self.once[once_key] = now + once_ttl_ms
        return Evaluation(tuple(results), committed=not blocked)
