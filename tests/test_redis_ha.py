"""Redis Cluster and Sentinel stores against real servers on loopback.

Cluster: a real 3-master cluster (``redis-cli --cluster create``). Decisions whose keys span
slots agree with the plain decision rules (the oracle of ``tests.budget_oracle``), concurrent
decisions never spend a bucket beyond its budget, refused and duplicate decisions give back
what they spent in other slots, a hash tag in the prefix makes every decision one call, and
a dead master fails only the decisions that need its slots.

Sentinel: a real master, replica and three sentinels. Killing the master: decisions go on
per ``on_store_error`` within the deadline while there is no master, then on the promoted
replica, with the budget spent before the failure intact.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pytest

from mqpolicy.budget import BudgetCheck, BudgetResult, Evaluation, StoreError, budget_check
from mqpolicy.cluster_store import ClusterStore, parse_cluster_url
from mqpolicy.config import Policy, parse_policy
from mqpolicy.decisions import DecisionService
from mqpolicy.engine import Action
from mqpolicy.request import Request
from mqpolicy.sentinel_store import SentinelStore, parse_sentinel_url
from mqpolicy.store_factory import open_store
from tests.budget_oracle import Oracle, RateCheck

if TYPE_CHECKING:
    from tests.redis_ha_fixture import RedisClusterHarness, RedisSentinelHarness


HOUR = 3_600_000


def wall_ms() -> int:
    return int(time.time() * 1000)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


@pytest.fixture
def cluster(redis_cluster: RedisClusterHarness) -> RedisClusterHarness:
    redis_cluster.flushall()
    return redis_cluster


def keys_in_distinct_slots(
    store: ClusterStore, count: int, stem: str, avoid: set[int] | None = None
) -> list[str]:
    """``count`` logical keys ``<stem><n>`` whose slots differ from each other's and from
    the slots in ``avoid`` (which is updated)."""
    found: list[str] = []
    slots = avoid if avoid is not None else set()
    i = 0
    while len(found) < count:
        key = f"{stem}{i}"
        slot = store.slot_of(key)
        if slot not in slots:
            slots.add(slot)
            found.append(key)
        i += 1
    return found


# ------------------------------------------------------------------ URLs


@pytest.mark.parametrize(
    ("url", "sentinels", "service", "db", "password", "tls"),
    [
        ("redis+sentinel://h1,h2:26380/mymaster", (("h1", 26379), ("h2", 26380)), "mymaster",
         0, None, False),
        ("rediss+sentinel://:s%40cret@[::1]:5000/svc/3", (("::1", 5000),), "svc", 3, "s@cret",
         True),
        ("REDIS+SENTINEL://10.0.0.1:26379/m/0?sentinel_password=x", (("10.0.0.1", 26379),),
         "m", 0, None, False),
    ],
)  # fmt: skip
def test_sentinel_urls(
    url: str,
    sentinels: tuple[tuple[str, int], ...],
    service: str,
    db: int,
    password: str | None,
    tls: bool,
) -> None:
    target = parse_sentinel_url(url)
    assert (target.sentinels, target.service, target.db) == (sentinels, service, db)
    assert (target.password, target.tls) == (password, tls)


def test_sentinel_password_option() -> None:
    target = parse_sentinel_url("redis+sentinel://u:p@h/m?sentinel_password=sp")
    assert (target.username, target.password, target.sentinel_password) == ("u", "p", "sp")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h/", "service name is missing"),
        ("redis+sentinel://h/m/x", "database must be a number"),
        ("redis+sentinel://h/m/0/extra", "expected /service"),
        ("redis+sentinel://h:99999/m", "bad port"),
        ("redis+sentinel://h:x/m", "bad port"),
        ("redis+sentinel://h,,g/m", "empty host"),
        ("redis+sentinel:///m", "no sentinel host"),
        ("redis+sentinel://h/m?timeout=1", "unknown option"),
        ("redis+cluster://", "no cluster node"),
        ("redis+cluster://h:7000/1", "database 0 only"),
        ("redis+cluster://h:7000?x=1", "takes no options"),
        ("cluster://h:7000", "write redis+cluster://"),
    ],
)
def test_bad_ha_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        open_store(url)


def test_cluster_url() -> None:
    target = parse_cluster_url("rediss+cluster://u:p@a:7000,b,[::1]:7002/")
    assert target.nodes == (("a", 7000), ("b", 6379), ("::1", 7002))
    assert (target.username, target.password, target.tls) == ("u", "p", True)
    # percent-decoded once: "%2541" is the password "%41", not "A"
    assert parse_cluster_url("redis+cluster://u:%2541@a").password == "%41"


def test_open_store_routes_the_ha_schemes() -> None:
    async def body() -> None:
        sentinel = open_store("redis+sentinel://127.0.0.1:1/m", timeout_ms=20)
        cluster = open_store("redis+cluster://127.0.0.1:1", timeout_ms=20)
        assert isinstance(sentinel, SentinelStore)
        assert isinstance(cluster, ClusterStore)
        for store in (sentinel, cluster):
            with pytest.raises(StoreError):  # nothing listens on port 1
                await store.evaluate([unit_check("k", 1000, 1, 1)], wall_ms())
            await store.close()

    run(body)


# ------------------------------------------------------------------ cluster

# (name, count, period_ms, burst): a spend and its give-back cancel exactly (integers)
PROFILES = [("a", 5, 1000, 5), ("b", 1, 1000, 3), ("c", 50, HOUR, 50), ("d", 2, 1, 2),
            ("e", 4, 1000, 1), ("f", 1, 4096, 0), ("g", 3, 1000, 7)]  # fmt: skip


def random_decision(rng: random.Random) -> tuple[list[RateCheck], str | None]:
    checks = []
    for _ in range(rng.randint(0, 4)):
        name, count, period, burst = rng.choice(PROFILES)
        cost = rng.choice([0, 1, 1, 1, 2, burst + 1])
        checks.append(RateCheck(f"rl:{name}:{rng.randint(0, 2)}", count, period, burst, cost,
                                consume=rng.random() < 0.85, blocking=rng.random() < 0.7))
    once = f"seen:m{rng.randint(0, 25)}" if rng.random() < 0.4 else None
    return checks, once


def for_store(checks: list[RateCheck]) -> list[BudgetCheck]:
    return [c.for_store() for c in checks]


def unit_check(key: str, interval_ms: int, burst: int, cost: int, consume: bool = True,
               blocking: bool = True) -> BudgetCheck:
    """``cost`` units of a bucket of ``burst`` that gets one unit back every ``interval_ms``."""
    return budget_check(key, 1, interval_ms, burst, cost, consume, blocking)


@pytest.mark.parametrize("seed", range(4))
def test_cluster_decisions_agree_with_the_decision_rules(
    cluster: RedisClusterHarness, seed: int
) -> None:
    """Decisions across slots, one after another: the same evaluations as one Redis.
    The clock runs ahead of Redis' (as in test_stores), so no time passes between a spend
    and its give-back and the comparison is exact."""
    rng = random.Random(7000 + seed)

    async def body() -> None:
        store = ClusterStore(cluster.url, timeout_ms=2000, key_prefix="t:")
        oracle = Oracle()
        offset = 0
        try:
            for op in range(150):
                checks, once = random_decision(rng)
                offset += 3 + rng.choice([0, 0, 1, 7, 150, 900, 5000])
                now = wall_ms() + offset
                want = oracle.evaluate(checks, now, once, 1 << 40)
                got = await store.evaluate(for_store(checks), now, once, 1 << 40)
                assert got == want, f"seed={seed} op={op} once={once} {checks}"
            assert store.split_decisions > 20 and store.refunds > 5, vars(store)
            assert store.refunds_failed == 0
        finally:
            await store.close()

    run(body)


def test_cluster_concurrent_split_decisions_never_overspend(cluster: RedisClusterHarness) -> None:
    """300 concurrent messages, each checked against its sender's bucket (3 senders, 50
    each) and one shared bucket (120), each bucket and once key in a slot of its own.

    In the first wave no sender goes beyond 50 and at most 120 pass; fewer may pass, since
    a message refused by its sender held a unit of the shared bucket until its give-back.
    Retried (as Postfix retries deferred mail), the refused messages take exactly what was
    given back: 120 in all, every refused message's spends returned, nothing left over."""

    async def body() -> None:
        store = ClusterStore(cluster.url, timeout_ms=5000)
        taken: set[int] = set()
        senders = keys_in_distinct_slots(store, 4, "rl:sender:", taken)
        shared, senders = senders[0], senders[1:]
        once_keys = keys_in_distinct_slots(store, 300, "seen:q", taken)

        def checks(i: int) -> list[BudgetCheck]:
            return [budget_check(senders[i % 3], 50, HOUR, 50, 1),
                    budget_check(shared, 120, HOUR, 120, 1)]  # fmt: skip

        try:
            waiting = list(range(300))
            passed: list[int] = []
            waves: list[int] = []
            while waiting:
                now = wall_ms()
                got = await asyncio.gather(
                    *(store.evaluate(checks(i), now, once_keys[i]) for i in waiting)
                )
                wave = [i for i, e in zip(waiting, got, strict=True) if e.committed]
                if not wave:
                    break
                waves.append(len(wave))
                passed += wave
                waiting = [i for i in waiting if i not in wave]
                assert len(waves) < 20
            per_sender = [sum(1 for i in passed if i % 3 == s) for s in range(3)]
            assert len(passed) == 120, waves
            assert all(n <= 50 for n in per_sender), per_sender
            assert store.split_decisions >= 300 and store.refunds_failed == 0
            peek = [budget_check(k, 50, HOUR, 50, 1, consume=False) for k in senders]
            later = await store.evaluate(peek, wall_ms())
            assert [r.remaining for r in later.results] == [50 - n for n in per_sender]
            shared_left = await store.evaluate(
                [budget_check(shared, 120, HOUR, 120, 1, consume=False)], wall_ms()
            )
            assert not shared_left.results[0].allowed
            assert shared_left.results[0].remaining == 0
            kept = [k for k in cluster.all_keys() if k.startswith("mqpolicy:seen:")]
            assert sorted(kept) == sorted(f"mqpolicy:{once_keys[i]}" for i in passed)
            print(f"\ncluster, 300 concurrent split decisions, budget 120: passed per wave {waves}")
        finally:
            await store.close()

    run(body)


def test_cluster_refused_decision_gives_back_its_other_slots(cluster: RedisClusterHarness) -> None:
    async def body() -> None:
        store = ClusterStore(cluster.url, timeout_ms=2000)
        roomy, full = keys_in_distinct_slots(store, 2, "rl:gb:")
        try:
            now = wall_ms()
            first = await store.evaluate([unit_check(roomy, 60_000, 10, 3)], now)
            assert first.committed
            (before,) = await store.inspect([roomy], now)
            assert before is not None
            assert (await store.evaluate([unit_check(full, 60_000, 1, 1)], now)).committed
            refused = await store.evaluate(
                [unit_check(roomy, 60_000, 10, 2), unit_check(full, 60_000, 1, 1)],
                now,
                "seen:refused",
            )
            assert not refused.committed and not refused.duplicate
            assert refused.results[0].allowed and not refused.results[1].allowed
            assert refused.results[1].retry_after_ms > 0
            assert refused.results[0].remaining == 7  # counted after the give-back
            (after,) = await store.inspect([roomy], now)
            assert after is not None
            # the bucket had a backlog: given back exactly what the refused decision took
            refill = unit_check(roomy, 60_000, 10, 3).refill
            at = after.at_ms  # Redis' clock at the give-back, a few ms after `now`
            assert now <= at < now + 5000
            assert after.debt_now(refill, at) == before.debt_now(refill, at)
            assert cluster.get("mqpolicy:seen:refused") is None
            assert store.refunds == 1
        finally:
            await store.close()

    run(body)


def test_cluster_duplicate_spends_nothing_anywhere(cluster: RedisClusterHarness) -> None:
    async def body() -> None:
        store = ClusterStore(cluster.url, timeout_ms=2000)
        a, b = keys_in_distinct_slots(store, 2, "rl:dup:")
        checks = [unit_check(a, 60_000, 10, 1), unit_check(b, 60_000, 10, 1)]
        try:
            now = wall_ms()
            assert (await store.evaluate(checks, now, "seen:msg")).committed
            again = await store.evaluate(checks, now, "seen:msg")
            assert again == Evaluation(
                (BudgetResult(True, 9, 0), BudgetResult(True, 9, 0)), False, duplicate=True
            )
            peek = [c._replace(consume=False) for c in checks]
            left = await store.evaluate(peek, wall_ms())
            assert [r.remaining for r in left.results] == [9, 9]
        finally:
            await store.close()

    run(body)


def test_cluster_hash_tag_prefix_makes_each_decision_one_call(
    cluster: RedisClusterHarness,
) -> None:
    async def body() -> None:
        store = ClusterStore(cluster.url, timeout_ms=2000, key_prefix="{mq}:")
        rng = random.Random(5)
        oracle = Oracle()
        try:
            for _ in range(60):
                checks, once = random_decision(rng)
                now = wall_ms()
                got = await store.evaluate(for_store(checks), now, once)
                assert got == oracle.evaluate(checks, now, once)
            assert store.split_decisions == 0 and store.refunds == 0
            assert store.slot_calls == store.batches_sent
            assert {store.slot_of(k) for k in ("rl:a:0", "seen:x", "zz")} == {store.slot_of("q")}
        finally:
            await store.close()

    run(body)


def test_cluster_inspect_scan_reset_ping(cluster: RedisClusterHarness) -> None:
    async def body() -> None:
        store = ClusterStore(cluster.url, timeout_ms=2000, key_prefix="p[*]:")
        keys = keys_in_distinct_slots(store, 12, "rl:scan:")
        try:
            await store.ping()
            now = wall_ms()
            for key in keys:
                assert (await store.evaluate([unit_check(key, 1000, 5, 2)], now)).committed
            nodes = {cluster.node_of_key("p[*]:" + k).port for k in keys}
            assert len(nodes) > 1  # really spread over masters
            states = await store.inspect([*keys, "rl:absent"], now)
            refill = unit_check("k", 1000, 5, 2).refill
            assert [s.full_at_ms(refill, now) if s else None for s in states] == (
                [now + 2000] * 12 + [None])
            assert await store.scan("rl:scan:*") == sorted(keys)
            some = await store.scan("rl:scan:*", count=3)
            assert len(some) == 3 and set(some) <= set(keys)
            assert await store.reset([*keys[:5], "rl:absent"]) == 5
            assert await store.scan("rl:scan:*") == sorted(keys[5:])
        finally:
            await store.close()

    run(body)


def test_cluster_lost_script_cache_is_reloaded(cluster: RedisClusterHarness) -> None:
    async def body() -> None:
        store = ClusterStore(cluster.url, timeout_ms=2000)
        keys = keys_in_distinct_slots(store, 6, "rl:noscript:")
        checks = [unit_check(k, 1000, 1, 1) for k in keys]
        try:
            assert (await store.evaluate(checks[:3], wall_ms())).committed
            for node in cluster.nodes:
                with node.client() as client:
                    client.script_flush()
            assert (await store.evaluate(checks[3:], wall_ms())).committed
            refused = await store.evaluate([checks[0], checks[5]], wall_ms())
            assert not refused.committed
        finally:
            await store.close()

    run(body)


def test_cluster_dead_master_fails_only_decisions_that_need_it(
    redis_cluster_partial: RedisClusterHarness,
) -> None:
    async def body() -> None:
        store = ClusterStore(redis_cluster_partial.url, timeout_ms=200)
        keys = keys_in_distinct_slots(store, 40, "rl:down:")
        victim = redis_cluster_partial.nodes[2]
        on_victim = [k for k in keys if redis_cluster_partial.node_of_key("mqpolicy:" + k) is victim]
        elsewhere = [k for k in keys if k not in on_victim]
        assert on_victim and len(elsewhere) >= 2
        try:
            assert (await store.evaluate([unit_check(on_victim[0], 60_000, 5, 1)],
                                         wall_ms())).committed
            victim.kill()
            healthy = unit_check(elsewhere[0], 60_000, 5, 1)
            split = [unit_check(elsewhere[1], 60_000, 5, 1),
                     unit_check(on_victim[0], 60_000, 5, 1)]
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.evaluate(split, wall_ms())
            assert time.monotonic() - started < 2.0
            with pytest.raises(StoreError):
                await store.evaluate([split[1]], wall_ms())
            ok = await store.evaluate([healthy], wall_ms())
            assert ok.committed and ok.results[0].remaining == 4
            # the split decision's spend on the live master was given back
            peek = await store.evaluate([split[0]._replace(consume=False)], wall_ms())
            assert peek.results[0].remaining == 5
            # inspecting (mqpolicy counters) a bucket of the dead master: a StoreError too
            with pytest.raises(StoreError, match="redis cluster"):
                await store.inspect([on_victim[0]], wall_ms())
        finally:
            await store.close()

    run(body)


# ------------------------------------------------------------------ sentinel

SENTINEL_POLICY = """\
store: {timeout_ms: 50, on_store_error: %s}
lanes: [{name: normal}]
default_lane: normal
limits:
  - {name: per-sender, rate: 20/1h, burst: 20, key: sender, count: messages}
"""


def sentinel_policy(on_error: str) -> Policy:
    return parse_policy(SENTINEL_POLICY % on_error)


def message(sender: str, queue_id: str, stage: str = "END-OF-MESSAGE") -> Request:
    return Request.from_policy_attributes({
        "request": "smtpd_access_policy", "protocol_state": stage, "sender": sender,
        "recipient": "r@example.net", "client_address": "192.0.2.1", "queue_id": queue_id,
        "instance": queue_id, "recipient_count": "1",
    })  # fmt: skip


def test_sentinel_store_works_on_the_master(redis_sentinel: RedisSentinelHarness) -> None:
    async def body() -> None:
        store = SentinelStore(redis_sentinel.url, timeout_ms=2000)
        try:
            await store.ping()
            assert await store.master_address() == ("127.0.0.1", redis_sentinel.master.port)
            got = await store.evaluate([unit_check("k", 1000, 2, 1)], wall_ms(), "seen:1")
            assert got.committed
            with redis_sentinel.master.client() as client:
                assert sorted(client.keys("*")) == [b"mqpolicy:k", b"mqpolicy:seen:1"]
            assert await store.scan("*") == ["k", "seen:1"]
        finally:
            await store.close()

    run(body)


def test_sentinel_failover_decisions_flow_and_counters_survive(
    redis_sentinel: RedisSentinelHarness,
) -> None:
    """Spend 5 of 20, kill the master: while there is no master every decision ends within
    its deadline as ``on_store_error`` says (accept: accepted uncounted; defer: 451), then
    decisions are counted on the promoted replica, which still has the 5 spent."""

    async def body() -> None:
        store = SentinelStore(redis_sentinel.url, timeout_ms=50)
        accepting = DecisionService(sentinel_policy("accept"), store)
        deferring = DecisionService(sentinel_policy("defer"), store)
        try:
            for i in range(5):
                verdict = await accepting.decide(message("before@example.com", f"B{i}"))
                assert verdict.action is Action.ACCEPT and not verdict.store_error
            redis_sentinel.wait_replicated()

            killed = time.monotonic()
            redis_sentinel.kill_master()
            failed_latencies: list[float] = []
            outage_end: float | None = None
            counted_after = 0
            n = 0
            while counted_after < 6:
                assert time.monotonic() - killed < 30, "decisions did not resume within 30 s"
                service = accepting if n % 2 == 0 else deferring
                started = time.monotonic()
                verdict = await service.decide(message("flow@example.com", f"F{n}"))
                took = time.monotonic() - started
                n += 1
                if verdict.store_error:
                    assert outage_end is None, "a store error after decisions had resumed"
                    failed_latencies.append(took)
                    want = Action.ACCEPT if service is accepting else Action.DEFER
                    assert verdict.action is want, verdict
                else:
                    assert verdict.action is Action.ACCEPT, verdict
                    outage_end = outage_end or time.monotonic()
                    counted_after += 1
                await asyncio.sleep(0.01)  # pacing: about 100 decisions per second
            assert outage_end is not None and failed_latencies
            assert max(failed_latencies) < 0.5, max(failed_latencies)

            assert redis_sentinel.master_port() == redis_sentinel.replica.port
            assert await store.master_address() == ("127.0.0.1", redis_sentinel.replica.port)
            peek = await accepting.decide(message("before@example.com", "P", stage="RCPT"))
            assert not peek.store_error
            assert peek.limits[0].remaining == 15  # the 5 spent before the failover survived
            flow = await accepting.decide(message("flow@example.com", "P", stage="RCPT"))
            assert flow.limits[0].remaining == 20 - counted_after
            print(
                f"\nsentinel failover: {len(failed_latencies)} decisions answered per "
                f"on_store_error over {outage_end - killed:.2f} s without a master "
                f"(slowest {max(failed_latencies) * 1000:.0f} ms, "
                f"median {sorted(failed_latencies)[len(failed_latencies) // 2] * 1000:.1f} ms); "
                f"{counted_after} counted on the promoted replica; 15/20 left for the sender "
                "that spent 5 before"
            )
        finally:
            await store.close()

    run(body)


def test_sentinel_all_sentinels_down_fails_fast(redis_sentinel: RedisSentinelHarness) -> None:
    async def body() -> None:
        store = SentinelStore(redis_sentinel.url, timeout_ms=50)
        try:
            for sentinel in redis_sentinel.sentinels:
                sentinel.stop()
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.evaluate([unit_check("k", 1000, 1, 1)], wall_ms())
            assert time.monotonic() - started < 0.5
        finally:
            await store.close()

    run(body)
