"""The memory store is bounded (``store.max_entries``) and its eviction never raises a
budget: full buckets go first, then once keys; when every entry left is a budget in use,
the decision is refused (each limit follows its ``on_store_error``), counted and logged.
Once keys live as long as a duplicate can arrive (``store.once_ttl``, 10 minutes)."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from mqpolicy.commands.serve import core_registry
from mqpolicy.decision.engine import Action
from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.rates import DEFAULT_ONCE_TTL_MS
from mqpolicy.policy.request import Request
from mqpolicy.store.budget import BudgetCheck, StoreError, budget_check
from mqpolicy.store.memory import MemoryStore
from mqpolicy.store.opener import open_store
from mqpolicy.store.redis import RedisStore
from tests.support.redis_fixture import RedisServer

T0 = 1_760_000_000_000
HOUR = 3_600_000


def hourly(key: str, cost: int = 1) -> BudgetCheck:
    """3 an hour: a spent one carries debt for the rest of the test."""
    return budget_check(key, 3, HOUR, 3, cost)


def quick(key: str) -> BudgetCheck:
    """1 every 10 ms: full again 10 ms after a spend."""
    return budget_check(key, 1, 10, 1, 1)


def test_at_its_bound_eviction_never_lets_a_spent_budget_through() -> None:
    """A store of 60 entries filled past its bound, at random, with buckets in debt
    (3/1h), buckets soon full again (1/10ms) and once keys, the clock moving a few ms at a
    time: the store never holds more than 60 entries and no hourly budget ever admits more
    than its 3, whatever was evicted; what could not be kept was refused, not forgotten."""
    store = MemoryStore(max_entries=60)
    rng = random.Random(11)
    admitted: dict[str, int] = {}
    refused = 0
    now = T0
    for i in range(3000):
        now += rng.choice([0, 1, 3, 11])
        kind = rng.random()
        if kind < 0.5:
            key = f"h{rng.randint(0, 63)}"  # more hourly buckets than the store holds
            checks = [hourly(key)]
        elif kind < 0.8:
            key = f"q{rng.randint(0, 200)}"
            checks = [quick(key)]
        else:
            key = f"h{rng.randint(0, 63)}"
            checks = [hourly(key), quick(f"q{rng.randint(0, 200)}")]
        once = f"msg{i}" if rng.random() < 0.5 else None
        try:
            got = store.evaluate_now(checks, now, once)
        except StoreError:
            refused += 1
            continue
        finally:
            assert len(store) <= 60
        if got.committed and key.startswith("h"):
            admitted[key] = admitted.get(key, 0) + 1
        elif got.committed:
            for check in checks:
                if check.key.startswith("h"):
                    admitted[check.key] = admitted.get(check.key, 0) + 1
    assert max(admitted.values()) == 3  # spent, never handed back by an eviction
    assert all(n <= 3 for n in admitted.values())
    assert store.evicted_full > 50  # quick buckets made room
    assert store.evicted_once > 0  # then once keys
    assert store.refused == refused > 0  # then nothing could go: refused


def test_full_buckets_go_first_then_once_keys_then_refusal(
        caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore(max_entries=10)
    for i in range(4):
        assert store.evaluate_now([quick(f"q{i}")], T0).committed  # full at T0 + 10
    for i in range(4):
        assert store.evaluate_now([hourly(f"h{i}", 3)], T0).committed  # in debt for an hour
    assert store.evaluate_now([], T0, "seen:A").committed
    assert store.evaluate_now([], T0, "seen:B").committed
    assert len(store) == 10
    later = T0 + 20
    # a new hourly bucket: one full quick bucket makes room
    assert store.evaluate_now([hourly("h4", 3)], later).committed
    assert (store.evicted_full, store.evicted_once, store.refused) == (1, 0, 0)
    for i in range(5, 8):
        assert store.evaluate_now([hourly(f"h{i}", 3)], later).committed
    assert (store.evicted_full, store.evicted_once, store.refused) == (4, 0, 0)
    # no full bucket left: the oldest once key goes, then the next
    with caplog.at_level(logging.WARNING, "mqpolicy.store"):
        assert store.evaluate_now([hourly("h8", 3)], later).committed
        assert store.evaluate_now([hourly("h9", 3)], later).committed
    assert (store.evicted_full, store.evicted_once, store.refused) == (4, 2, 0)
    assert [r.getMessage() for r in caplog.records] == [
        "memory store full: dropped once keys, oldest first"]
    # ten budgets in use: the eleventh is refused, the ten keep their debt
    with pytest.raises(StoreError, match="memory store full"):
        store.evaluate_now([hourly("h10")], later)
    assert store.refused == 1
    for i in range(10):
        again = store.evaluate_now([hourly(f"h{i}")], later)
        assert not again.committed and again.results[0].remaining == 0
    # a decision that needs no new entry goes on in a full store
    assert store.evaluate_now([hourly("h0")._replace(consume=False)], later).results


def test_a_full_store_follows_on_store_error_and_says_so() -> None:
    """Through the decision service: a new sender's decision in a store full of budgets in
    use follows on_store_error (defer here), is counted as a store error and in the
    memory store's metrics."""
    policy = parse_policy("""\
store: {max_entries: 6, on_store_error: defer}
lanes: [{name: normal}]
default_lane: normal
limits:
  - {name: per-sender, key: sender, rate: 2/1h}
""")
    store = MemoryStore(max_entries=policy.store.max_entries)
    service = DecisionService(policy, store, clock_ms=lambda: T0)

    def eom(sender: str, queue_id: str) -> Request:
        return Request.from_policy_attributes({
            "protocol_state": "END-OF-MESSAGE", "sender": sender, "queue_id": queue_id})

    # a bucket and a once key each; from the fourth on, older once keys make room
    verdicts = [service.decide_now(eom(f"s{i}@example.com", f"Q{i}")) for i in range(5)]
    assert [v.action if v else None for v in verdicts] == [Action.ACCEPT] * 5
    assert (len(store), store.evicted_once) == (6, 4)
    full = service.decide_now(eom("new@example.com", "Q9"))  # 5 buckets, 1 once key left
    assert full is not None and full.action is Action.DEFER and full.store_error
    assert service.stats.store_errors == 1
    assert len(store) == 6  # the last once key was not dropped for a refused decision
    text = core_registry(service).render()
    assert "mqpolicy_memory_store_entries 6" in text
    assert 'mqpolicy_memory_store_evictions_total{kind="once"} 4' in text
    assert 'mqpolicy_memory_store_evictions_total{kind="full"} 0' in text
    assert "mqpolicy_memory_store_refusals_total 1" in text
    # the spent budgets are still spent
    again = service.decide_now(eom("s0@example.com", "Q10"))
    assert again is not None and again.limits[0].remaining == 0


def test_the_bound_is_a_setting() -> None:
    policy = parse_policy("store: {max_entries: 250000, once_ttl: 2m}\n"
                          "lanes: [{name: normal}]\ndefault_lane: normal\n")
    assert (policy.store.max_entries, policy.store.once_ttl_ms) == (250_000, 120_000)
    default = parse_policy("lanes: [{name: normal}]\ndefault_lane: normal\n")
    assert (default.store.max_entries, default.store.once_ttl_ms) == (1_000_000, 600_000)
    store = open_store("memory://", max_entries=policy.store.max_entries)
    assert isinstance(store, MemoryStore) and store.max_entries == 250_000


# ------------------------------------------------------------------ once keys


def eom_request(queue_id: str) -> Request:
    return Request.from_policy_attributes({
        "protocol_state": "END-OF-MESSAGE", "sender": "s@example.com", "queue_id": queue_id})


@pytest.mark.parametrize(("setting", "ttl_ms"), [("", DEFAULT_ONCE_TTL_MS),
                                                 (", once_ttl: 2s", 2000)])
def test_a_message_is_remembered_as_counted_for_the_once_ttl(setting: str, ttl_ms: int) -> None:
    """Seen again within the lifetime: a duplicate; after it (a recycled queue id): a new
    message, counted."""
    policy = parse_policy(f"""\
store: {{timeout_ms: 5000{setting}}}
lanes: [{{name: normal}}]
default_lane: normal
limits:
  - {{name: per-sender, key: sender, rate: 100/1d}}
""")
    clock = [T0]
    service = DecisionService(policy, MemoryStore(), clock_ms=lambda: clock[0])
    first = service.decide_now(eom_request("Q1"))
    clock[0] = T0 + ttl_ms - 1
    again = service.decide_now(eom_request("Q1"))
    clock[0] = T0 + ttl_ms
    recycled = service.decide_now(eom_request("Q1"))
    assert first is not None and again is not None and recycled is not None
    assert not first.duplicate and again.duplicate and not recycled.duplicate
    assert recycled.limits[0].remaining == 98


def test_redis_keeps_a_once_key_for_the_once_ttl(redis_clean: RedisServer) -> None:
    policy = parse_policy("store: {timeout_ms: 5000, once_ttl: 90s}\n"
                          "lanes: [{name: normal}]\ndefault_lane: normal\n"
                          "limits: [{name: l, key: sender, rate: 10/1h}]\n")

    async def go() -> None:
        store = RedisStore(redis_clean.unix_url, timeout_ms=5000)
        try:
            verdict = await DecisionService(policy, store).decide(eom_request("Q77"))
            assert not verdict.duplicate
        finally:
            await store.close()

    asyncio.run(go())
    with redis_clean.client() as client:
        assert 80_000 < client.pttl("mqpolicy:seen:Q77") <= 90_000
