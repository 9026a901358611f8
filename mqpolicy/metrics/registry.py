"""Prometheus metrics: a registry of read callbacks, rendered at scrape time.

Nothing here runs per event: every metric is read from the live counters when it is
scraped (the hot-path instruments are :mod:`mqpolicy.metrics.instruments`; the HTTP server
that serves the registry is :mod:`mqpolicy.metrics.http`). The registry and the HTTP server
live on the event loop thread, where the read callbacks run. The counters they read are
changed where the events happen, which is not always that thread: the milter decides on
libmilter's threads when the decision needs no I/O, so the decision service changes its
stats under its ``stats_lock`` and its callbacks that iterate them hold that lock too
(:func:`mqpolicy.decision.service.register_decision_metrics`); the milter's own counters
have a lock of their own (:class:`mqpolicy.milter.gateway.MilterCounters`).

Registering metrics
-------------------
The composition root (:func:`mqpolicy.commands.serve.core_registry`) builds one
:class:`MetricsRegistry` and hands it to every part it builds; each part's registrations
live with the part (``register_decision_metrics`` in :mod:`mqpolicy.decision.service`,
``register_policy_server_metrics`` in :mod:`mqpolicy.delegation.server`,
``register_milter_metrics`` in :mod:`mqpolicy.milter.gateway`,
``register_scheduler_metrics`` in :mod:`mqpolicy.scheduler.scheduler`). A part registers
*read callbacks*, never pushes values::

    registry.gauge(HELD_MESSAGES, "Messages in the MTA hold queue, by lane",
                   lambda: {(lane,): n for lane, n in scheduler.held_by_lane.items()},
                   labels=("lane",))
    registry.counter(RELEASES, "Held messages released, by lane",
                     lambda: {(lane,): n for lane, n in scheduler.released.items()},
                     labels=("lane",))
    registry.gauge(DESTINATIONS_IN_BACKOFF, "Destinations currently backed off",
                   lambda: len(feedback.backoff))
    registry.json_section("backoff", lambda: [
        {"destination": d, "level": s.level, "until": s.until} for d, s in ...])

* ``counter(name, help, read, labels=())`` / ``gauge(...)``: ``read()`` returns a number
  (no labels) or a mapping from a tuple of label values (in ``labels`` order) to a number.
  Counter names end in ``_total`` and never go down (a restart resets them).
* ``histogram(name, help, read, labels=())``: ``read()`` returns a
  :class:`~mqpolicy.metrics.instruments.HistogramSnapshot`
  (``LatencyHistogram.snapshot()``) or a mapping of them.
* ``json_section(name, read)``: ``read()`` returns JSON-serialisable data, served under
  ``sections[name]`` of ``GET /top.json``; ``mqpolicy top`` shows a list of flat mappings
  as a small table.
* ``unregister(name)`` removes a metric or section again.

Names must start with ``mqpolicy_`` and carry a unit suffix where there is a unit
(``_seconds``, ``_bytes``, ``_total``); registering a name twice is a ``ValueError``. A
``read`` callback runs on the loop at every scrape: keep it cheap and non-blocking. A
callback that raises or returns malformed data loses its own metric for that scrape
(logged, counted in ``mqpolicy_metrics_collect_errors_total``); the rest is served.
``mqpolicy top`` knows the names :data:`HELD_MESSAGES`, :data:`RELEASES`,
:data:`DESTINATIONS_IN_BACKOFF`, :data:`DESTINATION_PAUSED` and :data:`LANE_PAUSED` and shows
them once they exist ("n/a" until then).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from mqpolicy.metrics.instruments import HistogramSnapshot

__all__ = [
    "DESTINATIONS_IN_BACKOFF",
    "DESTINATION_BACKOFF_FACTOR",
    "DESTINATION_PAUSED",
    "HELD_MESSAGES",
    "LANE_PAUSED",
    "RELEASES",
    "MetricsRegistry",
    "ReloadStats",
    "register_reload_metrics",
]

log = logging.getLogger("mqpolicy.metrics")

#: Gauge ``{lane}``: messages in the MTA hold queue (registered by the scheduler).
HELD_MESSAGES: Final = "mqpolicy_held_messages"
#: Counter ``{lane}``: held messages released (registered by the scheduler).
RELEASES: Final = "mqpolicy_releases_total"
#: Gauge: destinations currently backed off (registered by the feedback reader).
DESTINATIONS_IN_BACKOFF: Final = "mqpolicy_destinations_in_backoff"
#: Gauge ``{destination}``: the backoff factor of every configured destination (1: none).
DESTINATION_BACKOFF_FACTOR: Final = "mqpolicy_destination_backoff_factor"
#: Gauge ``{destination}``: 1 while paused (configured destinations, and paused others).
DESTINATION_PAUSED: Final = "mqpolicy_destination_paused"
#: Gauge ``{lane}``: 1 while paused.
LANE_PAUSED: Final = "mqpolicy_lane_paused"


Labels: TypeAlias = tuple[str, ...]
Number: TypeAlias = int | float
Values: TypeAlias = Number | Mapping[Labels, Number]
HistogramValues: TypeAlias = HistogramSnapshot | Mapping[Labels, HistogramSnapshot]

_NAME = re.compile(r"^mqpolicy_[a-zA-Z0-9_]*[a-zA-Z0-9]$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_SECTION = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_COLLECT_ERRORS: Final = "mqpolicy_metrics_collect_errors_total"


@dataclass(frozen=True, slots=True)
class _Metric:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: Labels
    read: Callable[[], object]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: Number) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _label_text(names: Labels, values: Labels, extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class MetricsRegistry:
    """Metric families read at scrape time; see the module docstring for the interface."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._sections: dict[str, Callable[[], object]] = {}
        self.collect_errors = 0
        self.counter(_COLLECT_ERRORS,
                     "Metric callbacks that failed during a scrape (their metric was left out)",
                     lambda: self.collect_errors)

    # -- registration -------------------------------------------------------------------

    def counter(self, name: str, help: str, read: Callable[[], Values],
                labels: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r}: counter names end in _total")
        self._add(_Metric(name, "counter", help, tuple(labels), read))

    def gauge(self, name: str, help: str, read: Callable[[], Values],
              labels: Sequence[str] = ()) -> None:
        if name.endswith("_total"):
            raise ValueError(f"gauge {name!r}: _total is for counters")
        self._add(_Metric(name, "gauge", help, tuple(labels), read))

    def histogram(self, name: str, help: str, read: Callable[[], HistogramValues],
                  labels: Sequence[str] = ()) -> None:
        if "le" in labels:
            raise ValueError(f"histogram {name!r}: 'le' is reserved")
        for suffix in ("_bucket", "_count", "_sum", "_total"):
            if name.endswith(suffix):
                raise ValueError(f"histogram {name!r}: must not end in {suffix}")
        self._add(_Metric(name, "histogram", help, tuple(labels), read))

    def json_section(self, name: str, read: Callable[[], object]) -> None:
        if not _SECTION.match(name):
            raise ValueError(f"section {name!r}: use lowercase letters, digits and _")
        if name in self._sections:
            raise ValueError(f"section {name!r} is already registered")
        self._sections[name] = read

    def unregister(self, name: str) -> None:
        if name == _COLLECT_ERRORS:
            raise ValueError(f"{name} belongs to the registry")
        self._metrics.pop(name, None)
        self._sections.pop(name, None)

    def names(self) -> list[str]:
        return list(self._metrics)

    def _add(self, metric: _Metric) -> None:
        if not _NAME.match(metric.name):
            raise ValueError(f"metric {metric.name!r}: names are mqpolicy_[a-zA-Z0-9_]*")
        for label in metric.labels:
            if not _LABEL.match(label) or label.startswith("__"):
                raise ValueError(f"metric {metric.name!r}: bad label name {label!r}")
        if len(set(metric.labels)) != len(metric.labels):
            raise ValueError(f"metric {metric.name!r}: repeated label name")
        taken = set(self._metrics)
        for other in self._metrics.values():
            if other.kind == "histogram":
                taken.update(other.name + s for s in ("_bucket", "_count", "_sum"))
        mine = {metric.name}
        if metric.kind == "histogram":
            mine.update(metric.name + s for s in ("_bucket", "_count", "_sum"))
        if mine & taken:
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric

    # -- rendering ----------------------------------------------------------------------

    def render(self) -> str:
        """The text exposition format 0.0.4 of every metric, read now."""
        out: list[str] = []
        # the error count last, so that it includes this scrape's failures
        metrics = [m for m in self._metrics.values() if m.name != _COLLECT_ERRORS]
        metrics.append(self._metrics[_COLLECT_ERRORS])
        for metric in metrics:
            try:
                lines = list(self._lines(metric))
            except Exception:
                self.collect_errors += 1
                log.exception("metric collection failed",
                              extra={"fields": {"metric": metric.name}})
                continue
            out.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
            out.append(f"# TYPE {metric.name} {metric.kind}")
            out.extend(lines)
        out.append("")
        return "\n".join(out)

    def _lines(self, metric: _Metric) -> Iterator[str]:
        value = metric.read()
        items: list[tuple[Labels, object]]
        if isinstance(value, Mapping):
            items = sorted(value.items(), key=lambda kv: kv[0])
        else:
            items = [((), value)]
        for labels, v in items:
            if not isinstance(labels, tuple) or len(labels) != len(metric.labels) or \
                    not all(isinstance(x, str) for x in labels):
                raise ValueError(f"label values {labels!r} do not match {metric.labels!r}")
            if metric.kind == "histogram":
                if not isinstance(v, HistogramSnapshot):
                    raise TypeError(f"expected a HistogramSnapshot, got {type(v).__name__}")
                yield from self._histogram_lines(metric, labels, v)
                continue
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise TypeError(f"expected a number, got {type(v).__name__}")
            yield f"{metric.name}{_label_text(metric.labels, labels)} {_number(v)}"

    @staticmethod
    def _histogram_lines(metric: _Metric, labels: Labels, h: HistogramSnapshot) -> Iterator[str]:
        if len(h.cumulative) != len(h.bounds) + 1:
            raise ValueError("histogram snapshot: one count per bound plus +Inf")
        for bound, count in zip((*h.bounds, math.inf), h.cumulative, strict=True):
            le = f'le="{_number(bound)}"' if math.isfinite(bound) else 'le="+Inf"'
            yield f"{metric.name}_bucket{_label_text(metric.labels, labels, le)} {count}"
        yield f"{metric.name}_sum{_label_text(metric.labels, labels)} {_number(h.total)}"
        yield f"{metric.name}_count{_label_text(metric.labels, labels)} {h.cumulative[-1]}"

    def sections(self) -> dict[str, object]:
        """The JSON sections, read now (a failing one is left out)."""
        result: dict[str, object] = {}
        for name, read in list(self._sections.items()):
            try:
                value = read()
                json.dumps(value)
            except Exception:
                self.collect_errors += 1
                log.exception("section collection failed", extra={"fields": {"section": name}})
                continue
            result[name] = value
        return result


# ---------------------------------------------------------------- reloads


@dataclass
class ReloadStats:
    """Config reloads (SIGHUP), counted by the composition root."""

    ok: int = 0
    failed: int = 0
    last_success_s: float = field(default_factory=time.time)
    last_ok: bool = True

    def succeeded(self) -> None:
        self.ok += 1
        self.last_ok = True
        self.last_success_s = time.time()

    def refused(self) -> None:
        self.failed += 1
        self.last_ok = False


#: Busiest keys listed in ``/top.json`` (section ``busiest_keys``).


def register_reload_metrics(registry: MetricsRegistry, reloads: ReloadStats) -> None:
    registry.counter("mqpolicy_config_reloads_total", "Config reloads (SIGHUP), by result",
                     lambda: {("ok",): reloads.ok, ("failed",): reloads.failed},
                     labels=("result",))
    registry.gauge("mqpolicy_config_last_reload_successful",
                   "1 if the last reload was applied (or none was tried), 0 if refused",
                   lambda: 1 if reloads.last_ok else 0)
    registry.gauge("mqpolicy_config_last_reload_success_timestamp_seconds",
                   "When the running policy was loaded (Unix time)",
                   lambda: reloads.last_success_s)
