"""Backoff from delivery results: a destination that asks us to slow down gets a smaller
budget, and earns it back step by step. Pure: no I/O, no clock (times come in as ms).

Each destination has a ``factor`` in ``[min_factor, 1]`` that scales its budget
(:func:`scale_budget`: a unit costs ``1/factor`` times as much, the burst shrinks by
``factor``).

* A **slow-down** result multiplies the factor by ``decrease``, at most once per
  ``cooldown_ms``: the 50 deferrals of one throttling episode count once. Every slow-down
  (counted or not) also resets the run of successes.
* **Recovery** adds ``recover_step`` (up to 1) only after ``recover_after`` consecutive
  successes *and* ``recover_interval_ms`` since the last change and the last slow-down.
  After a step the count starts again, so recovery is a staircase, and a destination
  that mixes successes with slow-downs never climbs (no flapping).
* Results that are neither (a connection refused, a 550 for one mailbox) change nothing.

Every change comes back as a :class:`BackoffChange` with the old and new factor, the
reason and the evidence line, for the log. Times may arrive out of order (several
delivery agents, a replayed log): an event older than the last decrease is inside the
cooldown, and one older than the last change does not count towards recovery time.

The state of one destination is a small frozen :class:`BackoffState`, with
:meth:`BackoffState.to_dict` / :meth:`BackoffState.from_dict` for the store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from mqpolicy.policy.rates import slowed_unit

MAX_EVIDENCE = 2000
"""Evidence lines are cut to this many characters (a log line can be long)."""

_PRECISION = 6


@dataclass(frozen=True, slots=True)
class BackoffSettings:
    """How hard to back off and how carefully to recover. Invalid values raise
    :class:`ValueError` naming the setting."""

    decrease: float = 0.5
    min_factor: float = 0.05
    cooldown_ms: int = 60_000
    recover_step: float = 0.1
    recover_after: int = 20
    recover_interval_ms: int = 300_000

    def __post_init__(self) -> None:
        if not 0 < self.decrease < 1:
            raise ValueError(f"decrease must be between 0 and 1 (exclusive), got {self.decrease}")
        if not 0 < self.min_factor <= 1:
            raise ValueError(f"min_factor must be in (0, 1], got {self.min_factor}")
        if not 0 < self.recover_step <= 1:
            raise ValueError(f"recover_step must be in (0, 1], got {self.recover_step}")
        if isinstance(self.recover_after, bool) or self.recover_after < 1:
            raise ValueError(f"recover_after must be at least 1, got {self.recover_after}")
        if self.cooldown_ms < 0:
            raise ValueError(f"cooldown must not be negative, got {self.cooldown_ms} ms")
        if self.recover_interval_ms < 0:
            raise ValueError(
                f"recover_interval must not be negative, got {self.recover_interval_ms} ms"
            )


@dataclass(frozen=True, slots=True)
class BackoffState:
    """One destination's backoff. The default value is "not backed off"."""

    factor: float = 1.0
    successes: int = 0  # consecutive successes since the last change or slow-down
    last_decrease_ms: int | None = None
    last_change_ms: int | None = None
    last_slow_down_ms: int | None = None
    reason: str = ""  # of the last slow-down
    evidence: str = ""  # the log line of the last slow-down

    @property
    def backed_off(self) -> bool:
        return self.factor < 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "successes": self.successes,
            "last_decrease_ms": self.last_decrease_ms,
            "last_change_ms": self.last_change_ms,
            "last_slow_down_ms": self.last_slow_down_ms,
            "reason": self.reason,
            "evidence": self.evidence,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackoffState:
        """The state ``to_dict`` wrote. Raises :class:`ValueError` for what is not one."""
        try:
            factor = float(data.get("factor", 1.0))
            successes = int(data.get("successes", 0))
            times = [
                None if data.get(k) is None else int(data[k])
                for k in ("last_decrease_ms", "last_change_ms", "last_slow_down_ms")
            ]
            reason = str(data.get("reason", ""))
            evidence = str(data.get("evidence", ""))[:MAX_EVIDENCE]
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a backoff state: {exc}") from None
        if not (0 < factor <= 1) or math.isnan(factor) or successes < 0:
            raise ValueError(f"not a backoff state: factor={factor}, successes={successes}")
        return cls(factor, successes, times[0], times[1], times[2], reason, evidence)


@dataclass(frozen=True, slots=True)
class BackoffChange:
    """One change of a destination's factor, for the log."""

    destination: str
    kind: str  # "decrease" or "recover"
    old_factor: float
    new_factor: float
    reason: str
    evidence: str
    at_ms: int

    def log_fields(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "change": self.kind,
            "old_factor": self.old_factor,
            "new_factor": self.new_factor,
            "reason": self.reason,
            "evidence": self.evidence,
        }


def _since(now_ms: int, then_ms: int | None) -> float:
    """ms from ``then`` to ``now``; infinite when never; negative when out of order."""
    return math.inf if then_ms is None else now_ms - then_ms


def on_slow_down(
    state: BackoffState,
    settings: BackoffSettings,
    now_ms: int,
    reason: str,
    evidence: str = "",
    destination: str = "",
) -> tuple[BackoffState, BackoffChange | None]:
    """A result that means "slow down". Returns the new state and the change, if any."""
    evidence = evidence[:MAX_EVIDENCE]
    latest = now_ms if state.last_slow_down_ms is None else max(now_ms, state.last_slow_down_ms)
    noted = replace(state, successes=0, last_slow_down_ms=latest, reason=reason,
                    evidence=evidence)
    if _since(now_ms, state.last_decrease_ms) < settings.cooldown_ms:
        return noted, None
    new_factor = round(max(settings.min_factor, state.factor * settings.decrease), _PRECISION)
    if new_factor >= state.factor:  # already at the floor: the cooldown restarts
        return replace(noted, last_decrease_ms=now_ms), None
    change = BackoffChange(destination, "decrease", state.factor, new_factor, reason, evidence,
                           now_ms)
    return replace(noted, factor=new_factor, last_decrease_ms=now_ms,
                   last_change_ms=now_ms), change


def on_success(
    state: BackoffState,
    settings: BackoffSettings,
    now_ms: int,
    evidence: str = "",
    destination: str = "",
) -> tuple[BackoffState, BackoffChange | None]:
    """A delivered message. Returns the new state and the recovery step, if one is due."""
    if not state.backed_off:
        return (state if state.successes == 0 else replace(state, successes=0)), None
    successes = state.successes + 1
    due = (
        successes >= settings.recover_after
        and _since(now_ms, state.last_change_ms) >= settings.recover_interval_ms
        and _since(now_ms, state.last_slow_down_ms) >= settings.recover_interval_ms
    )
    if not due:
        return replace(state, successes=successes), None
    new_factor = round(min(1.0, state.factor + settings.recover_step), _PRECISION)
    reason = f"{successes} deliveries without a slow-down"
    change = BackoffChange(destination, "recover", state.factor, new_factor, reason,
                           evidence[:MAX_EVIDENCE], now_ms)
    if new_factor >= 1.0:
        return BackoffState(last_change_ms=now_ms), change
    return replace(state, factor=new_factor, successes=0, last_change_ms=now_ms), change


def scale_budget(unit: int, burst: int, factor: float) -> tuple[int, int]:
    """A budget (the tokens of one unit, :func:`mqpolicy.budget.bucket_scale`, and the
    burst) under backoff ``factor``: the rate times ``factor`` (a unit costs ``1/factor``
    times the tokens, exactly to within one token), the burst times ``factor`` (at least
    1). See :func:`mqpolicy.budget.slowed_unit`."""
    return slowed_unit(unit, burst, factor)

