"""Hold records, the scheduler's lease and the waiting lanes: one suite for the memory store
and the Redis store (a private redis-server, see tests/support/redis_fixture.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mqpolicy.store.budget import StoreError
from mqpolicy.store.hold_records import (
    MAX_DESTINATIONS,
    BrokenRecord,
    HeldSpend,
    HoldRecord,
    HoldRecordStore,
    MemoryHoldRecords,
    RecordError,
    RecordState,
    RedisHoldRecords,
    hold_destinations,
    record_ttl_ms,
    waiting_lanes,
)
from mqpolicy.store.opener import open_hold_records
from tests.support.redis_fixture import RedisServer
from tests.support.redis_ha_fixture import RedisSentinelHarness


class Clock:
    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def record(queue_id: str = "4ABC123DEF", **changes: Any) -> HoldRecord:
    base = HoldRecord(queue_id=queue_id, lane="bulk", not_before_ms=2_000, created_ms=1_000,
                      reason="per-sender", destinations=("example.org", "example.net"),
                      sender="a@example.com")
    return base.__class__(**{**{f: getattr(base, f) for f in base.__slots__}, **changes})


SPENDS = (HeldSpend("per-sender", "a@example.com", 1),
          HeldSpend("per-user", 'odd,"user"\u00e9', 12))


def test_record_round_trips_through_fields() -> None:
    r = record(state=RecordState.RELEASING, state_ms=5)
    assert HoldRecord.from_fields(r.queue_id, r.to_fields()) == r
    owing = record(spends=SPENDS)
    assert HoldRecord.from_fields(owing.queue_id, owing.to_fields()) == owing


@pytest.mark.parametrize(("fields", "problem"), [
    ({"v": "9"}, "unknown record format"),
    ({"v": "1", "lane": "bulk", "created_ms": "1"}, "missing field 'not_before_ms'"),
    ({"v": "1", "lane": "bulk", "not_before_ms": "soon", "created_ms": "1"}, "invalid literal"),
    ({"v": "1", "lane": "", "not_before_ms": "1", "created_ms": "1"}, "no lane"),
    ({"v": "1", "lane": "x", "not_before_ms": "1", "created_ms": "1", "state": "odd"},
     "'odd' is not a valid RecordState"),
    ({"v": "1", "lane": "x", "not_before_ms": "1", "created_ms": "1",
      "spends": '[["per-sender", "a@example.com", "1"]]'}, "unreadable spends"),
    ({"v": "1", "lane": "x", "not_before_ms": "1", "created_ms": "1", "spends": "[["},
     "Expecting"),
])
def test_unreadable_fields_name_the_problem(fields: dict[str, str], problem: str) -> None:
    with pytest.raises(RecordError, match=problem):
        HoldRecord.from_fields("Q1", fields)


def test_record_ttl_covers_the_longest_schedule() -> None:
    assert record_ttl_ms(86_400_000) == 30 * 86_400_000
    assert record_ttl_ms(60 * 86_400_000) == 67 * 86_400_000


# ---------------------------------------------------------------- both stores


Body = Callable[[HoldRecordStore], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
def records(request: pytest.FixtureRequest) -> Callable[[Body], None]:
    """Runs a test body against a fresh store of each kind, on a loop of its own."""
    if request.param == "memory":
        make: Callable[[], HoldRecordStore] = MemoryHoldRecords
    else:
        server: RedisServer = request.getfixturevalue("redis_clean")

        def make() -> HoldRecordStore:
            return RedisHoldRecords(server.unix_url, key_prefix="t:", timeout_ms=2000)

    def run(body: Body) -> None:
        async def main() -> None:
            store = make()
            try:
                await body(store)
            finally:
                await store.close()

        asyncio.run(main())

    return run


def test_put_get_load_delete(records: Callable[[Body], None]) -> None:
    async def body(records: HoldRecordStore) -> None:
        a, b = record("AAAAA1"), record("BBBBB2", lane="normal", created_ms=500)
        await records.put(a)
        await records.put(b)
        assert await records.get("AAAAA1") == a
        assert await records.get("NOSUCH") is None
        loaded = await records.load()
        assert loaded.records == {"AAAAA1": a, "BBBBB2": b}
        assert loaded.broken == {}
        assert await records.delete(["AAAAA1", "NOSUCH"]) == 1
        assert (await records.load()).records == {"BBBBB2": b}

    records(body)


def test_put_replaces_the_whole_record(records: Callable[[Body], None]) -> None:
    async def body(records: HoldRecordStore) -> None:
        await records.put(record("AAAAA1", reason="first", destinations=("a.example",)))
        await records.put(record("AAAAA1", reason="second", destinations=()))
        got = await records.get("AAAAA1")
        assert isinstance(got, HoldRecord)
        assert (got.reason, got.destinations) == ("second", ())

    records(body)


def test_mark_changes_only_existing_records(records: Callable[[Body], None]) -> None:
    async def body(records: HoldRecordStore) -> None:
        await records.put(record("AAAAA1", spends=SPENDS))
        marked = await records.mark(["AAAAA1", "GONE01"], RecordState.RELEASING, 42)
        assert marked == ["AAAAA1"]
        got = await records.get("AAAAA1")
        assert isinstance(got, HoldRecord)
        assert (got.state, got.state_ms) == (RecordState.RELEASING, 42)
        assert got.spends == SPENDS  # what the release is to spend survives the mark
        assert await records.get("GONE01") is None  # not created by the mark
        assert "GONE01" not in (await records.load()).records

    records(body)


def test_lease_is_exclusive_renewable_and_released_by_its_owner(records: Callable[[Body], None]) -> None:
    async def body(records: HoldRecordStore) -> None:
        assert await records.acquire_lease("one", 10_000)
        assert not await records.acquire_lease("two", 10_000)
        assert await records.acquire_lease("one", 10_000)  # extend
        assert await records.lease_holder() == "one"
        assert not await records.release_lease("two")
        assert await records.release_lease("one")
        assert await records.lease_holder() is None
        assert await records.acquire_lease("two", 10_000)

    records(body)


def test_waiting_lanes_are_published_with_a_ttl(records: Callable[[Body], None]) -> None:
    async def body(records: HoldRecordStore) -> None:
        assert await waiting_lanes(records) == frozenset()
        await records.set_waiting_lanes(frozenset({"bulk", "normal"}), 60_000)
        assert await waiting_lanes(records) == frozenset({"bulk", "normal"})
        await records.set_waiting_lanes(frozenset(), 60_000)
        assert await waiting_lanes(records) == frozenset()

    records(body)


# ---------------------------------------------------------------- memory specifics


def test_memory_records_and_lease_expire_on_the_clock() -> None:
    async def body() -> None:
        clock = Clock()
        records = MemoryHoldRecords(clock)
        await records.put(record("AAAAA1"), ttl_ms=1000)
        assert await records.acquire_lease("one", 500)
        await records.set_waiting_lanes(frozenset({"bulk"}), 500)
        clock.now += 600
        assert await records.acquire_lease("two", 500)  # the first lease ran out
        assert await waiting_lanes(records) == frozenset()
        clock.now += 500
        assert await records.get("AAAAA1") is None
        assert len(records) == 0

    asyncio.run(body())


def test_memory_reports_unparseable_records_as_broken() -> None:
    async def body() -> None:
        records = MemoryHoldRecords()
        records.put_fields("BAD001", {"v": "1", "lane": "bulk"})
        loaded = await records.load()
        assert loaded.records == {}
        assert loaded.broken["BAD001"].problem == "missing field 'not_before_ms'"
        assert isinstance(await records.get("BAD001"), BrokenRecord)

    asyncio.run(body())


# ---------------------------------------------------------------- redis specifics


def _keys(server: RedisServer) -> list[str]:
    with server.client() as client:
        return sorted(k.decode() for k in client.keys("*"))


def test_redis_keys_ttl_and_index(redis_clean: RedisServer) -> None:
    async def body() -> None:
        store = RedisHoldRecords(redis_clean.unix_url, key_prefix="t:", timeout_ms=2000)
        try:
            await store.put(record("AAAAA1"), ttl_ms=60_000)
            assert _keys(redis_clean) == ["t:hold:default:index", "t:hold:default:rec:AAAAA1"]
            with redis_clean.client() as client:
                assert 0 < client.pttl("t:hold:default:rec:AAAAA1") <= 60_000
                assert client.zscore("t:hold:default:index", "AAAAA1") == 1000
                client.delete("t:hold:default:rec:AAAAA1")  # expired meanwhile
            assert (await store.load()).records == {}
            assert _keys(redis_clean) == []  # the index entry went too
        finally:
            await store.close()

    asyncio.run(body())


def test_redis_broken_record_is_reported(redis_clean: RedisServer) -> None:
    with redis_clean.client() as client:
        client.set("t:hold:default:rec:BAD001", '{"v":"1","lane":"x","not_before_ms":"soon",'
                                                '"created_ms":"1"}')
        client.set("t:hold:default:rec:BAD002", "{not json")
        client.zadd("t:hold:default:index", {"BAD001": 1, "BAD002": 2})

    async def body() -> None:
        store = RedisHoldRecords(redis_clean.unix_url, key_prefix="t:", timeout_ms=2000)
        try:
            loaded = await store.load()
            assert sorted(loaded.broken) == ["BAD001", "BAD002"]
            assert loaded.broken["BAD001"].fields["not_before_ms"] == "soon"
            assert loaded.broken["BAD002"].problem == "not JSON"
            # a state change leaves an unreadable record as it is
            assert await store.mark(["BAD002"], RecordState.RELEASING, 1) == []
        finally:
            await store.close()
    asyncio.run(body())


def test_redis_lease_expires_by_itself(redis_clean: RedisServer) -> None:
    async def body() -> None:
        store = RedisHoldRecords(redis_clean.unix_url, key_prefix="t:", timeout_ms=2000)
        try:
            assert await store.acquire_lease("one", 50)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not await store.acquire_lease("two", 10_000):  # poll: the lease lapses
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
            assert await store.lease_holder() == "two"
        finally:
            await store.close()

    asyncio.run(body())


def test_redis_load_reads_many_records_in_chunks(redis_clean: RedisServer) -> None:
    async def body() -> None:
        store = RedisHoldRecords(redis_clean.unix_url, key_prefix="t:", timeout_ms=5000,
                                 read_chunk=100)
        try:
            for i in range(250):
                await store.put(record(f"Q{i:05d}AB", created_ms=i))
            loaded = await store.load()
            assert len(loaded.records) == 250
        finally:
            await store.close()

    asyncio.run(body())


def test_redis_down_is_a_store_error(private_redis: RedisServer) -> None:
    async def body() -> None:
        store = RedisHoldRecords(private_redis.unix_url, key_prefix="t:", timeout_ms=200)
        try:
            private_redis.stop()
            with pytest.raises(StoreError):
                await store.put(record())
            with pytest.raises(StoreError):
                await store.acquire_lease("one", 1000)
            assert await waiting_lanes(store) == frozenset()  # never a reason to refuse mail
        finally:
            await store.close()

    asyncio.run(body())


@pytest.mark.parametrize(("url", "kind"), [
    ("memory://", MemoryHoldRecords),
    ("redis://127.0.0.1:1/0", RedisHoldRecords),
    ("unix:///tmp/x.sock", RedisHoldRecords),
])
def test_open_hold_records(url: str, kind: Callable[..., Any]) -> None:
    async def body() -> None:
        store = open_hold_records(url)
        assert isinstance(store, kind)  # type: ignore[arg-type]
        await store.close()

    asyncio.run(body())


def test_sentinel_is_supported_and_cluster_is_refused() -> None:
    async def body() -> None:
        store = open_hold_records("redis+sentinel://127.0.0.1:1/mymaster/0")
        assert isinstance(store, RedisHoldRecords)
        await store.close()
        with pytest.raises(ValueError, match="one Redis or Sentinel"):
            open_hold_records("redis+cluster://127.0.0.1:7000")

    asyncio.run(body())


@pytest.mark.e2e
def test_records_and_lease_on_a_real_sentinel_master(redis_sentinel: RedisSentinelHarness) -> None:
    async def scenario() -> None:
        store = open_hold_records(redis_sentinel.url, key_prefix="mqhold:", timeout_ms=2000)
        try:
            record = HoldRecord(queue_id="4SENT1", lane="bulk", not_before_ms=5,
                                created_ms=1, reason="per-sender")
            await store.put(record)
            assert await store.get("4SENT1") == record
            assert await store.acquire_lease("me", 5000)
            assert not await store.acquire_lease("other", 5000)
            assert await store.lease_holder() == "me"
            assert await store.delete(["4SENT1"]) == 1
        finally:
            await store.close()

    asyncio.run(scenario())


def test_hold_destinations_distinct_in_order_and_bounded() -> None:
    assert hold_destinations(["b.test", "", "a.test", "b.test"]) == ("b.test", "a.test")
    many = [f"d{i}.test" for i in range(MAX_DESTINATIONS + 10)]
    assert hold_destinations(many) == tuple(many[:MAX_DESTINATIONS])
