"""One suite for both counter stores (memory and Redis/Lua), plus Redis failure behaviour.

The oracle is :class:`tests.support.budget_oracle.Oracle`: the promise in exact fractions, and the
decision rules written out plainly. Times are the wall clock plus a growing offset: Redis
expires keys by its own clock, so the callers' clock must not run slower than the wall.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pytest

from mqpolicy.policy.rates import DEFAULT_ONCE_TTL_MS
from mqpolicy.store.batch_script import SCRIPT_NAME, PendingDecision
from mqpolicy.store.budget import (
    CLOCK_STEP_ALLOWANCE_MS,
    NEVER,
    BudgetCheck,
    BudgetResult,
    CounterStore,
    Evaluation,
    StoreError,
    StoreTimeout,
    budget_check,
)
from mqpolicy.store.memory import MemoryStore
from mqpolicy.store.opener import open_store
from mqpolicy.store.redis import CoalescingStore, RedisStore
from mqpolicy.store.redis_connection import load_script
from tests.support.async_poll import poll_async
from tests.support.budget_oracle import Oracle, RateCheck
from tests.support.redis_fixture import RedisServer

HOUR = 3_600_000
LONG_ONCE_TTL_MS = 1 << 40  # once keys outlive the offsets the callers' clock runs ahead

Body = Callable[[CounterStore], Awaitable[None]]
T = TypeVar("T")


def wall_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class StoreKit:
    """Runs an async test body against a fresh store of one kind."""

    kind: str
    server: RedisServer | None
    prefix: str = "t:"

    def make(self, **options: int) -> CounterStore:
        if self.server is None:
            return MemoryStore(key_prefix=self.prefix)
        options.setdefault("timeout_ms", 2000)  # correctness tests: generous deadline
        return RedisStore(self.server.unix_url, key_prefix=self.prefix, **options)

    def run(self, body: Body, **options: int) -> None:
        async def main() -> None:
            store = self.make(**options)
            try:
                await body(store)
            finally:
                await store.close()

        asyncio.run(main())


@pytest.fixture(params=["memory", "redis"])
def kit(request: pytest.FixtureRequest) -> StoreKit:
    if request.param == "memory":
        return StoreKit("memory", None)
    return StoreKit("redis", request.getfixturevalue("redis_clean"))


# ------------------------------------------------------------------ the oracle


def unit_check(key: str, interval_ms: int, burst: int, cost: int, consume: bool = True,
               blocking: bool = True) -> BudgetCheck:
    """``cost`` units of a bucket of ``burst`` that gets one unit back every ``interval_ms``."""
    return budget_check(key, 1, interval_ms, burst, cost, consume, blocking)


@dataclass(frozen=True)
class Profile:
    key: str
    count: int
    period_ms: int
    burst: int


PROFILES = [
    Profile("msgs", 300, 60_000, 300),  # 300/1m
    Profile("slow", 50, HOUR, 50),  # 50/1h
    Profile("bytes", 50_000_000, HOUR, 50_000_000),  # 50MB/1h: 0.072 ms per byte
    Profile("third", 3, 1000, 7),  # 3/s, burst 7: a repeating fraction
    Profile("tiny", 2, 1, 1),
    Profile("shut", 1, 1000, 0),  # burst 0: nothing ever fits
]


def random_profile(rng: random.Random) -> Profile:
    if rng.random() < 0.2:  # one shape per key: a key is always counted at one rate
        n = rng.randint(0, 3)
        shape = random.Random(n)
        return Profile(f"r{n}", shape.randint(1, 5000), shape.randint(1, 20_000_000),
                       shape.randint(0, 20))
    return rng.choice(PROFILES)


def random_cost(rng: random.Random, p: Profile) -> int:
    roll = rng.random()
    if roll < 0.08:
        return p.burst + rng.randint(1, 3)  # can never fit: NEVER
    if roll < 0.12:
        return 0
    if p.burst > 1000:
        return rng.randint(1, p.burst // 4)
    return rng.randint(1, max(1, p.burst // 2 + 1))


def random_step(rng: random.Random, p: Profile) -> int:
    return rng.choice(
        [
            0,
            0,
            1,
            rng.randint(1, 50),
            int(p.period_ms / max(1, p.count) * rng.uniform(0, 3)),
            rng.randint(1000, 120_000),
        ]
    )


def random_check(rng: random.Random, p: Profile | None = None) -> RateCheck:
    p = p or random_profile(rng)
    return RateCheck(
        p.key,
        p.count,
        p.period_ms,
        p.burst,
        random_cost(rng, p),
        consume=rng.random() < 0.85,
        blocking=rng.random() < 0.7,
    )


def for_store(checks: Sequence[RateCheck]) -> list[BudgetCheck]:
    return [c.for_store() for c in checks]


# ------------------------------------------------------------------ agreement with the oracle


@pytest.mark.parametrize("seed", range(12))
def test_single_checks_agree_with_the_oracle(kit: StoreKit, seed: int) -> None:
    """Every result as the oracle computes it, and every stored bucket holds what the
    oracle's does."""
    rng = random.Random(seed)

    async def body(store: CounterStore) -> None:
        oracle = Oracle()
        shapes: dict[str, RateCheck] = {}
        offset = 0
        for op in range(150):
            p = random_profile(rng)
            check = random_check(rng, p)
            shapes[check.key] = check
            offset += random_step(rng, p)
            now = wall_ms() + offset
            want = oracle.evaluate([check], now)
            got = await store.evaluate(for_store([check]), now)
            assert got == want, f"seed={seed} op={op} now={now} {check}"
            if op % 10 == 0:
                keys = sorted(k for k in oracle.buckets  # the buckets in debt
                              if oracle.held(shapes[k], now)[0] < shapes[k].burst)
                states = await store.inspect(keys, now)
                for key, state in zip(keys, states, strict=True):
                    shape = shapes[key].for_store()
                    held = math.floor(oracle.held(shapes[key], now)[0])
                    assert state is not None, (key, now)
                    assert state.free_units(shape.refill, shape.unit, shape.burst, now) == held

    kit.run(body)


@pytest.mark.parametrize("seed", range(12))
def test_multi_check_decisions_agree_with_the_oracle(kit: StoreKit, seed: int) -> None:
    rng = random.Random(1000 + seed)

    async def body(store: CounterStore) -> None:
        oracle = Oracle()
        offset = 0
        for op in range(120):
            checks = [random_check(rng) for _ in range(rng.randint(0, 4))]
            if checks and rng.random() < 0.15:  # the same bucket twice in one decision
                checks.append(
                    random_check(
                        rng,
                        next(p for p in PROFILES if p.key == checks[0].key)
                        if checks[0].key[0] != "r"
                        else None,
                    )
                )
            once = f"msg{rng.randint(0, 30)}" if rng.random() < 0.4 else None
            offset += random_step(rng, PROFILES[0])
            now = wall_ms() + offset
            want = oracle.evaluate(checks, now, once, LONG_ONCE_TTL_MS)
            got = await store.evaluate(for_store(checks), now, once, LONG_ONCE_TTL_MS)
            assert got == want, f"seed={seed} op={op} now={now} once={once} {checks}"

    kit.run(body)


@pytest.mark.parametrize("seed", range(6))
def test_a_batch_of_concurrent_decisions_runs_in_order(kit: StoreKit, seed: int) -> None:
    """Decisions made together (one Lua call on Redis) equal the same decisions in turn."""
    rng = random.Random(2000 + seed)

    async def body(store: CounterStore) -> None:
        oracle = Oracle()
        now = wall_ms()
        decisions = []
        for _ in range(200):  # one EVALSHA on Redis
            checks = [random_check(rng) for _ in range(rng.randint(0, 4))]
            if checks and rng.random() < 0.3:  # the same bucket twice in one decision
                checks.append(checks[rng.randrange(len(checks))])
            once = f"m{rng.randint(0, 40)}" if rng.random() < 0.5 else None
            decisions.append((checks, now, once))
            now += rng.choice([0, 0, 0, 1])  # several decisions per ms, the clock never goes back
        got = await asyncio.gather(*(store.evaluate(for_store(c), t, o, LONG_ONCE_TTL_MS)
                                     for c, t, o in decisions))
        want = [oracle.evaluate(c, t, o, LONG_ONCE_TTL_MS) for c, t, o in decisions]
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"seed={seed} decision={i} {decisions[i]}"

    kit.run(body)


def test_fractional_byte_budget_is_exact(kit: StoreKit) -> None:
    """50MB/1h: 0.072 ms per byte, 125 bytes every 9 ms: counted to the byte."""

    async def body(store: CounterStore) -> None:
        now = wall_ms()
        check = budget_check("bytes", 50_000_000, HOUR, 50_000_000, 12_345_679)
        got = await store.evaluate([check], now)
        assert got.results[0] == BudgetResult(True, 50_000_000 - 12_345_679, 0)
        second = await store.evaluate([check], now + 9)
        assert second.results[0] == BudgetResult(True, 50_000_000 - 2 * 12_345_679 + 125, 0)
        (state,) = await store.inspect(["bytes"], now + 9)
        assert state is not None
        assert state.free_units(check.refill, check.unit, check.burst, now + 9) == (
            50_000_000 - 2 * 12_345_679 + 125)
        third = await store.evaluate([check._replace(cost=1, consume=False)], now + 18)
        assert third.results[0].remaining == 50_000_000 - 2 * 12_345_679 + 250

    kit.run(body)


@pytest.mark.parametrize(
    ("count", "period_ms", "burst"),
    [
        (50_000_000, HOUR, 50_000_000),  # 50MB/1h
        (1_000_000, HOUR, 1_000_000),  # 1M/1h: 3.6 ms
        (125, 9, 1000),  # 0.072 ms per unit
        (3, 1000, 7),
        (10, 73, 99_999_989),
    ],
)
def test_full_bucket_reports_exactly_burst(kit: StoreKit, count: int, period_ms: int,
                                           burst: int) -> None:
    """At epoch-ms magnitudes a full bucket holds exactly ``burst``: a peek says ``burst``,
    spending ``cost`` leaves exactly ``burst - cost``; allowed is unchanged."""

    async def body(store: CounterStore) -> None:
        base = wall_ms()
        for i in range(40):
            now = base + 3 * i
            key = f"full{i}"
            peek = await store.evaluate(
                [budget_check(key, count, period_ms, burst, 1, False)], now)
            assert peek == Evaluation((BudgetResult(True, burst, 0),), committed=True), now
            cost = 1 + i * (burst // 64)
            spend = await store.evaluate([budget_check(key, count, period_ms, burst, cost)], now)
            assert spend == Evaluation((BudgetResult(True, burst - cost, 0),), committed=True), (
                now,
                cost,
            )

    kit.run(body)


def test_cost_above_burst_never_fits(kit: StoreKit) -> None:
    async def body(store: CounterStore) -> None:
        now = wall_ms()
        got = await store.evaluate([unit_check("k", 1000, 5, 6)], now)
        assert got == Evaluation((BudgetResult(False, 5, NEVER),), committed=False)
        assert await store.inspect(["k"], now) == [None]

    kit.run(body)


# ------------------------------------------------------------------ decision rules


def test_blocking_failure_spends_nothing(kit: StoreKit) -> None:
    async def body(store: CounterStore) -> None:
        now = wall_ms()
        await store.evaluate([unit_check("full", HOUR, 1, 1)], now)
        checks = [
            unit_check("a", HOUR, 5, 1),
            unit_check("full", HOUR, 1, 1),
            unit_check("b", HOUR, 5, 2),
        ]
        got = await store.evaluate(checks, now + 10, once_key="m1")
        assert not got.committed
        assert [r.allowed for r in got.results] == [True, False, True]
        assert [r.remaining for r in got.results] == [5, 0, 5]  # nothing was spent
        assert 0 < got.results[1].retry_after_ms <= HOUR
        assert await store.inspect(["a", "b", "m1"], now + 10) == [None, None, None]
        # the once key was not set: the retry still counts
        again = await store.evaluate([unit_check("a", HOUR, 5, 1)], now + 20, once_key="m1")
        assert again.committed
        assert not again.duplicate

    kit.run(body)


def test_non_blocking_failure_spends_the_rest(kit: StoreKit) -> None:
    async def body(store: CounterStore) -> None:
        now = wall_ms()
        checks = [
            unit_check("a", HOUR, 5, 1),
            unit_check("monitor", HOUR, 2, 3, blocking=False),
            unit_check("b", HOUR, 5, 2),
        ]
        got = await store.evaluate(checks, now)
        assert got.committed
        assert got.results == (
            BudgetResult(True, 4, 0),
            BudgetResult(False, 2, NEVER),
            BudgetResult(True, 3, 0),
        )
        a, monitor, b = await store.inspect(["a", "monitor", "b"], now)
        unit = checks[0].unit
        assert a is not None and (a.debt, a.at_ms) == (unit, now)  # one unit spent
        assert a.full_at_ms(checks[0].refill, now) == now + HOUR
        assert monitor is None
        assert b is not None and (b.debt, b.at_ms) == (2 * unit, now)
        assert b.full_at_ms(checks[2].refill, now) == now + 2 * HOUR

    kit.run(body)


def test_consume_false_peeks(kit: StoreKit) -> None:
    async def body(store: CounterStore) -> None:
        now = wall_ms()
        peek = unit_check("k", 1000, 3, 1, consume=False)
        for _ in range(5):
            got = await store.evaluate([peek], now)
            assert got == Evaluation((BudgetResult(True, 3, 0),), committed=True)
        assert await store.inspect(["k"], now) == [None]
        spend = unit_check("k", 1000, 3, 3)
        assert (await store.evaluate([spend], now)).results[0] == BudgetResult(True, 0, 0)
        got = await store.evaluate([peek], now + 400)
        assert got.results[0] == BudgetResult(False, 0, 600)
        assert not got.committed  # a refused blocking peek refuses the decision
        assert (await store.evaluate([peek], now + 1000)).results[0] == BudgetResult(True, 1, 0)

    kit.run(body)


def test_same_bucket_twice_cannot_take_the_last_unit_twice(kit: StoreKit) -> None:
    async def body(store: CounterStore) -> None:
        now = wall_ms()
        await store.evaluate([unit_check("k", HOUR, 3, 2)], now)
        twice = [unit_check("k", HOUR, 3, 1), unit_check("k", HOUR, 3, 1)]
        got = await store.evaluate(twice, now)
        assert not got.committed
        assert [r.allowed for r in got.results] == [True, False]
        assert [r.remaining for r in got.results] == [1, 1]
        once = await store.evaluate(twice[:1], now)
        assert once.results[0] == BudgetResult(True, 0, 0)

    kit.run(body)


def test_once_key_counts_a_message_once(kit: StoreKit) -> None:
    async def body(store: CounterStore) -> None:
        now = wall_ms()
        check = unit_check("sender", HOUR, 10, 1)
        first = await store.evaluate([check], now, once_key="queue:ABC")
        assert first == Evaluation((BudgetResult(True, 9, 0),), committed=True)
        for i in range(3):
            dup = await store.evaluate([check], now + i, once_key="queue:ABC")
            assert dup == Evaluation((BudgetResult(True, 9, 0),), committed=False, duplicate=True)
        other = await store.evaluate([check], now, once_key="queue:DEF")
        assert other.results[0].remaining == 8
        # a once key alone (no checks) also commits and is then a duplicate
        assert await store.evaluate([], now, once_key="x") == Evaluation((), committed=True)
        assert (await store.evaluate([], now, once_key="x")).duplicate

    kit.run(body)


def test_once_key_expires(kit: StoreKit) -> None:
    ttl_ms = 500  # a loaded machine inspects it well within that

    async def body(store: CounterStore) -> None:
        now = wall_ms()
        check = unit_check("k", HOUR, 10, 1)
        await store.evaluate([check], now, once_key="m", once_ttl_ms=ttl_ms)
        (state,) = await store.inspect(["m"], now)
        assert state is not None and 0 < state.ttl_ms <= ttl_ms
        # until it has expired: at once for the memory store (the caller's clock), when
        # Redis's own clock says so for Redis
        give_up = time.monotonic() + 60
        while (await store.inspect(["m"], now + ttl_ms))[0] is not None:
            assert time.monotonic() < give_up, "the once key never expired"
            await asyncio.sleep(0.01)
        later = await store.evaluate([check], now + ttl_ms, once_key="m")
        assert later.committed and not later.duplicate
        assert later.results[0].remaining == 8

    kit.run(body)


def test_a_once_key_lives_ten_minutes_by_default(kit: StoreKit) -> None:
    """Long enough for the policy server and the milter to meet the same message (twice
    Postfix's longest default wait between them), short enough that a recycled Postfix
    queue id is counted as the new message it is, and that a busy server does not keep
    an hour of messages in memory."""
    async def body(store: CounterStore) -> None:
        now = wall_ms()
        await store.evaluate([unit_check("k", HOUR, 10, 1)], now, once_key="m")
        (state,) = await store.inspect(["m"], now)
        assert state is not None
        assert DEFAULT_ONCE_TTL_MS - 60_000 < state.ttl_ms <= DEFAULT_ONCE_TTL_MS == 600_000

    kit.run(body)


def test_arguments_no_bucket_can_hold_are_rejected(kit: StoreKit) -> None:
    async def body(store: CounterStore) -> None:
        bad_checks: list[BudgetCheck] = [
            BudgetCheck("k", 0, 1, 1, 1),
            BudgetCheck("k", -1, 1, 1, 1),
            BudgetCheck("k", 1, 0, 1, 1),
            BudgetCheck("k", 2**52 + 1, 1, 1, 1),
            BudgetCheck("k", 1.5, 1, 1, 1),  # type: ignore[arg-type]
            BudgetCheck("k", 1, 1, 1, math.nan),  # type: ignore[arg-type]
            BudgetCheck("k", 1, 2**26, 2**26 + 1, 1),  # burst * unit past 2**52: inexact
            BudgetCheck("k", 1, 1, 1, 2**53),
            unit_check("k", 1, -1, 1),
            unit_check("k", 1, 1, -1),
        ]
        for bad in bad_checks:
            with pytest.raises(ValueError, match="must"):
                await store.evaluate([bad], 0)
        for now in (-1, 2**53, 1.5):
            with pytest.raises(ValueError, match="now_ms"):
                await store.evaluate([unit_check("k", 1, 1, 1)], now)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="once_ttl_ms"):
            await store.evaluate([], 0, once_key="m", once_ttl_ms=0)
        assert await store.scan("*") == []

    kit.run(body)


# ------------------------------------------------------------------ TTLs, retry_after


def test_every_write_sets_its_ttl(kit: StoreKit) -> None:
    async def body(store: CounterStore) -> None:
        now = wall_ms()
        checks = [unit_check("a", 1000, 5, 3), budget_check("b", 10, 3, 100_000, 8333)]
        await store.evaluate(checks, now, once_key="m", once_ttl_ms=600_000)
        a, b, m = await store.inspect(["a", "b", "m"], now)
        slack = 0 if kit.kind == "memory" else 200  # Redis counts down by its own clock
        # a bucket is kept until it is full again, and the clock-step allowance after that
        kept = CLOCK_STEP_ALLOWANCE_MS
        assert a is not None and 3000 + kept - slack <= a.ttl_ms <= 3000 + kept
        # 8333 * 0.3 = 2499.9 ms: the time to full is rounded up
        assert b is not None and 2500 + kept - slack <= b.ttl_ms <= 2500 + kept
        assert m is not None and 600_000 - slack <= m.ttl_ms <= 600_000

    kit.run(body)


@pytest.mark.parametrize("seed", range(3))
def test_no_key_is_left_without_ttl(kit: StoreKit, seed: int) -> None:
    rng = random.Random(3000 + seed)

    async def body(store: CounterStore) -> None:
        offset = 0
        for _ in range(200):
            checks = for_store([random_check(rng) for _ in range(rng.randint(1, 3))])
            offset += rng.randint(0, 20)
            once = f"m{rng.randint(0, 99)}" if rng.random() < 0.5 else None
            await store.evaluate(checks, wall_ms() + offset, once)
        now = wall_ms() + offset
        keys = await store.scan("*", count=100_000)
        assert len(keys) > 20
        states = await store.inspect(keys, now)
        live = [s for s in states if s is not None]
        assert len(live) > 20
        # -1 would be a key without expiry; Redis' PTTL says 0 in a key's last millisecond
        assert all(s.ttl_ms >= 0 for s in live), [s for s in live if s.ttl_ms < 0]
        if kit.server is not None:  # and straight from Redis: no key without expiry
            with kit.server.client() as client:
                all_keys = client.keys("*")
                assert len(all_keys) > 20
                assert all(client.pttl(k) != -1 for k in all_keys)

    kit.run(body)


@pytest.mark.parametrize("seed", range(4))
def test_retry_after_is_exact(kit: StoreKit, seed: int) -> None:
    """Refused at ``now``: still refused one ms before ``now + retry_after``, allowed at it."""
    rng = random.Random(4000 + seed)

    async def body(store: CounterStore) -> None:
        for i in range(25):
            now = wall_ms()
            count, period = rng.choice(
                [(1, 1000), (5, 1000), (25, 3600), (3, 1000), (rng.randint(1, 50),
                                                              rng.randint(100, 50_000))]
            )
            burst = rng.randint(1, 10)
            key = f"k{i}"
            spent = rng.randint(1, burst)
            await store.evaluate([budget_check(key, count, period, burst, spent)], now)
            cost = rng.randint(1, burst)
            probe = budget_check(key, count, period, burst, cost, consume=False)
            interval = period / count
            got = (await store.evaluate([probe], now)).results[0]
            if got.allowed:
                continue
            retry = got.retry_after_ms
            assert retry >= 1
            if retry > 1:
                early = (await store.evaluate([probe], now + retry - 1)).results[0]
                assert not early.allowed, (interval, burst, spent, cost, retry)
            on_time = (await store.evaluate([probe], now + retry)).results[0]
            assert on_time.allowed, (interval, burst, spent, cost, retry)

    kit.run(body)


# ------------------------------------------------------------------ inspect, scan, reset


def test_inspect_scan_reset(kit: StoreKit) -> None:
    async def body(store: CounterStore) -> None:
        now = wall_ms()
        for key in ("rl:a:1", "rl:a:2", "rl:b:1", "rl:a*x", "x?"):
            await store.evaluate([unit_check(key, 1000, 10, 2)], now)
        assert await store.scan("rl:a:*") == ["rl:a:1", "rl:a:2"]
        assert await store.scan("rl:?:1") == ["rl:a:1", "rl:b:1"]
        assert await store.scan("rl:[ab]:1") == ["rl:a:1", "rl:b:1"]
        assert await store.scan("rl:[^a]:*") == ["rl:b:1"]
        assert await store.scan("rl:a\\*x") == ["rl:a*x"]
        assert await store.scan("x\\?") == ["x?"]
        assert await store.scan("nothing*") == []
        assert len(await store.scan("*")) == 5
        assert len(await store.scan("*", count=2)) == 2

        a1, missing = await store.inspect(["rl:a:1", "nope"], now)
        assert missing is None
        assert a1 is not None and a1.key == "rl:a:1" and a1.at_ms == now
        shape = unit_check("rl:a:1", 1000, 10, 2)
        assert a1.free_units(shape.refill, shape.unit, shape.burst, now) == 8
        assert a1.full_at_ms(shape.refill, now) == now + 2000
        assert 0 < a1.ttl_ms <= 2000 + CLOCK_STEP_ALLOWANCE_MS

        assert await store.reset(["rl:a:1", "nope", "rl:a:2"]) == 2
        assert await store.reset([]) == 0
        assert await store.inspect(["rl:a:1"], now) == [None]
        assert await store.scan("rl:a:*") == []
        fresh = await store.evaluate([unit_check("rl:a:1", 1000, 10, 2)], now)
        assert fresh.results[0].remaining == 8

    kit.run(body)


def test_prefix_with_glob_characters_is_taken_literally(kit: StoreKit) -> None:
    kit.prefix = "mq[1]*:"

    async def body(store: CounterStore) -> None:
        await store.evaluate([unit_check("k", 1000, 1, 1)], wall_ms())
        assert await store.scan("*") == ["k"]
        if kit.server is not None:
            with kit.server.client() as client:
                assert client.keys("*") == [b"mq[1]*:k"]

    kit.run(body)
    if kit.server is not None:  # another prefix on the same Redis sees none of it
        other = StoreKit("redis", kit.server, prefix="mq1:")

        async def empty(store: CounterStore) -> None:
            assert await store.scan("*") == []
            assert await store.inspect(["k"], wall_ms()) == [None]

        other.run(empty)


def test_ping_and_close(kit: StoreKit) -> None:
    async def body(store: CounterStore) -> None:
        assert await store.ping() is None
        await store.close()
        if kit.kind == "redis":  # a closed Redis store refuses; memory has nothing to close
            with pytest.raises(StoreError, match="closed"):
                await store.evaluate([unit_check("k", HOUR, 1, 1)], wall_ms())

    kit.run(body)


# ------------------------------------------------------------------ concurrency


def test_concurrent_decisions_spend_exactly_the_budget(kit: StoreKit) -> None:
    async def body(store: CounterStore) -> None:
        check = unit_check("shared", HOUR, 50, 1)
        start = wall_ms()
        got = await asyncio.gather(*(store.evaluate([check], start + i % 3) for i in range(200)))
        allowed = [e for e in got if e.committed]
        assert len(allowed) == 50
        assert sorted(e.results[0].remaining for e in allowed) == list(range(50))
        assert all(e.results[0].retry_after_ms > 0 for e in got if not e.committed)

    kit.run(body)


@pytest.mark.parametrize("in_flight", [1, 2])
def test_concurrent_decisions_are_coalesced(redis_clean: RedisServer, in_flight: int) -> None:
    async def main() -> None:
        store = RedisStore(
            redis_clean.unix_url, timeout_ms=2000, max_batch=64, max_in_flight=in_flight
        )
        check = unit_check("shared", HOUR, 50, 1)
        with redis_clean.client() as client:
            client.config_resetstat()
            now = wall_ms()
            got = await asyncio.gather(*(store.evaluate([check], now) for _ in range(200)))
            assert sum(e.committed for e in got) == 50
            assert (store.batches_sent, store.decisions_sent) == (4, 200)  # 64+64+64+8
            stats = client.info("commandstats")
            calls = stats.get("cmdstat_evalsha", {}).get("calls", 0)
            loads = stats.get("cmdstat_script|load", {}).get("calls", 0)
            assert calls == 4 + loads
        await store.close()

    asyncio.run(main())


def test_a_caller_that_gave_up_before_the_flush_spends_nothing(redis_clean: RedisServer) -> None:
    async def main() -> None:
        store = RedisStore(redis_clean.unix_url, timeout_ms=2000)
        check = unit_check("k", HOUR, 10, 1)
        now = wall_ms()
        tasks = [asyncio.create_task(store.evaluate([check], now)) for _ in range(10)]
        await asyncio.sleep(0)  # all ten are queued, the flush has not run yet
        for task in tasks[:4]:
            task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(isinstance(d, asyncio.CancelledError) for d in done) == 4
        assert store.decisions_sent == 6
        peek = await store.evaluate([unit_check("k", HOUR, 10, 1, consume=False)], now)
        assert peek.results[0].remaining == 4
        await store.close()

    asyncio.run(main())


def test_a_caller_cancelled_mid_batch_does_not_break_the_batch(
    private_redis: RedisServer,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        store = RedisStore(private_redis.unix_url, timeout_ms=3000)
        await store.ping()
        check = unit_check("k", HOUR, 10, 1)
        now = wall_ms()
        with private_redis.paused():
            waiters = [asyncio.create_task(store.evaluate([check], now)) for _ in range(3)]
            await asyncio.sleep(0.05)  # the batch is on the wire, Redis is stopped
            assert store.batches_sent == 1
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(waiters[0], timeout=0.01)
        first, second = await asyncio.gather(*waiters[1:])
        assert first.committed and second.committed
        # the batch ran whole: the cancelled caller's decision was spent as well
        assert sorted([first.results[0].remaining, second.results[0].remaining]) == [7, 8]
        await store.close()
        assert errors == []

    asyncio.run(main())


def test_closed_store_refuses(redis_clean: RedisServer) -> None:
    async def main() -> None:
        store = RedisStore(redis_clean.unix_url)
        await store.close()
        with pytest.raises(StoreError, match="closed"):
            await store.evaluate([unit_check("k", 1, 1, 1)], 0)

    asyncio.run(main())


# ------------------------------------------------------------------ Redis failures

DEADLINE_MS = 200
FAIL_FAST_S = 2.0  # ten deadlines: generous for a loaded machine, far from redis-py's 5 s


def _url(server: RedisServer, transport: str) -> str:
    return server.tcp_url if transport == "tcp" else server.unix_url


async def _elapsed_error(call: Callable[[], Awaitable[object]]) -> float:
    start = time.monotonic()
    with pytest.raises(StoreError):
        await call()
    return time.monotonic() - start


async def _until_ok(call: Callable[[], Awaitable[T]], within_s: float = 60.0) -> T:
    """Call again while it fails: on a loaded machine a short deadline can expire on its own."""
    give_up = time.monotonic() + within_s
    while True:
        try:
            return await call()
        except StoreError:
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_stopped_redis_fails_fast_and_recovers(private_redis: RedisServer, transport: str) -> None:
    async def main() -> None:
        fast = RedisStore(_url(private_redis, transport), timeout_ms=DEADLINE_MS)
        patient = RedisStore(_url(private_redis, transport), timeout_ms=3000)
        check = unit_check("k", HOUR, 10, 1)
        for store in (fast, patient):
            await _until_ok(functools.partial(store.evaluate, [check], wall_ms()))
        private_redis.stop()
        for call in (
            lambda: fast.evaluate([check], wall_ms()),
            lambda: fast.evaluate([check], wall_ms()),
            fast.ping,
            lambda: fast.inspect(["k"], 0),
            lambda: fast.scan("*"),
            lambda: fast.reset(["k"]),
            lambda: patient.evaluate([check], wall_ms()),  # refused: no need to wait
        ):
            assert await _elapsed_error(call) < FAIL_FAST_S
        burst = await asyncio.gather(
            *(fast.evaluate([check], wall_ms()) for _ in range(50)), return_exceptions=True
        )
        assert all(isinstance(e, StoreError) for e in burst)

        private_redis.start()  # empty again: no keys, no scripts
        # the first call after the restart works: no stale connection, script reloaded
        got = await patient.evaluate([check], wall_ms())
        assert got.results[0] == BudgetResult(True, 9, 0)
        got = await _until_ok(lambda: fast.evaluate([check], wall_ms()))
        assert got.results[0] == BudgetResult(True, 8, 0)
        await _until_ok(fast.ping)
        await fast.close()
        await patient.close()

    asyncio.run(main())


def test_store_never_connected_fails_fast(private_redis: RedisServer) -> None:
    private_redis.stop()

    async def main() -> None:
        for url in (private_redis.tcp_url, private_redis.unix_url):
            store = RedisStore(url, timeout_ms=DEADLINE_MS)
            start = time.monotonic()
            with pytest.raises(StoreError):
                await store.evaluate([unit_check("k", 1, 1, 1)], 0)
            assert time.monotonic() - start < FAIL_FAST_S
            await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_paused_redis_fails_within_the_deadline(private_redis: RedisServer, transport: str) -> None:
    async def main() -> None:
        store = RedisStore(_url(private_redis, transport), timeout_ms=DEADLINE_MS)
        check = unit_check("k", HOUR, 10, 1)
        await _until_ok(lambda: store.evaluate([check], wall_ms()))
        with private_redis.paused():
            elapsed = await _elapsed_error(lambda: store.evaluate([check], wall_ms()))
            assert DEADLINE_MS / 1000 * 0.8 <= elapsed < FAIL_FAST_S
            assert await _elapsed_error(store.ping) < FAIL_FAST_S
            # a crowd of callers: queued ones wait for the batch ahead, then fail in turn
            start = time.monotonic()
            crowd = await asyncio.gather(
                *(store.evaluate([check], wall_ms()) for _ in range(300)), return_exceptions=True
            )
            assert all(isinstance(e, StoreError) for e in crowd)
            assert time.monotonic() - start < 2 * FAIL_FAST_S
        got = await _until_ok(lambda: store.evaluate([check], wall_ms()))  # Redis runs again
        assert got.committed
        await store.close()

    asyncio.run(main())


def test_a_decision_queued_behind_a_stuck_batch_keeps_its_own_deadline(
        private_redis: RedisServer) -> None:
    """One batch in flight at a time, Redis paused: the decision queued behind it fails at
    its own deadline (a timeout, counted as one), not a deadline after the batch ahead."""
    deadline_ms = 1500  # long enough that the margin below is a loaded machine's

    async def main() -> None:
        store = RedisStore(private_redis.unix_url, timeout_ms=deadline_ms, max_in_flight=1)
        check = unit_check("k", HOUR, 10, 1)
        await _until_ok(lambda: store.evaluate([check], wall_ms()))

        async def timed() -> tuple[float, BaseException | None]:
            start = time.monotonic()
            try:
                await store.evaluate([check], wall_ms())
            except StoreError as exc:
                return time.monotonic() - start, exc
            return time.monotonic() - start, None

        with private_redis.paused():
            ahead = asyncio.ensure_future(timed())
            await asyncio.sleep(deadline_ms / 1000 / 2)  # the first batch is out and stuck
            behind_elapsed, behind_error = await timed()
            ahead_elapsed, ahead_error = await ahead
        assert isinstance(ahead_error, StoreTimeout)
        assert isinstance(behind_error, StoreTimeout)
        # a deadline each, with 0.45 s to spare; waiting for the batch ahead first would
        # take one and a half deadlines; never before the deadline (slowness only adds)
        for elapsed in (behind_elapsed, ahead_elapsed):
            assert deadline_ms / 1000 * 0.95 <= elapsed < deadline_ms / 1000 * 1.3
        await store.close()

    asyncio.run(main())


class HeldBatches(CoalescingStore):
    """Answers each batch when the test sets that batch's event (no Redis)."""

    def __init__(self, releases: list[asyncio.Event], timeout_ms: int) -> None:
        super().__init__(timeout_ms=timeout_ms, max_batch=256, max_in_flight=1)
        self.releases = releases
        self.sizes: list[int] = []

    async def _run(self, batch: list[PendingDecision]) -> list[Evaluation]:
        release = self.releases[len(self.sizes)]
        self.sizes.append(len(batch))
        await release.wait()
        return [Evaluation((BudgetResult(True, 1, 0),), committed=True) for _ in batch]


def test_each_decision_in_a_batch_keeps_its_own_deadline() -> None:
    """A decision that joins a batch late is not failed at the deadline of an older one in
    it; the older one fails at its own deadline while the batch goes on. The batches are
    held by the test, so only the deadlines are time: the older one is seen failing while
    its batch is still held, the younger one is then answered."""
    timeout_s = 1.0

    async def main() -> None:
        first_out, second_out = asyncio.Event(), asyncio.Event()
        store = HeldBatches([first_out, second_out], timeout_ms=int(timeout_s * 1000))
        check = unit_check("k", HOUR, 10, 1)

        async def timed() -> tuple[float, object]:
            start = time.monotonic()
            try:
                result: object = await store.evaluate([check], wall_ms())
            except StoreError as exc:
                result = exc
            return time.monotonic() - start, result

        first = asyncio.ensure_future(timed())
        await poll_async(lambda: store.sizes == [1], "the first batch out")
        older = asyncio.ensure_future(timed())
        await asyncio.sleep(timeout_s * 0.3)  # the younger one's deadline 0.3 s later
        younger = asyncio.ensure_future(timed())
        await asyncio.sleep(0)  # queued
        first_out.set()  # both leave together in the second batch, which is then held
        await poll_async(lambda: store.sizes == [1, 2], "the second batch out")
        older_s, older_result = await older  # fails while its batch is still held
        assert not second_out.is_set()
        second_out.set()
        (_, first_result), (_, younger_result) = await first, await younger
        assert isinstance(first_result, Evaluation)
        assert isinstance(older_result, StoreTimeout)  # its deadline came while its batch ran
        assert older_s >= timeout_s * 0.95  # at its deadline, not before (slowness only adds)
        assert isinstance(younger_result, Evaluation)  # not failed at the older one's deadline

    asyncio.run(main())


def test_lost_script_cache_is_reloaded(redis_clean: RedisServer) -> None:
    async def main() -> None:
        store = RedisStore(redis_clean.unix_url, timeout_ms=2000)
        check = unit_check("k", HOUR, 10, 1)
        assert (await store.evaluate([check], wall_ms())).results[0].remaining == 9
        with redis_clean.client() as client:
            sha = client.script_load(load_script(SCRIPT_NAME))
            client.script_flush()
            assert client.script_exists(sha) == [False]
            got = await store.evaluate([check], wall_ms())
            assert got.results[0] == BudgetResult(True, 8, 0)
            assert client.script_exists(sha) == [True]
        await store.close()

    asyncio.run(main())


# ------------------------------------------------------------------ memory store bounds


def test_memory_store_sweeps_keys_nobody_reads_again() -> None:
    async def main() -> None:
        store = MemoryStore()
        now = 1_000_000
        for i in range(20_000):  # a second apart: buckets are kept a minute after they are full
            now += 1000
            await store.evaluate(
                [unit_check(f"once-{i}", 1, 5, 1)], now, once_key=f"q{i}", once_ttl_ms=10
            )
        assert len(store) < 200  # 40,000 keys written, each dead within a minute
        live = unit_check("live", HOUR, 10, 1)
        await store.evaluate([live], now)
        for i in range(5000):
            await store.evaluate([unit_check(f"x{i}", 1, 5, 1)], now + i)
        assert (await store.inspect(["live"], now + 5000))[0] is not None  # sweeps keep it

    asyncio.run(main())


def test_memory_store_sweeps_as_fast_as_decisions_with_many_limits_write() -> None:
    async def main() -> None:
        store = MemoryStore()
        now = 1_000_000
        for i in range(2000):  # 40 budgets and a once key per decision: 82,000 keys
            now += 10_000
            await store.evaluate([unit_check(f"d{i}-{n}", 1, 5, 1) for n in range(40)],
                                 now, once_key=f"q{i}", once_ttl_ms=5)
        assert len(store) < 500  # each key dead within a minute: six decisions' worth

    asyncio.run(main())


# ------------------------------------------------------------------ factory


def test_open_store_talks_to_redis(redis_clean: RedisServer) -> None:
    async def main() -> None:
        for url in (redis_clean.tcp_url, redis_clean.unix_url):
            store = open_store(url, timeout_ms=2000)
            await store.ping()
            got = await store.evaluate([unit_check("k", HOUR, 2, 1)], wall_ms())
            assert got.committed
            await store.close()
        with redis_clean.client() as client:
            assert client.keys("*") == [b"mqpolicy:k"]

    asyncio.run(main())
