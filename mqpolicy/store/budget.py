"""Rate budgets: the contract between the engine and the counter stores, and their arithmetic.

A decision hands the store a list of :class:`BudgetCheck` and gets one :class:`Evaluation`
back from ONE atomic operation (one Lua call on Redis, one step under a lock in memory):

* every check is tested against its bucket at ``now_ms``;
* if any *blocking* check fails, nothing is spent (all-or-nothing);
* otherwise every check with ``consume`` that passed is spent; a failing non-blocking
  check (monitor, demote) is simply not spent;
* a check with ``after`` counts only when the check it names failed (or passed): a
  demotion's target-lane limits count only if the demote check failed, the first lane's
  only if it passed, in the same atomic step;
* with a ``once_key``: if the key already exists, the message was already counted and
  nothing is tested or spent (``duplicate``); otherwise the key is set when the decision
  commits, so the next front-end that sees the same message does not count it again;
* with a ``ledger_key`` (a message's RCPT decisions): when the decision commits, what it
  spent on each bucket (:class:`Spend`) is added to the message's *ledger*, in the same
  atomic step, kept as long as a once key. A message refused or held at its end has its
  ledger *given back* (:meth:`CounterStore.give_back`, :func:`given_back`): every budget
  is then what it would be had the message never come (up to refill with time).

The arithmetic: exact integers
------------------------------
A rate of ``count`` units every ``period_ms`` is reduced by ``g = gcd(count, period_ms)`` to
``n / p`` units per ms, and a bucket counts in *scaled tokens*: one unit of budget is
``unit = p * k`` tokens and ``refill = n * k`` tokens come back every ms (``k`` is a
precision factor, see :func:`bucket_scale`; it changes nothing but the size of the numbers).
A bucket holds ``burst * unit`` tokens when full. It is stored as two integers: its *debt*
``D`` (tokens missing from full) at the time ``t`` (ms) (:func:`format_bucket`); no stored
key means a full bucket.
At ``now`` the debt is ``max(0, D - refill * (now - t))`` and the bucket's time becomes
``max(t, now)``:

* a budget of N admits exactly N at one instant, and refills exactly at the rate (no
  rounding anywhere: 6/1s admits 6 in one ms; 1000000000/1d refills 1000000000 a day);
* ``remaining`` is ``floor((burst * unit - D) / unit)``, the whole units left;
* ``retry_after_ms`` of a refused check is the exact first ms at which its cost fits:
  ``ceil((cost * unit - (burst * unit - D)) / refill)`` after the bucket's time (:data:`NEVER`
  when the cost exceeds the burst);
* a clock that steps back (the callers' ``now_ms`` below a bucket's ``t``) refills nothing
  and takes nothing: the bucket counts from its own ``t`` until the clock passes it again.

Every number stays an exact integer below 2**53, which Redis' Lua (IEEE doubles) needs:
the config refuses a rate and burst whose ``burst * p`` or ``n`` exceeds
:data:`EXACT_LIMIT` (2**52, so a sum of two such numbers is still exact), with the largest
burst that would fit (:func:`exactness_problem`); the refill is computed with the elapsed
time capped at the time to fill the debt, so no product exceeds the debt; divisions are
exact integer divisions (``lua/gcra_batch.lua`` divides with ``fmod``). Times (``now_ms``)
must lie in ``[0, 2**53)``.

A bucket key names its limit's rate, burst and :data:`BUCKET_VERSION`: a changed rate,
burst or arithmetic starts fresh buckets instead of misreading old ones.

Per-decision values are NamedTuples: immutable and about 3x cheaper to build than frozen
dataclasses, which matters at thousands of decisions per second.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from mqpolicy.policy.rates import (
    DEFAULT_ONCE_TTL_MS,
    bucket_scale,
    ceil_div,
)

NEVER = -1
"""``retry_after_ms`` when a cost can never fit in the bucket (cost larger than burst)."""

TIME_LIMIT = 1 << 53
"""Times (``now_ms``), costs and once-key lifetimes are integers below this."""

CLOCK_STEP_ALLOWANCE_MS = 60_000
"""A bucket entry is kept this long after its bucket is full again (the Redis TTL, the
memory store's sweep): a callers' clock that steps back by up to this much still finds the
debt it left. Redis expires keys by its own clock, so without it a step back would find
short-lived buckets gone, i.e. full."""


class StoreError(Exception):
    """A counter store could not answer (connection lost, timeout, script error, full)."""


class StoreTimeout(StoreError):
    """A counter store did not answer within its deadline."""


class BudgetCheck(NamedTuple):
    """One bucket to test (and maybe spend) in a decision.

    ``refill`` tokens come back per ms and one unit of budget is ``unit`` tokens (both from
    :func:`bucket_scale`); the bucket holds ``burst * unit`` tokens. Every check of one key
    must use the same ``refill`` (a backoff changes ``unit`` and ``burst`` only)."""

    key: str
    refill: int
    unit: int
    burst: int
    cost: int
    consume: bool = True
    blocking: bool = True
    # 0: always counted. k > 0: counted only if check k-1 of the same decision (1-based k)
    # failed; k < 0: only if check -k-1 passed (a demotion: the target lane's limits, the
    # first lane's). A check not counted is allowed, spends nothing and blocks nothing.
    after: int = 0

    @property
    def interval_ms(self) -> float:
        """The time one unit takes to come back (for display and wake-up estimates)."""
        return self.unit / self.refill


class BudgetResult(NamedTuple):
    """What one check found. ``remaining`` is what is left after this decision."""

    allowed: bool
    remaining: int
    retry_after_ms: int = 0


class Evaluation(NamedTuple):
    results: tuple[BudgetResult, ...]
    committed: bool
    duplicate: bool = False


class Spend(NamedTuple):
    """What one committed decision took from one bucket, as a message's *ledger* keeps it
    for a give-back (:func:`given_back`): ``amount`` tokens added to the bucket's debt,
    on top of a debt of ``backlog`` tokens, at the bucket's time ``at_ms``."""

    key: str
    amount: int
    backlog: int
    at_ms: int
    refill: int


def given_back(spend: Spend, bucket_time_ms: int) -> int:
    """The tokens of ``spend`` a bucket still holds at ``bucket_time_ms``: a bucket refills
    its oldest debt first, so refill since the spend paid the ``backlog`` before it, then
    the spend. Lowering the bucket's debt by this much leaves the bucket as it would be
    had the spend never been made (later spends stay, as they came after it)."""
    elapsed = bucket_time_ms - spend.at_ms
    if elapsed <= 0:
        return spend.amount
    if elapsed >= ceil_div(spend.amount + spend.backlog, spend.refill):
        return 0
    refilled = spend.refill * elapsed
    if refilled <= spend.backlog:
        return spend.amount
    return spend.amount - (refilled - spend.backlog)


class BucketState(NamedTuple):
    """A stored key as ``counters`` shows it: a bucket's debt (tokens) at ``at_ms``, and the
    time the store keeps it (a once key: debt 0)."""

    key: str
    debt: int
    at_ms: int
    ttl_ms: int

    def debt_now(self, refill: int, now_ms: int) -> int:
        return debt_at(self.debt, self.at_ms, now_ms, refill)

    def free_units(self, refill: int, unit: int, burst: int, now_ms: int) -> int:
        """Whole units the bucket holds at ``now_ms``."""
        return free_units(self.debt_now(refill, now_ms), unit, burst)

    def full_at_ms(self, refill: int, now_ms: int) -> int:
        """When the bucket is full again, in the callers' clock."""
        return max(self.at_ms, now_ms) + ceil_div(self.debt_now(refill, now_ms), refill)


# ---------------------------------------------------------------- the arithmetic


def debt_at(debt: int, at_ms: int, now_ms: int, refill: int) -> int:
    """A bucket's debt at ``now_ms``: ``refill`` tokens a ms since ``at_ms``, nothing
    refilled before it (a clock stepped back), never below 0."""
    if now_ms <= at_ms or debt == 0:
        return debt
    left = debt - refill * (now_ms - at_ms)
    return left if left > 0 else 0


def free_units(debt: int, unit: int, burst: int) -> int:
    """Whole units of ``unit`` tokens left in a bucket of ``burst`` units with ``debt``."""
    left = burst * unit - debt
    return left // unit if left > 0 else 0


def budget_check(key: str, count: int, period_ms: int, burst: int, cost: int,
                 consume: bool = True, blocking: bool = True) -> BudgetCheck:
    """The check of ``cost`` units against ``key``'s bucket of ``burst`` units refilled at
    ``count`` every ``period_ms``."""
    refill, unit = bucket_scale(count, period_ms, burst)
    return BudgetCheck(key, refill, unit, burst, cost, consume, blocking)


# ---------------------------------------------------------------- stored form


_STORED = struct.Struct("<dd")
"""A bucket as ``lua/gcra_batch.lua`` stores it in Redis: its debt and its time, two
little-endian doubles (``struct.pack('<dd', ...)`` in Redis' Lua), integers both."""


def format_bucket(debt: int, at_ms: int) -> bytes:
    """A bucket's stored value, as ``lua/gcra_batch.lua`` writes it."""
    return _STORED.pack(debt, at_ms)


def parse_bucket(value: bytes | str) -> tuple[int, int]:
    """``(debt, at_ms)`` of a stored value; ``(0, 0)`` for one that is not a bucket (a once
    key's ``1``)."""
    if not isinstance(value, bytes) or len(value) != _STORED.size:
        return 0, 0
    debt, at = _STORED.unpack(value)
    return int(debt), int(at)


class CounterStore(Protocol):
    """A place where budgets live. Implementations: memory, redis (sentinel, cluster)."""

    async def evaluate(
        self,
        checks: Sequence[BudgetCheck],
        now_ms: int,
        once_key: str | None = None,
        once_ttl_ms: int = DEFAULT_ONCE_TTL_MS,
        ledger_key: str | None = None,
    ) -> Evaluation:
        """Test and spend atomically, as described in this module's docstring; with a
        ``ledger_key``, a committed decision's spends are added to that ledger (kept
        ``once_ttl_ms``) in the same step."""
        ...

    async def inspect(self, keys: Sequence[str], now_ms: int) -> list[BucketState | None]:
        """The stored state of each key (None when absent or expired)."""
        ...

    async def give_back(self, ledger_key: str, now_ms: int) -> int:
        """Give back every spend the ledger ``ledger_key`` holds (:func:`given_back`) and
        delete it, atomically for the ledger (two callers never both give one back);
        how many spends were given back."""
        ...

    async def move_ledger(self, ledger_key: str, to_key: str) -> None:
        """Keep the ledger ``ledger_key`` under ``to_key`` (nothing when there is none)."""
        ...

    async def scan(self, pattern: str, count: int = 1000) -> list[str]:
        """Keys (without the store's prefix) matching a glob ``pattern``, at most ``count``."""
        ...

    async def reset(self, keys: Sequence[str]) -> int:
        """Delete buckets; returns how many existed."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers."""
        ...

    async def close(self) -> None: ...
