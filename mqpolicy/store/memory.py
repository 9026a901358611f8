"""The embedded counter store: budgets in a dict, for one process.

Implements :class:`mqpolicy.store.budget.CounterStore` with exactly the rules and the integer
arithmetic of ``lua/gcra_batch.lua``; one suite (``tests/store/test_stores.py``) runs against both,
and ``tests/store/test_exact_budgets.py`` holds both to an oracle of its own.

Decision rules, shared with the Lua script (the budget module's docstring gives the contract
and the arithmetic):

* checks are tested in order; a check sees what earlier checks of the same decision spent on
  the same key (so two checks on one key cannot both take the last unit);
* the decision commits unless a *blocking* check failed; if it commits, every passing
  ``consume`` check is spent (a spend of 0 too: the bucket's refill is written) and the once
  key (if any) is set; if not, nothing is written;
* ``remaining`` is what the bucket holds after the decision: for the check that made the last
  spend on its key it is that spend's own figure; otherwise (peek, failed check,
  uncommitted decision) it is the bucket's free units after the decision (before it, for an
  uncommitted one), counted with the check's own unit and burst;
* a duplicate (once key present) tests and spends nothing: ``committed=False``,
  ``duplicate=True`` and, per check, ``allowed=True``, the bucket's free units, no retry.

Entries, and what bounds them
-----------------------------
A bucket is one ``int`` packing its debt, its time and the time it is full again; a once
key is its expiry; both live in plain dicts, each with a deque of its keys as the sweep's
line (183 bytes an entry with its key, where an ``OrderedDict`` of tuples took 305:
``bench/memory_store_size.py``). Both follow the callers' clock (``now_ms``) and nothing
else:

* a bounded round-robin sweep (``_SWEEP_BATCH`` entries every ``_SWEEP_EVERY`` writes,
  every ``_SWEEP_EVERY_IDLE`` writes after a slice that found nothing to drop) drops
  buckets full again :data:`~mqpolicy.store.budget.CLOCK_STEP_ALLOWANCE_MS` before the caller's
  ``now_ms`` (as Redis expires its keys by its own clock) and once keys past their expiry,
  so keys nobody reads again do not pile up. An entry that carries debt at the caller's
  time is never dropped: a clock that steps back finds every debt it left, and so does one
  that steps back after a step forward of up to the allowance (further forward, a bucket
  full at that time may be dropped, and is found full after the step back);
* ``max_entries`` bounds buckets and once keys together. A decision that needs new entries
  in a full store makes room without ever raising a budget: expired once keys, then
  buckets full at its ``now_ms`` (no debt: the same as absent) among the ``_EVICT_PROBE``
  looked at longest ago, then, when they are enough, live once keys, oldest first (such a
  message seen again is counted again: spent twice, never let through). When every entry
  left is a bucket in debt, the decision is refused with a :class:`StoreError` ("memory
  store full") and each limit follows its ``on_store_error``, as with a Redis at its
  ``maxmemory`` (the decision service counts and logs it as a store error).
  ``evicted_full``, ``evicted_once`` and ``refused`` count each (metrics
  ``mqpolicy_memory_store_*``); the first once-key eviction of a burst is logged.

Every call holds the store's lock for its whole (synchronous) work, so each is atomic for
callers on the event loop and on other threads alike; :meth:`MemoryStore.evaluate_now` is
the decision without a coroutine, for the milter's threads.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from collections.abc import Collection, Sequence
from typing import Final

from mqpolicy.daemon.structured_log import LogBurst
from mqpolicy.policy.rates import DEFAULT_ONCE_TTL_MS, EXACT_LIMIT
from mqpolicy.store.budget import (
    CLOCK_STEP_ALLOWANCE_MS,
    NEVER,
    TIME_LIMIT,
    BucketState,
    BudgetCheck,
    BudgetResult,
    Evaluation,
    Spend,
    StoreError,
    free_units,
    given_back,
    refuse_check,
    validate_decision,
)

log = logging.getLogger("mqpolicy.store")

DEFAULT_MAX_ENTRIES: Final = 1_000_000
"""``store.max_entries``: buckets and once keys together (about 200 MB at the bound)."""
_SWEEP_EVERY = 16
"""Run one sweep slice after this many writes..."""
_SWEEP_EVERY_IDLE = 64
"""... or this many, when the last slice found every entry alive (moving live entries to
the back of the line is all such a slice does: four times less of it)."""
_SWEEP_BATCH = 32
"""Entries looked at per sweep slice: twice the write rate while slices find expired
entries (half of it after one that found none, until one finds some again): keys nobody
reads again are dropped about as fast as they are written."""
_EVICT_PROBE = 64
"""Buckets a decision that needs room in a full store looks at (at least twice the
entries it needs), the ones looked at longest ago first."""
_BITS = 53
_MASK = (1 << _BITS) - 1
"""A bucket's packed value: ``full_at << 106 | debt << 53 | at`` (debt and at < 2**53)."""
_new = tuple.__new__  # positional NamedTuples without their keyword __new__


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
    """Budgets in this process's memory (the default store; not shared between processes).

    ``max_entries`` bounds buckets and once keys together (see the module docstring).
    ``key_prefix`` is accepted for the factory's sake and not stored: this store's keys are
    its own (Redis keys need a prefix, being shared)."""

    in_process = True
    """Answers without I/O: callers need no deadline around it."""

    def __init__(self, key_prefix: str = "mqpolicy:", *,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be positive: {max_entries}")
        self.max_entries = max_entries
        # bucket key -> full_at << 106 | debt << 53 | at (the callers' ms clock)
        self._buckets: dict[str, int] = {}
        # once key -> its expiry in the callers' ms clock
        self._once: dict[str, int] = {}
        # The sweep's lines: every key once (more after a reset), looked at in turn; a
        # plain dict and a deque of its keys cost 50 bytes an entry less than an OrderedDict
        self._bucket_line: deque[str] = deque()
        self._once_line: deque[str] = deque()
        self._until_sweep = _SWEEP_EVERY  # writes left before the next sweep slice
        self._now = 0  # the last caller's clock (scan has none of its own)
        self.evicted_full = 0
        """Full buckets (no debt at the caller's time) dropped to make room at the bound."""
        self.evicted_once = 0
        """Live once keys dropped to make room at the bound (such a message, seen again,
        is counted again)."""
        self.refused = 0
        """Decisions refused (StoreError) because every entry left was a bucket in debt."""
        self._bound_log = LogBurst(60.0)
        # message ledgers (budget.Spend lists) with their expiry, outside max_entries: a
        # ledger lives from a message's first RCPT to its end (store.once_ttl at most),
        # one per message in flight; kept apart, the bound's evictions never lose one
        self._ledgers: dict[str, tuple[int, list[Spend]]] = {}
        self._ledger_line: deque[str] = deque()
        # Decisions may come from several threads (the milter's): one at a time.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Entries held (buckets and once keys), including dead ones not swept yet."""
        return len(self._buckets) + len(self._once)

    # -- CounterStore ----------------------------------------------------------------------

    async def evaluate(
        self,
        checks: Sequence[BudgetCheck],
        now_ms: int,
        once_key: str | None = None,
        once_ttl_ms: int = DEFAULT_ONCE_TTL_MS,
        ledger_key: str | None = None,
    ) -> Evaluation:
        return self.evaluate_now(checks, now_ms, once_key, once_ttl_ms, ledger_key)

    def evaluate_now(
        self,
        checks: Sequence[BudgetCheck],
        now_ms: int,
        once_key: str | None = None,
        once_ttl_ms: int = DEFAULT_ONCE_TTL_MS,
        ledger_key: str | None = None,
    ) -> Evaluation:
        """:meth:`evaluate` without a coroutine, for callers on any thread (the milter's).

        The arithmetic of :mod:`mqpolicy.store.budget` (:func:`~mqpolicy.store.budget.debt_at`,
        :func:`~mqpolicy.store.budget.free_units`) is written out inline: this runs for every
        decision. Python's integers are exact at any size, so the refill is computed
        without the cap the Lua script needs; the results are the same."""
        if type(now_ms) is not int or not 0 <= now_ms < TIME_LIMIT:
            raise ValueError(f"now_ms must be an integer in [0, 2**53): {now_ms!r}")
        if type(once_ttl_ms) is not int or not 0 < once_ttl_ms < TIME_LIMIT:
            raise ValueError(f"once_ttl_ms must be a positive integer below 2**53: "
                             f"{once_ttl_ms!r}")
        with self._lock:
            self._now = now_ms
            if once_key is not None:
                expiry = self._once.get(once_key)
                if expiry is not None and expiry > now_ms:
                    validate_decision(checks, now_ms, once_ttl_ms)
                    return self._duplicate(checks, now_ms)
            buckets = self._buckets
            # bucket -> (debt before this decision, debt now, the bucket's time), both
            # debts refilled to the bucket's time max(stored time, now)
            seen: dict[str, tuple[int, int, int]] = {}
            results: list[BudgetResult] = []
            spent: dict[str, int] = {}  # bucket -> index of its last spend
            blocked = repeated = False
            for check in checks:
                key, refill, unit, burst, cost, consume, blocking, after = check
                if (type(refill) is not int or type(unit) is not int or type(burst) is not int
                        or type(cost) is not int or not 0 < refill <= EXACT_LIMIT
                        or unit <= 0 or burst < 0 or burst * unit > EXACT_LIMIT
                        or not 0 <= cost < TIME_LIMIT):
                    refuse_check(check)  # says what is wrong
                skipped = False
                if after:  # counted only if the check it names failed (> 0) or passed
                    if not 0 < abs(after) <= len(results):
                        raise ValueError(f"after must name an earlier check: {check!r}")
                    if results[abs(after) - 1].allowed is (after > 0):
                        consume = blocking = False  # not counted: a peek, allowed below
                        skipped = True
                state = seen.get(key)
                if state is None:
                    packed = buckets.get(key)
                    if packed is None:
                        debt, at = 0, now_ms
                    else:
                        at = packed & _MASK
                        debt = packed >> _BITS & _MASK
                        if now_ms > at:
                            if debt:
                                debt = max(debt - refill * (now_ms - at), 0)
                            at = now_ms
                    before = debt
                else:
                    repeated = True
                    before, debt, at = state
                room = burst * unit - debt
                if cost > burst:
                    results.append(_new(BudgetResult, (False, room // unit if room > 0 else 0,
                                                       NEVER)))
                    blocked = blocked or blocking
                elif cost * unit <= room:
                    if consume:
                        debt += cost * unit
                        room -= cost * unit
                        spent[key] = len(results)
                    results.append(_new(BudgetResult, (True, room // unit, 0)))
                else:
                    wait = at - now_ms - (room - cost * unit) // refill  # ceil, exact
                    results.append(_new(BudgetResult, (False, room // unit if room > 0 else 0,
                                                       wait)))
                    blocked = blocked or blocking
                if skipped:
                    results[-1] = _new(BudgetResult, (True, results[-1].remaining, 0))
                seen[key] = (before, debt, at)
            if blocked or repeated:
                self._settle(checks, results, seen, spent, blocked)
            if blocked:
                return _new(Evaluation, (tuple(results), False, False))
            self._commit(checks, seen, spent, now_ms, once_key, once_ttl_ms)
            if ledger_key is not None and spent:
                self._add_to_ledger(ledger_key, checks, seen, spent, now_ms + once_ttl_ms)
            return _new(Evaluation, (tuple(results), True, False))

    def look_now(self, checks: Sequence[BudgetCheck], now_ms: int) -> list[tuple[bool, int]]:
        """What each check finds now, alone and spending nothing: ``allowed`` and
        ``retry_after_ms`` as :meth:`evaluate_now` answers them for checks that spend
        nothing (``consume`` false, no ``after``). Writes nothing; any thread.

        ``mqpolicy replay`` looks so at the buckets that deferred a mail before its next
        try: the arithmetic of :meth:`evaluate_now`, without a decision's bookkeeping."""
        if type(now_ms) is not int or not 0 <= now_ms < TIME_LIMIT:
            raise ValueError(f"now_ms must be an integer in [0, 2**53): {now_ms!r}")
        found: list[tuple[bool, int]] = []
        with self._lock:
            self._now = now_ms
            buckets = self._buckets
            for check in checks:
                key, refill, unit, burst, cost = check[:5]
                if (type(refill) is not int or type(unit) is not int or type(burst) is not int
                        or type(cost) is not int or not 0 < refill <= EXACT_LIMIT
                        or unit <= 0 or burst < 0 or burst * unit > EXACT_LIMIT
                        or not 0 <= cost < TIME_LIMIT):
                    refuse_check(check)  # says what is wrong
                packed = buckets.get(key)
                if packed is None:
                    debt, at = 0, now_ms
                else:
                    at = packed & _MASK
                    debt = packed >> _BITS & _MASK
                    if now_ms > at:
                        if debt:
                            debt = max(debt - refill * (now_ms - at), 0)
                        at = now_ms
                room = burst * unit - debt
                if cost > burst:
                    found.append((False, NEVER))
                elif cost * unit <= room:
                    found.append((True, 0))
                else:
                    found.append((False, at - now_ms - (room - cost * unit) // refill))
        return found

    def _add_to_ledger(self, ledger_key: str, checks: Sequence[BudgetCheck],
                       seen: dict[str, tuple[int, int, int]], spent: dict[str, int],
                       expiry: int) -> None:
        entries = [Spend(key, debt - before, before, at, checks[i].refill)
                   for key, i in spent.items()
                   for before, debt, at in (seen[key],) if debt > before]
        if not entries:
            return
        ledgers = self._ledgers
        known = ledgers.get(ledger_key)
        if known is None:
            self._ledger_line.append(ledger_key)
            ledgers[ledger_key] = (expiry, entries)
        else:
            known[1].extend(entries)
            ledgers[ledger_key] = (expiry, known[1])
        line, now = self._ledger_line, self._now
        while line:  # expired ledgers, oldest first, up to the first alive
            held = ledgers.get(line[0])
            if held is not None and held[0] > now:
                break
            key = line.popleft()
            if held is not None:
                del ledgers[key]

    async def give_back(self, ledger_key: str, now_ms: int) -> int:
        return self.give_back_now(ledger_key, now_ms)

    def give_back_now(self, ledger_key: str, now_ms: int) -> int:
        """:meth:`give_back` without a coroutine (the milter's threads)."""
        with self._lock:
            held = self._ledgers.pop(ledger_key, None)
            if held is None or held[0] <= now_ms:
                return 0
            buckets = self._buckets
            for spend in held[1]:
                packed = buckets.get(spend.key)
                if not packed:
                    continue  # full already: nothing to give back
                at, debt = packed & _MASK, packed >> _BITS & _MASK
                time = max(at, now_ms)
                if time > at and debt:
                    debt = max(0, debt - spend.refill * (time - at))
                debt -= min(debt, given_back(spend, time))
                if debt:
                    buckets[spend.key] = ((time - (-debt // spend.refill)) << 2 * _BITS
                                          | debt << _BITS | time)
                else:
                    buckets[spend.key] = 0  # full: no bucket, left to the sweep
            return len(held[1])

    async def move_ledger(self, ledger_key: str, to_key: str) -> None:
        with self._lock:
            held = self._ledgers.pop(ledger_key, None)
            if held is not None:
                self._ledgers[to_key] = held
                self._ledger_line.append(to_key)

    def ledger(self, ledger_key: str) -> list[Spend]:
        """The spends a ledger holds (tests and ``counters``)."""
        with self._lock:
            held = self._ledgers.get(ledger_key)
            return list(held[1]) if held is not None else []

    @staticmethod
    def _settle(checks: Sequence[BudgetCheck], results: list[BudgetResult],
                seen: dict[str, tuple[int, int, int]], spent: dict[str, int],
                blocked: bool) -> None:
        """``remaining`` as the rules say it when the decision did not commit (each bucket
        as it was) or checked a bucket twice (as the decision left it, except for the
        check that made its last spend)."""
        for i, check in enumerate(checks):
            before, after, _ = seen[check.key]
            if blocked:
                debt = before
            elif spent.get(check.key) == i:
                continue
            else:
                debt = after
            allowed, _, retry_after_ms = results[i]
            results[i] = _new(BudgetResult, (allowed, free_units(debt, check.unit, check.burst),
                                             retry_after_ms))

    def _commit(self, checks: Sequence[BudgetCheck], seen: dict[str, tuple[int, int, int]],
                spent: dict[str, int], now_ms: int, once_key: str | None,
                once_ttl_ms: int) -> None:
        """Write what a committed decision spent, and its once key, making room first."""
        if not spent and once_key is None:
            return  # nothing to write (a check at RCPT): the usual case
        buckets, once = self._buckets, self._once
        new = [key for key in spent if key not in buckets and seen[key][1]]
        new_once = once_key is not None and once_key not in once
        needed = len(new) + new_once
        if needed and len(buckets) + len(once) + needed > self.max_entries:
            self._make_room(needed, now_ms, spent)
        for key, i in spent.items():
            _, debt, at = seen[key]
            if debt:
                refill = checks[i].refill
                buckets[key] = (at - (-debt // refill)) << 2 * _BITS | debt << _BITS | at
            elif key in buckets:  # a full bucket is no bucket: timeless, left to the sweep
                buckets[key] = 0
        self._bucket_line.extend(new)
        if once_key is not None:
            if new_once:
                self._once_line.append(once_key)
            once[once_key] = now_ms + once_ttl_ms
        self._until_sweep -= len(spent) + (once_key is not None)
        while self._until_sweep <= 0:
            dropped = self._sweep(now_ms)
            self._until_sweep += _SWEEP_EVERY if dropped else _SWEEP_EVERY_IDLE

    def _sweep(self, now_ms: int) -> int:
        """Look at the ``_SWEEP_BATCH`` buckets looked at longest ago: drop those full
        again ``CLOCK_STEP_ALLOWANCE_MS`` before ``now_ms``, requeue the rest; drop once
        keys expired at ``now_ms``. Returns how many were dropped."""
        buckets, line = self._buckets, self._bucket_line
        horizon = now_ms - CLOCK_STEP_ALLOWANCE_MS
        dropped = 0
        for _ in range(min(_SWEEP_BATCH, len(line))):
            key = line.popleft()
            packed = buckets.get(key)
            if packed is None:  # reset meanwhile
                continue
            if packed >> 2 * _BITS > horizon:
                line.append(key)
            else:
                del buckets[key]
                dropped += 1
        return dropped + self._drop_expired_once(now_ms, _SWEEP_BATCH)

    def _drop_expired_once(self, now_ms: int, most: int) -> int:
        """Drop once keys expired at ``now_ms``, oldest first, up to the first alive (they
        share one lifetime, ``store.once_ttl``) and at most ``most``; how many."""
        once, line = self._once, self._once_line
        dropped = 0
        while dropped < most and line:
            expiry = once.get(line[0])
            if expiry is not None and expiry > now_ms:
                break
            key = line.popleft()
            if expiry is not None:  # None: reset meanwhile
                del once[key]
                dropped += 1
        return dropped

    def _make_room(self, needed: int, now_ms: int, keep: Collection[str]) -> None:
        """Free ``needed`` entries without raising any budget (see the module docstring),
        or raise StoreError (having dropped only dead entries: no live once key is lost
        for a decision that is refused anyway)."""
        buckets, once = self._buckets, self._once
        bucket_line, once_line = self._bucket_line, self._once_line
        free = self.max_entries - len(buckets) - len(once)
        if free < needed:
            free += self._drop_expired_once(now_ms, needed - free)
        probes = min(len(bucket_line), max(_EVICT_PROBE, 2 * needed))
        while free < needed and probes > 0:  # buckets full at now_ms
            key = bucket_line.popleft()
            probes -= 1
            packed = buckets.get(key)
            if packed is None:
                continue
            if packed >> 2 * _BITS <= now_ms and key not in keep:
                del buckets[key]
                free += 1
                self.evicted_full += 1
            else:
                bucket_line.append(key)
        evicted = 0
        while needed - len(once) <= free < needed:  # live once keys are enough: drop them
            key = once_line.popleft()
            if key in once:
                del once[key]
                free += 1
                evicted += 1
        if evicted:
            self.evicted_once += evicted
            if self._bound_log.take() is not None:
                log.warning("memory store full: dropped once keys, oldest first",
                            extra={"fields": {"max_entries": self.max_entries,
                                              "evicted_once": self.evicted_once}})
        if free < needed:
            self.refused += 1
            raise StoreError(f"memory store full: its {self.max_entries} entries "
                             "(store.max_entries) are all budgets in use")

    def _duplicate(self, checks: Sequence[BudgetCheck], now_ms: int) -> Evaluation:
        """A message already counted: nothing tested or spent, each bucket's free units."""
        return Evaluation(
            tuple(BudgetResult(True, free_units(self._debt(c.key, c.refill, now_ms), c.unit,
                                                c.burst), 0)
                  for c in checks),
            committed=False,
            duplicate=True,
        )

    def _debt(self, key: str, refill: int, now_ms: int) -> int:
        packed = self._buckets.get(key)
        if packed is None:
            return 0
        at, debt = packed & _MASK, packed >> _BITS & _MASK
        if now_ms <= at:
            return debt
        return max(0, debt - refill * (now_ms - at))

    def _state(self, key: str, now_ms: int) -> BucketState | None:
        packed = self._buckets.get(key)
        if packed is not None:
            kept_until = (packed >> 2 * _BITS) + CLOCK_STEP_ALLOWANCE_MS
            if kept_until <= now_ms or not packed >> _BITS & _MASK:  # a full bucket: none
                return None
            return BucketState(key, packed >> _BITS & _MASK, packed & _MASK,
                               kept_until - now_ms)
        expiry = self._once.get(key)
        if expiry is None or expiry <= now_ms:
            return None
        return BucketState(key, 0, now_ms, expiry - now_ms)

    async def inspect(self, keys: Sequence[str], now_ms: int) -> list[BucketState | None]:
        with self._lock:
            return [self._state(key, now_ms) for key in keys]

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
        found: list[str] = []
        with self._lock:
            now = self._now
            horizon = now - CLOCK_STEP_ALLOWANCE_MS
            live = ((key for key, packed in self._buckets.items()  # in debt, or kept
                     if packed >> 2 * _BITS > horizon and packed >> _BITS & _MASK),
                    (key for key, expiry in self._once.items() if expiry > now))
            for keys in live:
                for key in keys:
                    if key.startswith(literal) and (matcher is None or matcher.fullmatch(key)):
                        found.append(key)
                        if len(found) >= count:
                            break
                if len(found) >= count:
                    break
        found.sort()
        return found

    async def reset(self, keys: Sequence[str]) -> int:
        existed = 0
        with self._lock:
            for key in dict.fromkeys(keys):
                if self._state(key, self._now) is not None:
                    existed += 1
                self._buckets.pop(key, None)
                self._once.pop(key, None)
        return existed

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
