"""Prometheus metrics: hot-path instruments, a registry rendered at scrape time, and a
small loopback HTTP server (``GET /metrics``, ``GET /top.json``).

Nothing here runs per event except the two instruments the decision service owns
(:class:`LatencyHistogram`, :class:`BusiestKeys`): every metric is read from the live
counters when it is scraped. Everything (the instruments, the collectors, the HTTP server)
lives on the event loop thread; front-ends on other threads (the milter) hand their
decisions to the loop, so no lock is needed anywhere.

Registering metrics (for the parts that come later: scheduler, feedback)
-------------------------------------------------------------------------
The composition root (``cli._serve``) builds one :class:`MetricsRegistry` with
:func:`core_registry` and hands it to every part it builds. A part registers *read
callbacks*, never pushes values::

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
  :class:`HistogramSnapshot` (``LatencyHistogram.snapshot()``) or a mapping of them.
* ``json_section(name, read)``: ``read()`` returns JSON-serialisable data, served under
  ``sections[name]`` of ``GET /top.json``; ``mqpolicy top`` shows a list of flat mappings
  as a small table.
* ``unregister(name)`` removes a metric or section again.

Names must start with ``mqpolicy_`` and carry a unit suffix where there is a unit
(``_seconds``, ``_bytes``, ``_total``); registering a name twice is a ``ValueError``. A
``read`` callback runs on the loop at every scrape: keep it cheap and non-blocking. A
callback that raises or returns malformed data loses its own metric for that scrape
(logged, counted in ``mqpolicy_metrics_collect_errors_total``); the rest is served.
``mqpolicy top`` knows the names :data:`HELD_MESSAGES`, :data:`RELEASES` and
:data:`DESTINATIONS_IN_BACKOFF` and shows them once they exist ("n/a" until then).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import math
import platform
import re
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from itertools import pairwise
from types import TracebackType
from typing import TYPE_CHECKING, Final, NamedTuple, TypeAlias, cast
from urllib.parse import urlsplit

from mqpolicy import __version__
from mqpolicy.connection_tasks import ConnectionTasks
from mqpolicy.endpoints import Endpoint

if TYPE_CHECKING:  # the decision service imports this module for its instruments
    from mqpolicy.budget import CounterStore
    from mqpolicy.decisions import DecisionService
    from mqpolicy.milter_service import MilterCounters
    from mqpolicy.policy_server import ServerCounters

__all__ = [
    "DESTINATIONS_IN_BACKOFF",
    "HELD_MESSAGES",
    "RELEASES",
    "BusiestKeys",
    "HistogramSnapshot",
    "LatencyHistogram",
    "MetricsRegistry",
    "MetricsServer",
    "ReloadStats",
    "core_registry",
]

log = logging.getLogger("mqpolicy.metrics")

#: Gauge ``{lane}``: messages in the MTA hold queue (registered by the scheduler).
HELD_MESSAGES: Final = "mqpolicy_held_messages"
#: Counter ``{lane}``: held messages released (registered by the scheduler).
RELEASES: Final = "mqpolicy_releases_total"
#: Gauge: destinations currently backed off (registered by the feedback reader).
DESTINATIONS_IN_BACKOFF: Final = "mqpolicy_destinations_in_backoff"

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# ---------------------------------------------------------------- hot-path instruments

#: Upper bounds (seconds) of the latency buckets: the store deadline is 50 ms by default,
#: so the resolution is finest below it; ``+Inf`` is implied.
LATENCY_BUCKETS_S: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)


class HistogramSnapshot(NamedTuple):
    """A histogram as exposed: cumulative counts per upper bound (``+Inf`` last)."""

    bounds: tuple[float, ...]  # upper bounds in the exposed unit, without +Inf
    cumulative: tuple[int, ...]  # len(bounds) + 1 entries, the last one is the count
    total: float  # sum of observations in the exposed unit


class LatencyHistogram:
    """Fixed-bucket histogram of durations in nanoseconds.

    :meth:`observe` is one ``bisect`` in C and two integer additions: no allocation, no
    lock (call it on the loop thread only).
    """

    __slots__ = ("_bounds_ns", "_bounds_s", "counts", "sum_ns")

    def __init__(self, bounds_s: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        if not bounds_s or any(b <= a for a, b in pairwise(bounds_s)):
            raise ValueError("bucket bounds must be increasing and not empty")
        self._bounds_s = tuple(float(b) for b in bounds_s)
        self._bounds_ns = tuple(round(b * 1e9) for b in self._bounds_s)
        # counts[i]: observations in (bound[i-1], bound[i]]; the last one is (last, +Inf)
        self.counts = [0] * (len(self._bounds_ns) + 1)
        self.sum_ns = 0

    def observe(self, ns: int) -> None:
        self.counts[bisect_left(self._bounds_ns, ns)] += 1
        self.sum_ns += ns

    def snapshot(self) -> HistogramSnapshot:
        running = 0
        cumulative = []
        for n in self.counts:
            running += n
            cumulative.append(running)
        return HistogramSnapshot(self._bounds_s, tuple(cumulative), self.sum_ns / 1e9)


class KeyHits(NamedTuple):
    limit: str
    action: str  # defer, hold, reject, demote or monitor
    key: str
    hits: int  # hits counted while tracked (exact unless the key was dropped once)


class _Tally:
    __slots__ = ("action", "activity", "hits")

    def __init__(self, hits: int, activity: int, action: str) -> None:
        self.hits = hits
        self.activity = activity
        self.action = action


class BusiestKeys:
    """The limit keys hit most, in bounded memory.

    Every (limit, key) is counted exactly until more than ``2 * capacity`` are tracked;
    then the ``capacity`` most active since the previous prune are kept (activity halves
    at every prune, so a key busy *now* outranks one busy an hour ago) and the rest are
    forgotten. A key's ``hits`` never goes down while it is tracked, so a reader can
    compute rates by difference. :meth:`hit` is a dict lookup and two additions; the
    prune (``O(n log capacity)``) runs at most once per ``capacity`` new keys.
    """

    __slots__ = ("_tallies", "capacity", "pruned")

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self.pruned = 0  # keys forgotten so far

    def __len__(self) -> int:
        return len(self._tallies)

    def hit(self, limit: str, action: str, key: str, n: int = 1) -> None:
        tally = self._tallies.get((limit, key))
        if tally is None:
            if len(self._tallies) >= 2 * self.capacity:
                self._prune()
            self._tallies[(limit, key)] = _Tally(n, n, action)
            return
        tally.hits += n
        tally.activity += n
        tally.action = action

    def _prune(self) -> None:
        tallies = self._tallies
        keep = heapq.nlargest(self.capacity, tallies.items(), key=lambda kv: kv[1].activity)
        self.pruned += len(tallies) - len(keep)
        for _, tally in keep:
            tally.activity //= 2
        self._tallies = dict(keep)

    def top(self, n: int) -> list[KeyHits]:
        """The ``n`` most active keys, most active first."""
        best = heapq.nlargest(n, self._tallies.items(),
                              key=lambda kv: (kv[1].activity, kv[1].hits))
        return [KeyHits(limit, t.action, key, t.hits) for (limit, key), t in best]


# ---------------------------------------------------------------- registry

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


# ---------------------------------------------------------------- the core metrics


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


_ACTIONS: Final = ("accept", "defer", "hold", "reject")
#: Busiest keys listed in ``/top.json`` (section ``busiest_keys``).
BUSIEST_SHOWN: Final = 50


def register_decision_metrics(registry: MetricsRegistry, service: DecisionService) -> None:
    def decisions() -> dict[Labels, int]:
        lanes = [lane.name for lane in service.policy.lanes]
        values: dict[Labels, int] = {(a, lane): 0 for lane in lanes for a in _ACTIONS}
        with service.stats_lock:  # the milter's threads count decisions too
            counted = list(service.stats.decisions.items())
        values.update(counted)
        return values

    def limit_hits() -> dict[Labels, int]:
        values: dict[Labels, int] = {
            (lim.name, "monitor" if lim.monitor else lim.action.value): 0
            for lim in service.policy.limits
        }
        with service.stats_lock:
            counted = list(service.stats.limits_hit.items())
        values.update(counted)
        return values

    stats = service.stats
    registry.counter("mqpolicy_decisions_total", "Decisions made, by action and final lane",
                     decisions, labels=("action", "lane"))
    registry.counter("mqpolicy_limit_hits_total",
                     "Limits found spent, by limit and action (monitor: dry run)",
                     limit_hits, labels=("limit", "action"))
    registry.histogram("mqpolicy_decision_seconds",
                       "Time to decide one request, store round trip included",
                       stats.decision_latency.snapshot)
    registry.histogram("mqpolicy_store_seconds",
                       "Time of one store round trip as a decision sees it (queueing included)",
                       stats.store_latency.snapshot)
    registry.counter("mqpolicy_store_errors_total",
                     "Store round trips that failed (on_store_error applied), by kind",
                     lambda: {("error",): stats.store_errors, ("timeout",): stats.store_timeouts},
                     labels=("kind",))
    registry.gauge("mqpolicy_lane_priority", "Priority of each configured lane (0 = highest)",
                   lambda: {(lane.name,): lane.priority for lane in service.policy.lanes},
                   labels=("lane",))
    registry.gauge("mqpolicy_busiest_keys_tracked",
                   "Limit keys tracked for the busiest-keys view (bounded)",
                   lambda: len(stats.busiest))
    def busiest_keys() -> list[dict[str, object]]:
        with service.stats_lock:
            top = stats.busiest.top(BUSIEST_SHOWN)
        return [h._asdict() for h in top]

    registry.json_section("busiest_keys", busiest_keys)


def register_store_metrics(registry: MetricsRegistry, store: CounterStore) -> None:
    """Batching counters of stores that have them (Redis); entries and evictions of the
    memory store."""
    if hasattr(store, "evicted_full"):  # the memory store
        registry.gauge("mqpolicy_memory_store_entries",
                       "Buckets and once keys in the memory store (bound: store.max_entries)",
                       lambda: len(cast("Sized", store)))
        registry.counter("mqpolicy_memory_store_evictions_total",
                         "Entries dropped to make room at store.max_entries, by kind: full "
                         "(a bucket with no debt) or once (a message's counted-once mark)",
                         lambda: {("full",): int(getattr(store, "evicted_full", 0)),
                                  ("once",): int(getattr(store, "evicted_once", 0))},
                         labels=("kind",))
        registry.counter("mqpolicy_memory_store_refusals_total",
                         "Decisions refused because every entry left was a budget in use "
                         "(each limit followed its on_store_error)",
                         lambda: int(getattr(store, "refused", 0)))
    if hasattr(store, "batches_sent"):
        registry.counter("mqpolicy_store_batches_total",
                         "Batches sent to the store (one script call each)",
                         lambda: int(getattr(store, "batches_sent", 0)))
    if hasattr(store, "decisions_sent"):
        registry.counter("mqpolicy_store_batched_decisions_total",
                         "Decisions sent to the store inside batches",
                         lambda: int(getattr(store, "decisions_sent", 0)))


def register_policy_server_metrics(registry: MetricsRegistry, counters: ServerCounters) -> None:
    registry.gauge("mqpolicy_policy_connections", "Open policy connections",
                   lambda: counters.connections_active)
    registry.counter("mqpolicy_policy_connections_total",
                     "Policy connections, by result (refused: over max_connections)",
                     lambda: {("accepted",): counters.connections_accepted,
                              ("refused",): counters.connections_refused},
                     labels=("result",))
    registry.counter("mqpolicy_policy_idle_timeouts_total",
                     "Policy connections closed for idleness", lambda: counters.idle_timeouts)
    registry.counter("mqpolicy_policy_requests_total", "Policy requests answered",
                     lambda: counters.requests)
    registry.counter("mqpolicy_policy_protocol_errors_total",
                     "Malformed or oversized policy requests (connection closed)",
                     lambda: counters.protocol_errors)
    registry.counter("mqpolicy_policy_handler_errors_total",
                     "Policy requests answered with the fallback action after an error",
                     lambda: counters.handler_errors)


def register_milter_metrics(registry: MetricsRegistry, counters: MilterCounters) -> None:
    registry.gauge("mqpolicy_milter_connections", "Open MTA connections to the milter",
                   lambda: counters.connections_active)
    registry.gauge("mqpolicy_milter_messages", "Messages the milter is in the middle of",
                   lambda: counters.messages_active)
    registry.counter("mqpolicy_milter_decisions_total", "Decisions the milter applied",
                     lambda: counters.decisions)
    registry.counter("mqpolicy_milter_failures_total",
                     "Milter steps that applied milter.on_error (no decision, or an error)",
                     lambda: counters.failures)
    registry.counter("mqpolicy_milter_timeouts_total",
                     "Milter decisions handed to the event loop that missed milter.timeout",
                     lambda: counters.timeouts)


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


def core_registry(
    service: DecisionService,
    *,
    server: ServerCounters | None = None,
    milter: MilterCounters | None = None,
    reloads: ReloadStats | None = None,
) -> MetricsRegistry:
    """A registry with every metric of the decision service, its store, the policy
    server's and the milter's counters (when they run) and the reload counts."""
    registry = MetricsRegistry()
    started = time.time()
    registry.gauge("mqpolicy_build_info", "Version of the running mqpolicy (value 1)",
                   lambda: {(__version__, platform.python_version()): 1},
                   labels=("version", "python"))
    registry.gauge("mqpolicy_start_time_seconds", "When this process started (Unix time)",
                   lambda: started)
    register_decision_metrics(registry, service)
    register_store_metrics(registry, service.store)
    if server is not None:
        register_policy_server_metrics(registry, server)
    if milter is not None:
        register_milter_metrics(registry, milter)
    if reloads is not None:
        register_reload_metrics(registry, reloads)
    return registry


# ---------------------------------------------------------------- HTTP


_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   408: "Request Timeout", 431: "Request Header Fields Too Large",
                   500: "Internal Server Error"}
_LINGER_S: Final = 2.0
_LINGER_BYTES: Final = 1 << 20
_INDEX: Final = b"mqpolicy\n/metrics  Prometheus metrics\n/top.json  busiest keys and sections\n"


class MetricsServer:
    """HTTP/1.1 on loopback TCP: ``GET /metrics``, ``GET /top.json``, ``GET /``.

    One request per connection (``Connection: close``). A request head larger than
    ``max_request_bytes`` gets 431, one not complete within ``timeout_s`` gets 408 (or
    just a close), anything unparsable 400; over ``max_connections`` a connection is closed
    at once. Answers are written within ``timeout_s`` or the connection is cut. Nothing a
    client sends can stop the server.
    """

    def __init__(
        self,
        registry: MetricsRegistry,
        endpoint: Endpoint,
        *,
        max_request_bytes: int = 8192,
        timeout_s: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        if endpoint.is_unix:
            raise ValueError("metrics listen on HOST:PORT")
        self.registry = registry
        self.endpoint = endpoint
        self._max_request_bytes = max_request_bytes
        self._timeout_s = timeout_s
        self._connections = ConnectionTasks(max_connections)
        self.bound_endpoints: list[Endpoint] = []
        self.responses: Counter[int] = Counter()  # by status code; 0 = closed without one
        registry.counter("mqpolicy_metrics_http_responses_total",
                         "Answers of the metrics HTTP server, by status (0: closed unanswered)",
                         lambda: {(str(code),): n for code, n in self.responses.items()},
                         labels=("code",))

    async def start(self) -> None:
        server = self._connections.server = await asyncio.start_server(
            self._on_connect, self.endpoint.host or "127.0.0.1", self.endpoint.port,
            reuse_address=True,
        )
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            self.bound_endpoints.append(Endpoint(host=host, port=port))
        log.info("metrics listening", extra={"fields": {
            "listen": " ".join(str(e) for e in self.bound_endpoints)}})

    def close(self) -> None:
        self._connections.close()

    async def wait_closed(self) -> None:
        await self._connections.wait_closed()

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
        await self.wait_closed()

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._connections.start(writer, lambda: self._connection(reader, writer)):
            self.responses[0] += 1

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        status = 0
        try:
            head = await self._read_head(reader)
            if isinstance(head, int):
                status = head
                if status:
                    await self._send(writer, status, b"", "text/plain", head_only=False)
                    await self._linger(reader, writer)
                return
            status, body, ctype, head_only = self._route(head)
            await self._send(writer, status, body, ctype, head_only=head_only)
            if status >= 400:
                await self._linger(reader, writer)
        except (ConnectionError, TimeoutError, OSError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            self.responses[status] += 1
            transport = writer.transport
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an error answer: close our side, then read and drop what the client still
        sends (bounded), so that closing with unread input (a TCP reset) does not destroy
        the answer before the client has read it."""
        writer.write_eof()
        dropped = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(self._timeout_s, _LINGER_S)):
                while dropped < _LINGER_BYTES:
                    chunk = await reader.read(65536)
                    if not chunk:
                        return
                    dropped += len(chunk)

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | int:
        """The request head, or a status to answer (0: just close)."""
        buffer = bytearray()
        try:
            async with asyncio.timeout(self._timeout_s):
                while True:
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        end = buffer.find(b"\n\n")
                    if end >= 0:
                        return bytes(buffer[:end])
                    if len(buffer) > self._max_request_bytes:
                        return 431
                    chunk = await reader.read(4096)
                    if not chunk:
                        return 400 if buffer.strip() else 0
                    buffer += chunk
        except TimeoutError:
            return 408 if buffer else 0

    def _route(self, head: bytes) -> tuple[int, bytes, str, bool]:
        if len(head) > self._max_request_bytes:
            return 431, b"", "text/plain", False
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, b"", "text/plain", False
        method, target = parts[0], parts[1].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            return 405, b"", "text/plain", False
        head_only = method == b"HEAD"
        url = urlsplit(target)
        if url.path == "/metrics":
            body = self.registry.render().encode("utf-8", "backslashreplace")
            return 200, body, CONTENT_TYPE, head_only
        if url.path == "/top.json":
            data = {"version": __version__, "time": time.time(),
                    "sections": self.registry.sections()}
            return 200, json.dumps(data).encode("ascii"), "application/json", head_only
        if url.path == "/":
            return 200, _INDEX, "text/plain; charset=utf-8", head_only
        return 404, b"not found\n", "text/plain; charset=utf-8", head_only

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                    ctype: str, *, head_only: bool) -> None:
        headers = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if status == 405:
            headers.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("ascii"))
        if not head_only:
            writer.write(body)
        async with asyncio.timeout(self._timeout_s):
            await writer.drain()
