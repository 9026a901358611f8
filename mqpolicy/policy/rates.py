"""Parsing of rates (``300/1m``), durations (``90s``) and sizes (``10MB``). Pure."""

from __future__ import annotations

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
