"""A message's ledger and its give-back (issue 16, contract rule 5) on the memory store and
on Redis: what a message's RCPT decisions spent is recorded in the same atomic step and
given back when the message is refused or held, never more than the spends still hold."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mqpolicy.store.budget import CounterStore, budget_check
from mqpolicy.store.memory import MemoryStore

SECOND = 1000
T0 = 1_000_000_000_000


def check(key: str, cost: int, consume: bool = True):  # type: ignore[no-untyped-def]
    return budget_check(key, 10, 10 * SECOND, 10, cost, consume)  # 1 unit a second, burst 10


async def free(store: CounterStore, key: str, now: int) -> int:
    evaluation = await store.evaluate([check(key, 0, consume=False)], now)
    return evaluation.results[0].remaining


def run(make_store: Callable[[], CounterStore], body: Callable[[CounterStore], object]) -> None:
    async def go() -> None:
        store = make_store()
        try:
            await body(store)  # type: ignore[misc]
        finally:
            await store.close()
    asyncio.run(go())


def test_a_give_back_restores_the_bucket(each_store: Callable[[], CounterStore]) -> None:
    async def body(store: CounterStore) -> None:
        await store.evaluate([check("rl:a", 4)], T0, ledger_key="spent:m1")
        assert await free(store, "rl:a", T0) == 6
        assert await store.give_back("spent:m1", T0 + 500) == 1
        assert await free(store, "rl:a", T0 + 500) == 10
        assert await store.give_back("spent:m1", T0 + 500) == 0  # once only
    run(each_store, body)


def test_older_debt_is_kept(each_store: Callable[[], CounterStore]) -> None:
    async def body(store: CounterStore) -> None:
        await store.evaluate([check("rl:a", 6)], T0)  # someone else's, before the message
        await store.evaluate([check("rl:a", 3)], T0, ledger_key="spent:m1")
        await store.evaluate([check("rl:b", 2)], T0 + 100, ledger_key="spent:m1")
        await store.give_back("spent:m1", T0 + 2 * SECOND)
        # as had the message never come: 6 - 2 refilled
        assert await free(store, "rl:a", T0 + 2 * SECOND) == 6
        assert await free(store, "rl:b", T0 + 2 * SECOND) == 10
    run(each_store, body)


def test_what_refilled_is_not_given_twice(each_store: Callable[[], CounterStore]) -> None:
    """A spend partly refilled, then another caller's spend: the give-back returns what
    the message's spend still holds, never more (no budget beyond its burst)."""
    async def body(store: CounterStore) -> None:
        await store.evaluate([check("rl:a", 4)], T0, ledger_key="spent:m1")
        await store.evaluate([check("rl:a", 3)], T0 + 1500)
        await store.give_back("spent:m1", T0 + 2 * SECOND)
        assert await free(store, "rl:a", T0 + 2 * SECOND) == 7
        await store.evaluate([check("rl:a", 10)], T0 + 20 * SECOND)
        assert await free(store, "rl:a", T0 + 20 * SECOND) == 0
    run(each_store, body)


def test_refused_and_peeking_decisions_write_no_ledger(
        each_store: Callable[[], CounterStore]) -> None:
    async def body(store: CounterStore) -> None:
        await store.evaluate([check("rl:a", 11)], T0, ledger_key="spent:m1")  # refused
        await store.evaluate([check("rl:a", 2, consume=False)], T0, ledger_key="spent:m1")
        assert await store.give_back("spent:m1", T0) == 0
    run(each_store, body)


def test_a_moved_ledger_is_given_back_under_its_new_key(
        each_store: Callable[[], CounterStore]) -> None:
    async def body(store: CounterStore) -> None:
        await store.evaluate([check("rl:a", 5)], T0, ledger_key="spent:i:1")
        await store.move_ledger("spent:i:1", "spent:q:Q1")
        await store.move_ledger("spent:i:none", "spent:q:Q2")  # nothing there: no error
        assert await store.give_back("spent:i:1", T0) == 0
        assert await store.give_back("spent:q:Q1", T0) == 1
        assert await free(store, "rl:a", T0) == 10
    run(each_store, body)


def test_a_ledger_survives_the_memory_stores_bound() -> None:
    async def body(store: CounterStore) -> None:
        await store.evaluate([check("rl:a", 5)], T0, ledger_key="spent:m1")
        for i in range(50):  # buckets that fill up again, evicted to make room
            await store.evaluate([check(f"rl:x{i}", 1)], T0 + i * 20 * SECOND)
        now = T0 + 2 * SECOND
        await store.evaluate([check("rl:a", 0, consume=False)], now)
        assert await store.give_back("spent:m1", now) == 1
        assert await free(store, "rl:a", now) == 10
    run(lambda: MemoryStore(max_entries=3), body)
