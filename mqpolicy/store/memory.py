"""The embedded counter store: budgets in a dict, for one process.

Implements :class:`mqpolicy.store.budget.CounterStore` with exactly the rules of
``lua/gcra_batch.lua``; one suite (``tests/store/test_stores.py``) runs against both.

Decision rules, shared with the Lua script (the budget module's docstring gives the contract):

* checks are tested in order with :func:`gcra_step`; a check sees what earlier checks of the
  same decision spent on the same key (so two checks on one key cannot both take the last unit);
* the decision commits unless a *blocking* check failed; if it commits, every passing
  ``consume`` check is spent and the once key (if any) is set; if not, nothing is written;
* ``remaining`` is what the bucket holds after the decision: for the check that made the last
  spend on its key it is :func:`gcra_step`'s own figure; otherwise (peek, failed check,
  uncommitted decision) it is the bucket's free units (:func:`~mqpolicy.store.budget.free_units`,
  ``floor((burst*interval - (tat - now)) / interval)`` with a slack for rounding), the same
  expression :func:`gcra_step` uses for a failing check;
* a duplicate (once key present) tests and spends nothing: ``committed=False``,
  ``duplicate=True`` and, per check, ``allowed=True``, the bucket's free units, no retry.

Every entry carries an expiry in the callers' clock (``now_ms``): lazy expiry on read, plus a
bounded round-robin sweep (``_SWEEP_BATCH`` entries every ``_SWEEP_EVERY`` writes, every
``_SWEEP_EVERY_IDLE`` writes after a slice that found nothing expired) so keys nobody reads
again do not pile up.

Every call holds the store's lock for its whole (synchronous) work, so each is atomic for
callers on the event loop and on other threads alike; :meth:`MemoryStore.evaluate_now` is
the decision without a coroutine, for the milter's threads.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

from mqpolicy.store.budget import (
    DEFAULT_ONCE_TTL_MS,
    NEVER,
    BucketState,
    BudgetCheck,
    BudgetResult,
    Evaluation,
    free_units,
    ttl_for,
)

_SWEEP_EVERY = 16
"""Run one sweep slice after this many writes..."""
_SWEEP_EVERY_IDLE = 64
"""... or this many, when the last slice found every entry alive (moving live entries to
the back of the line is all such a slice does: four times less of it)."""
_SWEEP_BATCH = 32
"""Entries looked at per sweep slice: twice the write rate while slices find expired
entries (half of it after one that found none, until one finds some again): keys nobody
reads again are dropped about as fast as they are written."""
_ONCE_VALUE = 1.0
"""What a once key holds (Redis stores the string ``1``)."""
_INFINITY = math.inf
floor, ceil = math.floor, math.ceil
_new = tuple.__new__  # positional NamedTuples without their keyword __new__


def validate_decision(checks: Sequence[BudgetCheck], once_ttl_ms: int) -> None:
    """Reject arguments no bucket can hold (both stores call this before any I/O)."""
    for check in checks:
        if not (math.isfinite(check.interval_ms) and check.interval_ms > 0):
            raise ValueError(f"interval_ms must be a positive number: {check!r}")
        if check.burst < 0 or check.cost < 0:
            raise ValueError(f"burst and cost must not be negative: {check!r}")
    if once_ttl_ms <= 0:
        raise ValueError(f"once_ttl_ms must be positive: {once_ttl_ms}")


_GLOB_SPECIAL = re.compile(r"[*?\[\\]")  # where a Redis glob stops being literal


def redis_glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a Redis ``SCAN MATCH`` glob (``*``, ``?``, ``[abc]``, ``[^a]``, ``[a-z]``, ``\\x``)
    into a regex to use with ``fullmatch``."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            j = i + 1
            negate = j < n and pattern[j] == "^"
            if negate:
                j += 1
            members: list[str] = []
            while j < n and pattern[j] != "]":
                if pattern[j] == "\\" and j + 1 < n:
                    j += 1
                    members.append(re.escape(pattern[j]))
                elif pattern[j] == "-" and members and j + 1 < n and pattern[j + 1] != "]":
                    j += 1
                    low = members.pop()
                    high = re.escape(pattern[j])
                    if low > high:
                        low, high = high, low
                    members.append(f"{low}-{high}")
                else:
                    members.append(re.escape(pattern[j]))
                j += 1
            if j >= n:  # no closing bracket: Redis treats the rest as the class
                j = n - 1
            if members:
                out.append(("[^" if negate else "[") + "".join(members) + "]")
            else:
                out.append("." if negate else "(?!)")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


MEMORY_URL: Final = "memory://"


def parse_memory_url(url: str) -> None:
    """The embedded store's URL: ``memory://`` (the scheme in any case) and nothing after it;
    ValueError otherwise, since nothing after it would be used."""
    text = url.strip()
    if text.lower() != MEMORY_URL:
        raise ValueError(f"store {url!r}: the embedded store is {MEMORY_URL} with nothing "
                         f"after it: write {MEMORY_URL}")


class MemoryStore:
    """Budgets in this process's memory (the default store; not shared between processes)."""

    in_process = True
    """Answers without I/O: callers need no deadline around it."""

    def __init__(self, key_prefix: str = "mqpolicy:") -> None:
        self._prefix = key_prefix
        # prefixed key -> (tat or once marker, expiry in the callers' ms clock)
        self._data: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._until_sweep = _SWEEP_EVERY  # writes left before the next sweep slice
        self._last_now = 0
        # Decisions may come from several threads (the milter's): one at a time.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Entries held, including expired ones the sweep has not reached yet."""
        return len(self._data)

    # -- helpers ---------------------------------------------------------------------------

    def _get(self, key: str, now_ms: int) -> tuple[float, int] | None:
        entry = self._data.get(key)
        if entry is not None and entry[1] <= now_ms:
            del self._data[key]
            return None
        return entry

    def _tat(self, key: str, now_ms: int) -> float:
        entry = self._get(key, now_ms)
        if entry is None or entry[0] < now_ms:
            return now_ms
        return entry[0]

    def _put(self, key: str, value: float, expiry: int) -> None:
        self._data[key] = (value, expiry)
        self._wrote(1)

    def _wrote(self, count: int) -> None:
        """Count writes; run the sweep slices due (one per slice's worth of writes, also
        when one decision writes many keys)."""
        self._until_sweep -= count
        while self._until_sweep <= 0:
            dropped = self._sweep(self._last_now)
            self._until_sweep += _SWEEP_EVERY if dropped else _SWEEP_EVERY_IDLE

    def _sweep(self, now_ms: int) -> int:
        """Look at the oldest ``_SWEEP_BATCH`` entries: drop expired ones, requeue the rest.
        Returns how many were dropped."""
        data = self._data
        dropped = 0
        for _ in range(min(_SWEEP_BATCH, len(data))):
            key, entry = data.popitem(last=False)
            if entry[1] > now_ms:
                data[key] = entry
            else:
                dropped += 1
        return dropped

    def _seen(self, now_ms: int) -> None:
        self._last_now = max(self._last_now, now_ms)

    # -- CounterStore ----------------------------------------------------------------------

    async def evaluate(
        self,
        checks: Sequence[BudgetCheck],
        now_ms: int,
        once_key: str | None = None,
        once_ttl_ms: int = DEFAULT_ONCE_TTL_MS,
    ) -> Evaluation:
        return self.evaluate_now(checks, now_ms, once_key, once_ttl_ms)

    def evaluate_now(
        self,
        checks: Sequence[BudgetCheck],
        now_ms: int,
        once_key: str | None = None,
        once_ttl_ms: int = DEFAULT_ONCE_TTL_MS,
    ) -> Evaluation:
        """:meth:`evaluate` without a coroutine, for callers on any thread (the milter's).

        The GCRA step of :func:`~mqpolicy.store.budget.gcra_step` is written out inline (same
        expressions, same order, so the same doubles): this runs for every decision. A
        decision whose checks all use different buckets (the usual one) takes one pass;
        one that checks a bucket twice takes :meth:`_evaluate_shared`."""
        if once_ttl_ms <= 0:
            raise ValueError(f"once_ttl_ms must be positive: {once_ttl_ms}")
        with self._lock:
            self._last_now = max(self._last_now, now_ms)  # _seen(), inline
            prefix = self._prefix
            data = self._data
            once = None
            if once_key is not None:
                once = prefix + once_key
                if self._get(once, now_ms) is not None:
                    validate_decision(checks, once_ttl_ms)
                    return self._duplicate(checks, now_ms)
            tats: dict[str, float] = {}  # bucket -> its tat before this decision
            results: list[BudgetResult] = []
            spends: list[tuple[int, str, float]] = []  # check index, bucket, new tat
            blocked = False
            for check in checks:
                key, interval, burst, cost, consume, blocking = check
                if not 0 < interval < _INFINITY:  # also NaN
                    raise ValueError(f"interval_ms must be a positive number: {check!r}")
                if burst < 0 or cost < 0:
                    raise ValueError(f"burst and cost must not be negative: {check!r}")
                key = prefix + key
                if key in tats:
                    return self._evaluate_shared(checks, now_ms, once, once_ttl_ms)
                entry = data.get(key)
                tat = float(now_ms)  # float: the type the tats keep (mypyc compiles it as such)
                if entry is not None:
                    if entry[1] <= now_ms:
                        del data[key]
                    elif entry[0] > now_ms:
                        tat = entry[0]
                tats[key] = tat
                tolerance = interval * burst
                increment = interval * cost
                new_tat = tat + increment
                allow_at = new_tat - tolerance
                free_ms = tolerance - (tat - now_ms)
                slack = 1e-9 + burst * 1e-12
                if increment > tolerance:
                    left = floor(free_ms / interval + slack)
                    results.append(_new(BudgetResult, (False, left if left > 0 else 0, NEVER)))
                    blocked = blocked or blocking
                elif allow_at <= now_ms:
                    if consume:
                        spends.append((len(results), key, new_tat))
                        free_ms -= increment
                    left = floor(free_ms / interval + slack)
                    results.append(_new(BudgetResult, (True, left if left > 0 else 0, 0)))
                else:
                    left = floor(free_ms / interval + slack)
                    retry = ceil(allow_at - now_ms)
                    results.append(_new(BudgetResult, (False, left if left > 0 else 0,
                                                       retry if retry > 1 else 1)))
                    blocked = blocked or blocking
            if blocked:  # nothing spent: a check that would have spent sees its bucket as is
                for i, key, _ in spends:
                    check = checks[i]
                    results[i] = results[i]._replace(remaining=free_units(
                        check.interval_ms, check.burst, tats[key], now_ms))
                return Evaluation(tuple(results), committed=False)
            # _put(), inline: the writes, then the sweeps they are due
            for _, key, tat in spends:
                ttl = ceil(tat - now_ms)  # ttl_for()
                data[key] = (tat, now_ms + (ttl if ttl > 1 else 1))
            if once is not None:
                data[once] = (_ONCE_VALUE, now_ms + once_ttl_ms)
            self._wrote(len(spends) + (once is not None))
            return _new(Evaluation, (tuple(results), True, False))

    def _evaluate_shared(self, checks: Sequence[BudgetCheck], now_ms: int, once: str | None,
                         once_ttl_ms: int) -> Evaluation:
        """:meth:`evaluate_now` for checks that share a bucket (the lock is held): a check
        sees what earlier ones spent, ``remaining`` is the bucket after the decision
        except for the check that made its last spend."""
        validate_decision(checks, once_ttl_ms)
        prefix = self._prefix
        original: dict[str, float] = {}
        tentative: dict[str, float] = {}
        last_spender: dict[str, int] = {}
        # per check: key, allowed, retry_after_ms, remaining if it spent (else -1)
        steps: list[tuple[str, bool, int, int]] = []
        blocked = False
        for i, check in enumerate(checks):
            key, interval, burst, cost, consume, blocking = check
            key = prefix + key
            tat = tentative.get(key)
            if tat is None:
                tat = original[key] = tentative[key] = self._tat(key, now_ms)
            tolerance = interval * burst
            increment = interval * cost
            new_tat = tat + increment
            allow_at = new_tat - tolerance
            if increment > tolerance:
                steps.append((key, False, NEVER, -1))
                blocked = blocked or blocking
            elif allow_at <= now_ms:
                left = -1
                if consume:
                    span = tolerance - (tat - now_ms) - increment
                    left = max(0, floor(span / interval + (1e-9 + burst * 1e-12)))
                    tentative[key] = new_tat
                    last_spender[key] = i
                steps.append((key, True, 0, left))
            else:
                steps.append((key, False, max(1, ceil(allow_at - now_ms)), -1))
                blocked = blocked or blocking

        state = original if blocked else tentative
        results = []
        for i, (check, (key, allowed, retry, left)) in enumerate(
                zip(checks, steps, strict=True)):
            if blocked or left < 0 or last_spender.get(key) != i:
                interval, burst = check.interval_ms, check.burst
                span = interval * burst - (state[key] - now_ms)
                left = max(0, floor(span / interval + (1e-9 + burst * 1e-12)))
            results.append(BudgetResult(allowed, left, retry))

        if not blocked:
            for key in last_spender:
                tat = tentative[key]
                self._put(key, tat, now_ms + ttl_for(tat, now_ms))
            if once is not None:
                self._put(once, _ONCE_VALUE, now_ms + once_ttl_ms)
        return Evaluation(tuple(results), committed=not blocked)

    def _duplicate(self, checks: Sequence[BudgetCheck], now_ms: int) -> Evaluation:
        """A message already counted: nothing tested or spent, each bucket's free units."""
        prefix = self._prefix
        return Evaluation(
            tuple(
                BudgetResult(
                    True,
                    free_units(c.interval_ms, c.burst, self._tat(prefix + c.key, now_ms), now_ms),
                    0,
                )
                for c in checks
            ),
            committed=False,
            duplicate=True,
        )

    async def inspect(self, keys: Sequence[str], now_ms: int) -> list[BucketState | None]:
        states: list[BucketState | None] = []
        with self._lock:
            self._seen(now_ms)
            for key in keys:
                entry = self._get(self._prefix + key, now_ms)
                states.append(
                    None if entry is None else BucketState(key, entry[0], entry[1] - now_ms))
        return states

    async def scan(self, pattern: str, count: int = 1000) -> list[str]:
        """Keys matching ``pattern`` (Redis glob syntax), sorted; which ones when more than
        ``count`` match is unspecified (as with Redis SCAN).

        It runs under the lock every decision takes (``counters`` asks it of a running
        server), so it does little: it stops at ``count`` keys, passes over keys that do
        not start with the pattern's literal beginning without a regex, and needs none at
        all for that beginning and ``*`` (a limit's bucket prefix, what ``counters`` asks)."""
        if count <= 0:
            return []
        literal = _GLOB_SPECIAL.split(pattern, maxsplit=1)[0]
        matcher = None if pattern == literal + "*" else redis_glob_to_regex(pattern)
        now = self._last_now
        start, n = self._prefix + literal, len(self._prefix)
        found: list[str] = []
        with self._lock:
            for key, (_, expiry) in self._data.items():
                if (expiry > now and key.startswith(start)
                        and (matcher is None or matcher.fullmatch(key, n))):
                    found.append(key[n:])
                    if len(found) >= count:
                        break
        found.sort()
        return found

    async def reset(self, keys: Sequence[str]) -> int:
        existed = 0
        with self._lock:
            for key in dict.fromkeys(keys):
                if self._get(self._prefix + key, self._last_now) is not None:
                    del self._data[self._prefix + key]
                    existed += 1
        return existed

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
