"""The memory store's look (``look_now``, what ``mqpolicy replay`` asks before a retry):
what each check would find, spending nothing, is what a decision of that check alone
finds, and looking changes nothing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mqpolicy.store.budget import NEVER, BudgetCheck
from mqpolicy.store.memory import MemoryStore

T0 = 1_760_000_000_123
KEYS = ("rl:a:k", "rl:b:k", "rl:c:k")
# (refill per ms, unit, burst) of each key: every check of a key has the same refill
SHAPES = {"rl:a:k": (1, 3_600, 5), "rl:b:k": (7, 60_000, 3), "rl:c:k": (2, 1_000, 1)}


def check(key: str, cost: int, consume: bool) -> BudgetCheck:
    refill, unit, burst = SHAPES[key]
    return BudgetCheck(key, refill, unit, burst, cost, consume)


spends = st.lists(st.tuples(st.sampled_from(KEYS), st.integers(1, 3),
                            st.integers(0, 20_000)), max_size=30)
looks = st.lists(st.tuples(st.sampled_from(KEYS), st.integers(0, 7)), min_size=1,
                 max_size=5)


@settings(max_examples=200, deadline=None)
@given(spends, looks, st.integers(0, 60_000))
def test_a_look_finds_what_a_decision_that_spends_nothing_finds(
        spent: list[tuple[str, int, int]], looked: list[tuple[str, int]], later: int) -> None:
    store = MemoryStore()
    now = T0
    for key, cost, step in spent:
        now += step
        store.evaluate_now([check(key, cost, True)], now)
    now += later
    checks = [check(key, cost, False) for key, cost in looked]
    found = store.look_now(checks, now)
    assert len(found) == len(checks)
    for (allowed, retry_after_ms), one in zip(found, checks, strict=True):
        [alone] = store.evaluate_now([one], now).results
        assert (allowed, retry_after_ms) == (alone.allowed, alone.retry_after_ms)
        if one.cost > one.burst:
            assert (allowed, retry_after_ms) == (False, NEVER)  # never fits
    # looking spent nothing: the same looks again find the same
    assert store.look_now(checks, now) == found
