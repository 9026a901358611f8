"""The terms of a hold: when a message a verdict holds may leave, and the budgets it still
owes. Pure; both front-ends write them into the message's
:class:`~mqpolicy.store.hold_records.HoldRecord`, the scheduler keeps them."""

from __future__ import annotations

from mqpolicy.decision.engine import Verdict
from mqpolicy.store.hold_records import HeldSpend

__all__ = ["held_until", "unspent_budgets"]


def unspent_budgets(verdict: Verdict) -> tuple[HeldSpend, ...]:
    """What a message held at end of message owes: a held decision spends nothing (all or
    nothing), so every budget that would have counted it, had it been accepted, is spent
    when it is released. Empty for a hold that spent them (a lane or the load held it)."""
    return tuple(HeldSpend(o.name, o.key, o.cost) for o in verdict.limits
                 if o.cost > 0 and not o.spent)


def held_until(now_ms: int, verdict: Verdict) -> int:
    """The not-before time of a message ``verdict`` holds: when the deciding limit's budget
    admits it (GCRA's retry time); now for a lane or load hold, or a cost larger than the
    limit's burst (it never fits: the release spends the whole burst)."""
    return now_ms + max(0, verdict.retry_after_ms)
