"""Delivery at a time the message asks for. Pure: no I/O, no clock (``now_ms`` is passed).

Two headers ask for it:

* ``X-MQ-Deliver-After:`` an RFC 3339 time (``2026-11-28T08:00:00Z``,
  ``2026-11-28T08:00:00+01:00``) or a delay relative to arrival: ``+30m``, ``+20s``,
  ``+1h``, ``+90`` (seconds);
* ``Deferred-Delivery:`` (RFC 2156, an RFC 5322 date-time:
  ``Sat, 28 Nov 2026 08:00:00 +0000``).

When both are present ``X-MQ-Deliver-After`` wins; of several occurrences of one header
the first that parses counts. Whether the request may schedule at all is the caller's
business (``scheduler.schedule.allow``); the time asked for is capped at
``now + scheduler.schedule.max_delay``. The headers are always removed from the message
(honoured or not): they are instructions to this MTA, and a ``Deferred-Delivery`` left in
place could make a later hop defer the message again.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import NamedTuple

from mqpolicy.policy.rates import RateSyntaxError, parse_duration_ms

__all__ = [
    "DEFERRED_DELIVERY",
    "DELIVER_AFTER",
    "SCHEDULE_HEADERS",
    "ScheduleRequest",
    "parse_deferred_delivery",
    "parse_deliver_after",
    "requested_time",
    "schedule_hold_text",
]

DELIVER_AFTER = "X-MQ-Deliver-After"
DEFERRED_DELIVERY = "Deferred-Delivery"
SCHEDULE_HEADERS = (DELIVER_AFTER, DEFERRED_DELIVERY)
_LOWER = {name.lower(): name for name in SCHEDULE_HEADERS}

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})$"
)
_RELATIVE = re.compile(r"^\+\s*(\d+(?:\.\d+)?\s*(?:ms|s|m|h|d|w)?)$", re.IGNORECASE)
_MAX_VALUE = 200


class ScheduleRequest(NamedTuple):
    """What the headers asked for: ``not_before_ms`` (None: nothing usable) and which
    header said so."""

    not_before_ms: int | None
    header: str
    problem: str = ""  # why a present header was not usable


def parse_deliver_after(value: str, now_ms: int) -> int:
    """``X-MQ-Deliver-After`` → ms since the epoch; ValueError when it is not a time."""
    text = value.strip()
    if len(text) > _MAX_VALUE:
        raise ValueError("value too long")
    relative = _RELATIVE.match(text)
    if relative:
        try:
            return now_ms + parse_duration_ms(relative.group(1).replace(" ", ""))
        except RateSyntaxError as exc:
            raise ValueError(str(exc)) from None
    if not _RFC3339.match(text):
        raise ValueError(f"not an RFC 3339 time or +DURATION: {text!r}")
    stamp = text.replace("z", "Z").replace("t", "T")
    if stamp.endswith("Z"):
        stamp = stamp[:-1] + "+00:00"
    if " " in stamp:
        stamp = stamp.replace(" ", "T", 1)
    when = datetime.fromisoformat(_trim_fraction(stamp))
    return round(when.timestamp() * 1000)


def parse_deferred_delivery(value: str) -> int:
    """``Deferred-Delivery`` (an RFC 5322 date-time) → ms since the epoch."""
    text = value.strip()
    if len(text) > _MAX_VALUE:
        raise ValueError("value too long")
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"not an RFC 5322 date-time: {text!r}") from None
    if when is None:  # pragma: no cover - older Pythons returned None
        raise ValueError(f"not an RFC 5322 date-time: {text!r}")
    if when.tzinfo is None:  # "-0000": time in UTC, zone unknown
        raise ValueError(f"no usable time zone: {text!r}")
    return round(when.timestamp() * 1000)


def requested_time(headers: Iterable[tuple[str, str]], now_ms: int,
                   max_delay_ms: int) -> ScheduleRequest | None:
    """The delivery time the headers ask for, capped at ``now_ms + max_delay_ms``; None
    when neither header is present. A time in the past means "now"."""
    found: dict[str, list[str]] = {}
    for name, value in headers:
        canonical = _LOWER.get(name.lower())
        if canonical is not None:
            found.setdefault(canonical, []).append(value)
    if not found:
        return None
    problems: list[str] = []
    for header in SCHEDULE_HEADERS:
        for value in found.get(header, ()):
            try:
                if header == DELIVER_AFTER:
                    when = parse_deliver_after(value, now_ms)
                else:
                    when = parse_deferred_delivery(value)
            except (ValueError, OverflowError) as exc:
                problems.append(f"{header}: {exc}")
                continue
            return ScheduleRequest(max(now_ms, min(when, now_ms + max_delay_ms)), header)
    first = next(h for h in SCHEDULE_HEADERS if h in found)
    return ScheduleRequest(None, first, "; ".join(problems))


def schedule_hold_text(not_before_ms: int, header: str) -> str:
    """What a message held for its asked-for time says (Sendmail lists it as the
    quarantine reason): the schedule, until when, and the header that asked."""
    until = datetime.fromtimestamp(not_before_ms // 1000, UTC)
    return f"held by mqpolicy schedule until {until:%Y-%m-%d %H:%M:%S} UTC ({header})"


def _trim_fraction(stamp: str) -> str:
    """Python 3.11's fromisoformat takes at most 6 fraction digits."""
    match = re.match(r"^(.*\.\d{6})\d+(.*)$", stamp)
    return match.group(1) + match.group(2) if match else stamp
