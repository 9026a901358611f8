"""The two instruments a decision updates on the hot path: :class:`LatencyHistogram` and
:class:`BusiestKeys`. No I/O, nothing of the services, and no lock of their own: the
decision service and the scheduler own them and change them under their own lock where
several threads decide (the decision service's ``stats_lock``), and the registry reads them
at scrape time (:mod:`mqpolicy.metrics.registry`)."""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Sequence
from itertools import pairwise
from typing import Final, NamedTuple

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
