"""The oracle of the store tests: the decision rules written out plainly over
:func:`~mqpolicy.store.budget.gcra_step`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from mqpolicy.store.budget import (
    DEFAULT_ONCE_TTL_MS,
    BudgetCheck,
    BudgetResult,
    Evaluation,
    gcra_step,
)


def free(check: BudgetCheck, tat: float, now: int) -> int:
    """Whole units free, counted relative to now, with the stores' rounding slack."""
    span = check.interval_ms * check.burst - (tat - now)
    return max(0, math.floor(span / check.interval_ms + (1e-9 + check.burst * 1e-12)))


class Reference:
    """The decision rules, written plainly over :func:`gcra_step`."""

    def __init__(self) -> None:
        self.tat: dict[str, float] = {}
        self.once: dict[str, int] = {}

    def current(self, key: str, now: int) -> float:
        tat = self.tat.get(key)
        return now if tat is None or tat < now else tat

    def evaluate(
        self,
        checks: Sequence[BudgetCheck],
        now: int,
        once_key: str | None = None,
        once_ttl_ms: int = DEFAULT_ONCE_TTL_MS,
    ) -> Evaluation:
        if once_key is not None and self.once.get(once_key, -1) > now:
            return Evaluation(
                tuple(
                    BudgetResult(True, free(c, self.current(c.key, now), now), 0) for c in checks
                ),
                committed=False,
                duplicate=True,
            )
        spent: dict[str, float] = {}
        last: dict[str, int] = {}
        outcomes = []
        for i, c in enumerate(checks):
            tat = spent.get(c.key, self.current(c.key, now))
            outcome = gcra_step(tat, now, c.interval_ms, c.burst, c.cost)
            if outcome.allowed and c.consume:
                spent[c.key] = outcome.new_tat_ms
                last[c.key] = i
            outcomes.append(outcome)
        committed = all(o.allowed or not c.blocking for c, o in zip(checks, outcomes, strict=True))
        results = []
        for i, (c, o) in enumerate(zip(checks, outcomes, strict=True)):
            if not committed:
                left = free(c, self.current(c.key, now), now)
            elif last.get(c.key) == i:
                left = o.remaining
            else:
                left = free(c, spent.get(c.key, self.current(c.key, now)), now)
            results.append(BudgetResult(o.allowed, left, o.retry_after_ms))
        if committed:
            self.tat.update(spent)
            if once_key is not None:
                self.once[once_key] = now + once_ttl_ms
        return Evaluation(tuple(results), committed)
