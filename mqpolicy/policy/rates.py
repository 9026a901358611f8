"""Parsing of rates (``300/1m``), durations (``90s``) and sizes (``10MB``). Pure."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_UNITS_MS = {
    "ms": 1,
    "s": 1000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
    "w": 604_800_000,
}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


class RateSyntaxError(ValueError):
    """A rate, duration or size that cannot be parsed."""


def parse_duration_ms(text: str | int | float, *, default_unit: str = "s") -> int:
    """``90s`` / ``5m`` / ``1.5h`` / ``250ms`` / a bare number in ``default_unit``."""
    if isinstance(text, bool):
        raise RateSyntaxError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        value, unit = float(text), default_unit
    else:
        m = _DURATION.match(text)
        if not m:
            raise RateSyntaxError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h, 1d)")
        value, unit = float(m.group(1)), (m.group(2) or default_unit).lower()
    ms = round(value * _UNITS_MS[unit])
    if ms < 0:
        raise RateSyntaxError(f"negative duration: {text!r}")
    return ms


def parse_size(text: str | int) -> int:
    """``10MB`` / ``512KiB`` / ``1000``: a byte count."""
    if isinstance(text, bool):
        raise RateSyntaxError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise RateSyntaxError(f"negative size: {text}")
        return text
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise RateSyntaxError(f"not a size: {text!r} (use e.g. 5000, 10MB, 512KiB)")
    return round(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` units every ``period_ms``."""

    count: int
    period_ms: int

    @property
    def interval_ms(self) -> float:
        return self.period_ms / self.count

    def __str__(self) -> str:
        for unit in ("w", "d", "h", "m", "s"):
            size = _UNITS_MS[unit]
            if self.period_ms % size == 0:
                return f"{self.count}/{self.period_ms // size}{unit}"
        return f"{self.count}/{self.period_ms}ms"


def parse_rate(text: str) -> Rate:
    """``300/1m``, ``5/s``, ``50MB/1h`` (sizes for byte budgets), ``1000/1d``."""
    if not isinstance(text, str) or "/" not in text:
        raise RateSyntaxError(f"not a rate: {text!r} (use COUNT/PERIOD, e.g. 300/1m)")
    count_text, _, period_text = text.partition("/")
    try:
        count = parse_size(count_text.strip())
    except RateSyntaxError:
        raise RateSyntaxError(f"bad count in rate {text!r}") from None
    period_text = period_text.strip()
    if period_text and period_text[0].isalpha():
        period_text = "1" + period_text
    try:
        period_ms = parse_duration_ms(period_text)
    except RateSyntaxError:
        raise RateSyntaxError(f"bad period in rate {text!r} (e.g. 1s, 5m, 1h, 1d)") from None
    if count <= 0:
        raise RateSyntaxError(f"rate count must be positive: {text!r}")
    if period_ms <= 0:
        raise RateSyntaxError(f"rate period must be positive: {text!r}")
    return Rate(count, period_ms)


# ---------------------------------------------------------------- exact counting
# A rate as integers (store/budget.py counts buckets with them; the loader refuses a
# limit that cannot be counted exactly).

EXACT_LIMIT = 1 << 52
"""The largest scaled quantity a bucket may use: its capacity (``burst * unit``) and its
refill per ms. Below 2**52, a sum of two of them is still an exact integer in a double."""

BUCKET_VERSION = "v2"
"""Part of every bucket key: the arithmetic those buckets are counted with (v1 was GCRA on
epoch milliseconds in doubles). A new arithmetic takes a new version: fresh buckets."""

SCALE_PRECISION = 1_000_000
"""A bucket's unit is made at least this many tokens when the limits allow (the factor
``k`` of :func:`bucket_scale`), so that a destination's budget slowed by a backoff factor
(:func:`slowed_unit`, six decimals) keeps that precision. Part of the arithmetic: a
change needs a new :data:`BUCKET_VERSION`."""

DEFAULT_ONCE_TTL_MS = 600_000
"""How long a once key lives: 10 minutes. It only has to outlive the time between the
front-ends that see one message: the policy server's END-OF-MESSAGE and the milter's end
of message come seconds apart, and Postfix's longest default wait between them is a
milter's content step (``milter_content_timeout``, 300 s) or two tries of a policy request
(``smtpd_policy_service_timeout``, 100 s, tried twice): 10 minutes is twice the longest.
Longer costs memory (one key per message) and mistakes: Postfix's short queue ids are
reused over time, and a later message under a recycled id would pass as already counted.
Operators who raise those Postfix timeouts set ``store.once_ttl`` to match."""

def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, ``b > 0``."""
    return -(-a // b)


def reduced_rate(count: int, period_ms: int) -> tuple[int, int]:
    """``count / period_ms`` in lowest terms: ``(n, p)``."""
    g = math.gcd(count, period_ms)
    return count // g, period_ms // g


def largest_burst(count: int, period_ms: int) -> int:
    """The largest burst a rate can be counted exactly with."""
    return EXACT_LIMIT // reduced_rate(count, period_ms)[1]


def exactness_problem(count: int, period_ms: int, burst: int,
                      rate_text: str | None = None) -> str | None:
    """Why ``count`` units every ``period_ms`` with ``burst`` cannot be counted exactly
    (what ``mqpolicy check`` says, the rate written ``rate_text``), or None when it can."""
    n, p = reduced_rate(count, period_ms)
    rate = rate_text or f"{count}/{period_ms}ms"
    if n > EXACT_LIMIT:
        return (f"rate {rate} is too fine to count exactly: its count over "
                f"gcd(count, period in ms) is {n}, at most {EXACT_LIMIT} is allowed "
                f"(use a longer period, e.g. {count}/{period_ms * (n // EXACT_LIMIT + 1)}ms)")
    if burst * p > EXACT_LIMIT:
        return (f"burst {burst} with rate {rate} is too large to count exactly: burst x "
                f"{p} (the period in ms over gcd(count, period in ms)) must be at most "
                f"{EXACT_LIMIT}; the largest burst for this rate is {EXACT_LIMIT // p}, or "
                f"keep the burst with a rate whose reduced period is at most "
                f"{EXACT_LIMIT // burst} ms")
    return None


def bucket_scale(count: int, period_ms: int, burst: int) -> tuple[int, int]:
    """``(refill, unit)`` of a bucket of ``burst`` units refilled at ``count / period_ms``:
    the rate in lowest terms ``n / p`` times a factor ``k >= 1``, the largest up to
    ``ceil(SCALE_PRECISION / p)`` that keeps ``burst * p * k`` and ``n * k`` within
    :data:`EXACT_LIMIT`. ValueError when even ``k = 1`` does not fit
    (:func:`exactness_problem`)."""
    problem = exactness_problem(count, period_ms, burst)
    if problem is not None:
        raise ValueError(problem)
    n, p = reduced_rate(count, period_ms)
    k = min(ceil_div(SCALE_PRECISION, p), EXACT_LIMIT // (max(burst, 1) * p), EXACT_LIMIT // n)
    k = max(k, 1)
    return n * k, p * k


def slowed_unit(unit: int, burst: int, factor: float) -> tuple[int, int]:
    """``(unit, burst)`` of a bucket slowed by a backoff ``factor`` in (0, 1] (six
    decimals): each unit costs ``ceil(unit / factor)`` tokens, so the rate is at most
    ``factor`` times the limit's (to within one token in ``unit``); the burst is
    ``floor(burst * factor)``, at least 1. The refill per ms is unchanged, so the bucket's
    stored debt keeps its meaning (its backlog in time). A unit that would take the
    capacity past :data:`EXACT_LIMIT` is capped there (the slowest rate counted exactly)."""
    if factor >= 1.0:
        return unit, burst
    scaled = max(1, round(max(factor, 1e-6) * 1_000_000))
    slow_burst = max(1, burst * scaled // 1_000_000)
    slow_unit = min(ceil_div(unit * 1_000_000, scaled), EXACT_LIMIT // slow_burst)
    return max(unit, slow_unit), slow_burst
