"""Budgets are exact: a budget of N admits exactly N at one instant, refills exactly at its
rate, and a clock that steps back neither refills nor takes anything, on every store.

Expected values come from the README's promise: plain numbers in the tests through the
engine, and :mod:`tests.support.budget_oracle` (exact fractions, nothing of the stores' arithmetic)
for the random rates, bursts, costs and clock sequences hypothesis drives through the
memory store and a real Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mqpolicy.decision.engine import Action, Verdict
from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.loader import ConfigError, parse_policy
from mqpolicy.policy.model import Policy
from mqpolicy.policy.rates import EXACT_LIMIT, exactness_problem, largest_burst, reduced_rate
from mqpolicy.policy.request import Request
from mqpolicy.store.budget import (
    CLOCK_STEP_ALLOWANCE_MS,
    NEVER,
    BudgetResult,
    CounterStore,
    Evaluation,
    format_bucket,
)
from mqpolicy.store.cluster import ClusterStore
from mqpolicy.store.memory import MemoryStore
from mqpolicy.store.redis import RedisStore
from mqpolicy.store.sentinel import SentinelStore
from tests.support.budget_oracle import Oracle, RateCheck
from tests.support.redis_fixture import RedisServer

if TYPE_CHECKING:
    from tests.support.redis_ha_fixture import RedisClusterHarness, RedisSentinelHarness
from tests.support.mqpolicy_command import mq

HOUR = 3_600_000
DAY = 24 * HOUR
T0 = 1_760_000_000_123  # an epoch-ms time of day: ulp(T0) as a double is 0.24 ms

StoreFactory = Callable[[], CounterStore]


def policy_with(limit: str, store: str = "") -> Policy:
    return parse_policy(f"""\
store: {{timeout_ms: 5000{store}}}
lanes: [{{name: normal}}]
default_lane: normal
limits:
  - {{name: budget, key: sender, {limit}}}
""")


def message(i: int, sender: str = "s@example.com", size: int = 1000,
            stage: str = "END-OF-MESSAGE") -> Request:
    return Request.from_policy_attributes({
        "protocol_state": stage, "sender": sender, "recipient": "r@example.net",
        "client_address": "192.0.2.1", "queue_id": f"Q{i:08d}", "recipient_count": "1",
        "size": str(size)})


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def decide_all(policy: Policy, store: CounterStore, clock: Clock,
               steps: Iterator[tuple[int, Request]]) -> list[Verdict]:
    """Each request decided at its time, one after the other, on one decision service."""
    async def go() -> list[Verdict]:
        service = DecisionService(policy, store, clock_ms=clock)
        verdicts = []
        try:
            for at, request in steps:
                clock.now = at
                verdicts.append(await service.decide(request))
            assert service.stats.store_errors == service.stats.store_timeouts == 0
        finally:
            await store.close()
        return verdicts

    return asyncio.run(go())


# ------------------------------------------------------------------ through the engine


@pytest.mark.parametrize(("limit", "size"), [
    ("rate: 6/1s", 6),
    ("rate: 7/1h", 7),
    ("rate: 1000000000/1d, burst: 10", 10),
    ("rate: 1000/1ms", 1000),
    ("rate: 3/1s, burst: 7", 7),
    ("rate: 50/1h", 50),
])
def test_a_budget_of_n_admits_exactly_n_at_one_instant(each_store: StoreFactory,
                                                        limit: str, size: int) -> None:
    """All in the same millisecond: the first N pass, the next one is deferred."""
    clock = Clock()
    verdicts = decide_all(policy_with(limit), each_store(), clock,
                          ((T0, message(i)) for i in range(size + 1)))
    actions = [v.action for v in verdicts]
    assert actions == [Action.ACCEPT] * size + [Action.DEFER]
    assert [v.limits[0].remaining for v in verdicts[:size]] == list(range(size - 1, -1, -1))


def test_spending_one_unit_at_a_time_reaches_exactly_the_burst(
        redis_server: RedisServer) -> None:
    """The defect seen from the outside: 1,929 of 4,000 rates gave burst - 1. Every rate
    of a grid of counts and periods, its burst spent one unit at a time at one instant,
    on both stores."""
    counts = [1, 3, 6, 7, 13, 50, 97, 300, 999, 1000, 4999, 86_399]
    periods = [1, 7, 1000, 60_000, 3_600_000, 86_400_000, 604_800_000, 999_983]

    async def go(store: CounterStore) -> list[str]:
        wrong = []
        for n, (count, period) in enumerate(itertools.product(counts, periods)):
            burst = min(count, 40)
            key = f"grid{n}"
            checks = [RateCheck(key, count, period, burst, 1).for_store()] * (burst + 1)
            got = [await store.evaluate(checks[:1], T0 + n) for _ in checks]
            admitted = sum(e.committed for e in got)
            if admitted != burst or got[-1].results[0].retry_after_ms <= 0:
                wrong.append(f"{count}/{period}ms burst {burst}: {admitted}")
        await store.close()
        return wrong

    assert asyncio.run(go(MemoryStore())) == []
    assert asyncio.run(go(RedisStore(redis_server.unix_url, timeout_ms=5000,
                                     key_prefix="grid:"))) == []


def test_a_day_of_1000000000_per_day_refills_exactly(each_store: StoreFactory) -> None:
    """Bytes at 1000000000/1d: after k ms a message of exactly floor(k * 10**9 / 86400000)
    bytes fits and one byte more does not (the float arithmetic drifted by 0.03 %)."""
    clock = Clock()
    policy = policy_with("rate: 1000000000/1d, count: bytes")
    spent = T0
    steps: list[tuple[int, Request]] = [(T0, message(0, size=1_000_000_000))]
    probes = [1, 7, 1000, 86_399_999, DAY // 3, 12_345_678]
    for k in probes:  # RCPT checks the message's size against the budget and spends nothing
        fits = k * 1_000_000_000 // DAY
        steps += [(spent + k, message(1, size=fits, stage="RCPT")),
                  (spent + k, message(2, size=fits + 1, stage="RCPT"))]
    steps.append((spent + DAY, message(3, size=1_000_000_000)))  # a whole day: all of it
    verdicts = decide_all(policy, each_store(), clock, iter(steps))
    assert verdicts[0].action is Action.ACCEPT
    assert verdicts[-1].action is Action.ACCEPT
    pairs = zip(verdicts[1:-1:2], verdicts[2:-1:2], strict=True)
    for k, (fits, over) in zip(probes, pairs, strict=True):
        assert fits.action is Action.ACCEPT, k
        assert over.action is Action.DEFER, k
        # the exact first ms at which one more byte fits
        missing = k * 1_000_000_000 // DAY + 1
        assert over.retry_after_ms == math.ceil(Fraction(missing * DAY, 1_000_000_000)) - k


def test_spending_what_came_back_neither_drifts_nor_overspends(
        each_store: StoreFactory) -> None:
    """Bytes at 1000000000/1d: the burst spent at T, then every 7 ms what came back (asked
    at RCPT, spent at END-OF-MESSAGE), 3,000 times: exactly the burst plus 21 s of the rate
    in all (the float arithmetic rounded at every spend: 4 bytes too many here, 0.03 % a day
    in other patterns)."""
    clock = Clock()
    policy = policy_with("rate: 1000000000/1d, count: bytes")
    spent = []

    async def go() -> None:
        service = DecisionService(policy, each_store(), clock_ms=clock)
        try:
            verdict = await service.decide(message(0, size=1_000_000_000))
            assert verdict.action is Action.ACCEPT
            spent.append(1_000_000_000)
            for i in range(1, 3001):
                clock.now = T0 + 7 * i
                free = (await service.decide(message(i, size=1, stage="RCPT"))).limits[0]
                verdict = await service.decide(message(i, size=free.remaining))
                assert verdict.action is Action.ACCEPT, i
                spent.append(free.remaining)
            over = await service.decide(message(9999, size=1, stage="RCPT"))
            assert over.action is Action.DEFER
        finally:
            await service.store.close()

    asyncio.run(go())
    assert sum(spent) == 1_000_000_000 + 21_000 * 1_000_000_000 // DAY


def test_retry_after_is_the_exact_first_millisecond(each_store: StoreFactory) -> None:
    """6/1s spent: the 7th fits after ceil(1000/6) = 167 ms; not a ms before."""
    clock = Clock()
    steps = [(T0, message(i)) for i in range(7)]
    steps += [(T0 + 166, message(7)), (T0 + 167, message(8)), (T0 + 167, message(9))]
    verdicts = decide_all(policy_with("rate: 6/1s"), each_store(), clock, iter(steps))
    assert [v.action for v in verdicts] == [Action.ACCEPT] * 6 + [Action.DEFER] * 2 + [
        Action.ACCEPT, Action.DEFER]
    assert verdicts[6].retry_after_ms == 167
    assert verdicts[7].retry_after_ms == 1
    assert verdicts[9].retry_after_ms == 167  # from 167 on: 2 * 1000/6 = 333.3 -> 334 - 167


# ------------------------------------------------------------------ clock steps


def test_a_clock_that_steps_back_refills_nothing_and_takes_nothing(
        each_store: StoreFactory) -> None:
    """5/1h: 2 spent at T; at T - 30 min (NTP stepped back) 3 are left, not 0.5 and not 5;
    nothing comes back until the clock passes T again, then 1 each 12 minutes."""
    clock = Clock()
    back = T0 - 30 * 60_000
    steps = [(T0, message(0)), (T0, message(1)),
             (back, message(2)), (back, message(3)), (back, message(4)), (back, message(5)),
             (T0 + 12 * 60_000 - 1, message(6)), (T0 + 12 * 60_000, message(7))]
    verdicts = decide_all(policy_with("rate: 5/1h"), each_store(), clock, iter(steps))
    assert [v.action for v in verdicts] == [Action.ACCEPT] * 5 + [Action.DEFER] * 2 + [
        Action.ACCEPT]
    assert verdicts[4].limits[0].remaining == 0
    assert verdicts[5].retry_after_ms == T0 + 12 * 60_000 - back  # the clock must pass T


def test_a_step_back_after_a_step_forward_finds_the_debt(each_store: StoreFactory) -> None:
    """5/1h spent at T; the clock jumps to T + 2 h (other senders decided there), then back
    to T + 1 s where more senders write: the spent budget is still spent (the memory store
    swept against the highest time it had seen and gave all 5 back; Redis never did)."""
    clock = Clock()
    steps = [(T0, message(i)) for i in range(5)]
    steps.append((T0 + 2 * HOUR, message(5, sender="other@example.com")))
    steps += [(T0 + 1000, message(10 + i, sender=f"o{i}@example.com")) for i in range(40)]
    steps += [(T0 + 1000, message(100 + i)) for i in range(5)]
    verdicts = decide_all(policy_with("rate: 5/1h"), each_store(), clock, iter(steps))
    assert [v.action for v in verdicts[:5]] == [Action.ACCEPT] * 5
    assert [v.action for v in verdicts[-5:]] == [Action.DEFER] * 5


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(("limit", "largest"), [
    ("rate: 7/1w, burst: 2000000000", EXACT_LIMIT // 86_400_000),
    ("rate: 999983/1w, burst: 100000000", EXACT_LIMIT // 604_800_000),
    ("rate: 1/1w", None),  # fits: burst 1
])
def test_check_refuses_a_budget_it_cannot_count_exactly(limit: str, largest: int | None) -> None:
    text = f"""\
lanes: [{{name: normal}}]
default_lane: normal
limits:
  - {{name: weekly, key: sender, {limit}}}
"""
    if largest is None:
        parse_policy(text)
        return
    with pytest.raises(ConfigError) as caught:
        parse_policy(text)
    message_text = str(caught.value)
    assert "limits[weekly]" in message_text
    assert f"the largest burst for this rate is {largest}" in message_text


def test_mqpolicy_check_lists_every_budget_it_cannot_count(tmp_path: Path) -> None:
    """The command exits 1 and says, with each one's line, which limit, destination or
    lane release budget cannot be counted exactly and the largest burst that could."""
    path = tmp_path / "policy.yaml"
    path.write_text("""\
lanes:
  - {name: normal}
  - {name: bulk, release_rate: 7/1w, release_burst: 100000000}
default_lane: normal
limits:
  - {name: weekly, key: sender, rate: 7/1w, burst: 2000000000}
  - {name: fine, key: sender, rate: 1000000000/1d, burst: 1000000}
destinations:
  - {name: big, domains: [big.example], rate: 999983/1w, burst: 100000000}
""")
    result = mq("check", "-c", str(path))
    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    assert any(f"{path}:3: lanes[1]: lane bulk's release budget:" in line
               and "largest burst for this rate is 52124995" in line for line in lines)
    assert any(f"{path}:6: limits[weekly]:" in line and "burst 2000000000" in line
               and "largest burst for this rate is 52124995" in line for line in lines)
    assert any(f"{path}:9: destinations[big]:" in line
               and "largest burst for this rate is 7446427" in line for line in lines)
    assert "3 error(s)" in result.stdout
    assert "fine" not in result.stdout


def test_the_largest_burst_is_accepted_and_exact(redis_server: RedisServer) -> None:
    """At the edge the config accepts (burst x reduced period = 2**52), a full burst at one
    instant and its exact refill, on both stores."""
    count, period = 7, 604_800_000
    burst = largest_burst(count, period)
    assert exactness_problem(count, period, burst) is None
    assert exactness_problem(count, period, burst + 1) is not None
    check = RateCheck("edge", count, period, burst, burst)
    one = check._replace(cost=1)

    async def go(store: CounterStore) -> None:
        assert (await store.evaluate([check.for_store()], T0)).results[0] == BudgetResult(
            True, 0, 0)
        refused = (await store.evaluate([one.for_store()], T0)).results[0]
        assert refused == BudgetResult(False, 0, math.ceil(Fraction(period, count)))
        later = T0 + period  # exactly `count` units back
        got = await store.evaluate([check._replace(cost=count).for_store()], later)
        assert got.results[0] == BudgetResult(True, 0, 0)
        await store.close()

    asyncio.run(go(MemoryStore()))
    asyncio.run(go(RedisStore(redis_server.unix_url, timeout_ms=5000, key_prefix="edge:")))


def test_redis_stores_a_bucket_as_its_debt_and_its_time(redis_clean: RedisServer) -> None:
    """Two integers, exact: the debt in tokens and the bucket's time (two doubles)."""
    check = RateCheck("k", 6, 1000, 6, 2).for_store()

    async def go() -> None:
        store = RedisStore(redis_clean.unix_url, timeout_ms=5000)
        try:
            await store.evaluate([check], T0)
            (state,) = await store.inspect(["k"], T0)
            assert state is not None and (state.debt, state.at_ms) == (2 * check.unit, T0)
        finally:
            await store.close()

    asyncio.run(go())
    with redis_clean.client() as client:
        assert client.get("mqpolicy:k") == format_bucket(2 * check.unit, T0)


# ------------------------------------------------------------------ the oracle, at random

MAX_STEP_BACK = CLOCK_STEP_ALLOWANCE_MS
"""Steps back stay within the allowance below the highest time seen: further back, an
entry dropped as full (by the memory store's sweep or Redis' clock) would be found full."""


@st.composite
def budgets(draw: st.DrawFn) -> tuple[int, int, int]:
    """(count, period_ms, burst) over the whole range the config accepts."""
    count = draw(st.one_of(
        st.sampled_from([1, 3, 6, 7, 1000, 50_000_000, 1_000_000_000]),
        st.integers(1, 100),
        st.integers(1, 10**15),
    ))
    period = draw(st.one_of(
        st.sampled_from([1, 1000, 60_000, HOUR, DAY, 7 * DAY]),
        st.integers(1, 10**10),
    ))
    n, _ = reduced_rate(count, period)
    assume(n <= EXACT_LIMIT)
    most = largest_burst(count, period)
    burst = draw(st.one_of(st.sampled_from([1, min(count, most), most]),
                           st.integers(1, min(most, 100)), st.integers(1, most)))
    return count, period, burst


@st.composite
def cost_for(draw: st.DrawFn, burst: int) -> int:
    return draw(st.one_of(st.sampled_from([0, 1, burst, burst + 1]),
                          st.integers(0, min(burst + 2, 50)),
                          st.integers(0, burst)))


@st.composite
def scenarios(draw: st.DrawFn, step_back: int = MAX_STEP_BACK,
              ) -> tuple[list[tuple[int, list[RateCheck], str | None]], int]:
    """A few buckets, and decisions on them at times that move forward by any amount and
    back by up to ``step_back`` (below the highest time so far)."""
    shapes = draw(st.lists(budgets(), min_size=1, max_size=3))
    start = draw(st.one_of(st.just(T0), st.integers(0, 1 << 52)))
    now = top = start
    decisions = []
    for i in range(draw(st.integers(1, 25))):
        step = draw(st.one_of(
            st.just(0), st.integers(-3, 3), st.integers(-step_back, 0),
            st.integers(0, 10**6), st.integers(0, 10**10),
            st.sampled_from([shape[1] for shape in shapes]),  # a whole period
        ))
        now = min(max(now + step, top - step_back, 0), (1 << 53) - 1)
        top = max(top, now)
        checks = []
        for _ in range(draw(st.integers(1, 3))):
            j = draw(st.integers(0, len(shapes) - 1))
            count, period, burst = shapes[j]
            checks.append(RateCheck(f"b{j}", count, period, burst, draw(cost_for(burst)),
                                    consume=draw(st.booleans()) or draw(st.booleans()),
                                    blocking=draw(st.booleans()) or draw(st.booleans())))
        once = draw(st.one_of(st.none(), st.sampled_from(["m1", "m2"]), st.just(f"u{i}")))
        decisions.append((now, checks, once))
    return decisions, len(shapes)


_examples = itertools.count()


def agree(store: CounterStore, decisions: list[tuple[int, list[RateCheck], str | None]],
          prefix: str = "") -> None:
    oracle = Oracle()

    async def go() -> None:
        try:
            for step, (now, checks, once) in enumerate(decisions):
                renamed = [c._replace(key=prefix + c.key) for c in checks]
                want = oracle.evaluate(checks, now, once, 1 << 50)
                got = await store.evaluate([c.for_store() for c in renamed], now,
                                           once and prefix + once, 1 << 50)
                assert got == want, (step, now, checks, once)
        finally:
            await store.close()

    asyncio.run(go())


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_the_memory_store_answers_as_promised(
        scenario: tuple[list[tuple[int, list[RateCheck], str | None]], int]) -> None:
    agree(MemoryStore(), scenario[0])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_redis_answers_as_promised(
        redis_server: RedisServer,
        scenario: tuple[list[tuple[int, list[RateCheck], str | None]], int]) -> None:
    prefix = f"ex{next(_examples)}:"  # one Redis for every example: keys of its own
    agree(RedisStore(redis_server.unix_url, timeout_ms=5000, key_prefix="oracle:"),
          scenario[0], prefix)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios(step_back=0))
def test_a_redis_cluster_answers_as_promised(
        redis_cluster: RedisClusterHarness,
        scenario: tuple[list[tuple[int, list[RateCheck], str | None]], int]) -> None:
    """Every bucket and once key in a slot of its own: decisions split across masters,
    refused ones given back in the buckets' integers, each answer the oracle's. The
    callers' clock is kept ahead of Redis' and never steps back: a give-back assumes the
    clocks agree, and leaves its buckets counted up to the decision's time (as a spend of
    nothing would), which a clock that then steps back would see."""
    decisions = scenario[0]
    base = time.time_ns() // 1_000_000 + 2 * CLOCK_STEP_ALLOWANCE_MS - decisions[0][0]
    assume(all(now + base < 1 << 53 for now, _, _ in decisions))
    prefix = f"cl{next(_examples)}:"
    agree(ClusterStore(redis_cluster.url, timeout_ms=5000, key_prefix="oracle:"),
          [(now + base, checks, once) for now, checks, once in decisions], prefix)


def test_a_sentinel_store_admits_exactly_n_at_one_instant(
        redis_sentinel: RedisSentinelHarness) -> None:
    """The store on the master a Sentinel names: the same script, the same exact budgets."""
    shapes = [(6, 1000, 6), (7, HOUR, 7), (1_000_000_000, DAY, 10), (1000, 1, 1000)]

    async def go() -> list[int]:
        store = SentinelStore(redis_sentinel.url, timeout_ms=5000)
        admitted = []
        try:
            now = time.time_ns() // 1_000_000
            for i, (count, period, burst) in enumerate(shapes):
                check = RateCheck(f"s{i}", count, period, burst, 1).for_store()
                got = await asyncio.gather(*(store.evaluate([check], now)
                                             for _ in range(burst + 1)))
                admitted.append(sum(e.committed for e in got))
        finally:
            await store.close()
        return admitted

    assert asyncio.run(go()) == [6, 7, 10, 1000]


def test_decisions_batched_together_answer_as_in_turn(redis_server: RedisServer) -> None:
    """Concurrent decisions ride one Lua call; each answers as the oracle does in turn."""
    shapes = [(6, 1000, 6), (7, HOUR, 7), (1_000_000_000, DAY, 10), (1000, 1, 1000)]
    decisions = []
    for i in range(240):
        count, period, burst = shapes[i % 4]
        cost = [1, 2, burst, 0][i // 4 % 4]
        decisions.append((T0 + i // 40, [RateCheck(f"c{i % 4}", count, period, burst, cost)],
                          f"q{i % 50}"))
    oracle = Oracle()
    want = [oracle.evaluate(checks, now, once) for now, checks, once in decisions]

    async def go(store: CounterStore) -> list[Evaluation]:
        try:
            return await asyncio.gather(*(
                store.evaluate([c.for_store() for c in checks], now, once, 1 << 50)
                for now, checks, once in decisions))
        finally:
            await store.close()

    assert asyncio.run(go(MemoryStore())) == want
    redis = RedisStore(redis_server.unix_url, timeout_ms=5000, key_prefix="batched:")
    assert asyncio.run(go(redis)) == want
    assert redis.batches_sent < 10


def test_a_cost_above_the_burst_never_fits() -> None:
    oracle = Oracle()
    check = RateCheck("k", 5, 1000, 5, 6)
    assert oracle.evaluate([check], T0).results[0] == BudgetResult(False, 5, NEVER)
    got = MemoryStore().evaluate_now([check.for_store()], T0)
    assert got == Evaluation((BudgetResult(False, 5, NEVER),), committed=False)
