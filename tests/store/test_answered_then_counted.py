"""Answered, then counted: never. A decision the Redis store could not get answered within
its deadline has been answered per its limits' ``on_store_error`` (451, say); the batch
that carried it may still be in Redis' socket when Redis resumes from a pause. The batch
script skips every decision past its deadline by Redis' own clock, so what Redis counts
after a pause is exactly what was admitted.

Each test pauses a private redis-server (SIGSTOP) under concurrent load for longer than
the store's deadline, resumes it, goes on a little, then compares each sender's budget
spent with the decisions admitted for it. The clock of the decisions stands still (no
refill): what a bucket lacks is exactly what was spent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from mqpolicy.decision.engine import store_key
from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.codec import encode_request
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.delegation.server import PolicyServer
from mqpolicy.policy.endpoints import Endpoint
from mqpolicy.policy.loader import parse_policy
from mqpolicy.store.batch_script import CLOCK_KEEP_S, RedisClock
from mqpolicy.store.budget import CounterStore, StoreError, budget_check
from mqpolicy.store.cluster import ClusterStore
from mqpolicy.store.redis import RedisStore
from tests.support.async_poll import poll_async
from tests.support.redis_fixture import RedisServer
from tests.support.redis_ha_fixture import RedisClusterHarness

T0 = 1_760_000_000_000
HOUR = 3_600_000
BUDGET = 100_000
# Deadlines generous enough that only the pause misses them on a loaded machine; the
# pause outlasts a deadline at least once over.
TIMEOUT_MS = 1500
PAUSE_S = 4.0


class Load:
    """Callers deciding one after the other while ``go`` is set: ``busy`` of them are
    waiting for an answer; ``admitted`` answers were admissions."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.go.set()
        self.stopped = False
        self.busy = 0
        self.admitted = 0

    async def turn(self) -> bool:
        """Wait for the next turn; False when the load is over."""
        await self.go.wait()
        return not self.stopped

    def stop(self) -> None:
        self.stopped = True
        self.go.set()


async def pause_under_load(pause: Callable[[], AbstractContextManager[None]],
                           load: Load) -> None:
    """Answers before; then, every caller between two decisions, Redis paused and the
    callers let go again: their decisions go to the stopped Redis, past the deadline
    (pausing between decisions leaves Redis no batch it has run and not yet answered:
    those the pause catches are all sent after it); then Redis resumed, answers after."""
    await poll_async(lambda: load.admitted >= 50, "answers before the pause", 60)
    load.go.clear()
    await poll_async(lambda: load.busy == 0, "every caller between two decisions", 60)
    with pause():
        load.go.set()
        await asyncio.sleep(PAUSE_S)
    after = load.admitted
    await poll_async(lambda: load.admitted >= after + 50, "answers after the pause", 60)


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP for the block, SIGCONT afterwards whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def spend_through_a_pause(store: CounterStore, pause: Callable[[], AbstractContextManager[None]],
                          ) -> tuple[Counter[str], Counter[str], dict[str, int]]:
    """32 callers, each on a bucket of its own, deciding one after the other through the
    pause; what each admitted, how many were refused, what each bucket spent."""
    async def go() -> tuple[Counter[str], Counter[str], dict[str, int]]:
        admitted: Counter[str] = Counter()
        answered: Counter[str] = Counter()
        load = Load()

        async def worker(n: int) -> None:
            key = f"sender{n}"
            check = budget_check(key, BUDGET, HOUR, BUDGET, 1)
            while await load.turn():
                load.busy += 1
                try:
                    evaluation = await store.evaluate([check], T0)
                except StoreError:
                    answered["refused"] += 1
                else:
                    assert evaluation.committed
                    admitted[key] += 1
                    load.admitted += 1
                finally:
                    load.busy -= 1

        try:
            await store.ping()
            workers = [asyncio.create_task(worker(n)) for n in range(32)]
            try:
                await pause_under_load(pause, load)
            finally:
                load.stop()
                await asyncio.gather(*workers)
            states = await store.inspect([f"sender{n}" for n in range(32)], T0)
            check = budget_check("x", BUDGET, HOUR, BUDGET, 1)
            spent = {f"sender{n}": BUDGET - (s.free_units(check.refill, check.unit,
                                                          check.burst, T0) if s else BUDGET)
                     for n, s in enumerate(states)}
            return admitted, answered, spent
        finally:
            await store.close()

    return asyncio.run(go())


def test_a_paused_redis_counts_no_decision_it_was_too_late_for(
        private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.unix_url, timeout_ms=TIMEOUT_MS)
    admitted, answered, spent = spend_through_a_pause(store, private_redis.paused)
    assert answered["refused"] >= 32  # the pause outlasted every waiting decision's deadline
    assert spent == {key: admitted[key] for key in spent}


def test_a_paused_cluster_master_counts_no_decision_it_was_too_late_for(
        redis_cluster_partial: RedisClusterHarness) -> None:
    """The same on a Redis Cluster, every key on the paused master (a hash-tagged prefix):
    each master's clock is its own."""
    prefix = "{mq}:"
    node = redis_cluster_partial.node_of_key(prefix + "sender0")
    store = ClusterStore(redis_cluster_partial.url, timeout_ms=TIMEOUT_MS, key_prefix=prefix)
    admitted, answered, spent = spend_through_a_pause(store, lambda: stopped(node.pid))
    assert answered["refused"] >= 32
    assert spent == {key: admitted[key] for key in spent}


POLICY = f"""\
store: {{timeout_ms: {TIMEOUT_MS}, on_store_error: defer}}
lanes: [{{name: normal}}]
default_lane: normal
limits:
  - {{name: per-sender, rate: {BUDGET}/1h, key: sender, count: messages}}
"""


def test_through_the_policy_server_refused_mail_spends_no_budget(
        private_redis: RedisServer) -> None:
    """32 connections, each a sender of its own sending message after message: during the
    pause they are answered 451 at the deadline; afterwards each sender's budget has
    spent exactly its DUNNO answers."""
    policy = parse_policy(POLICY)
    limit = policy.limits_by_name["per-sender"]

    async def go() -> tuple[dict[str, Counter[str]], dict[str, int]]:
        store = RedisStore(private_redis.unix_url, timeout_ms=TIMEOUT_MS)
        service = DecisionService(policy, store, clock_ms=lambda: T0)
        server = PolicyServer(PostfixPolicyHandler(service),
                              [Endpoint(host="127.0.0.1", port=0)], idle_timeout_s=60)
        answers: dict[str, Counter[str]] = {}
        load = Load()

        async def client(port: int, c: int) -> None:
            sender = f"sender{c}@example.com"
            got = answers[sender] = Counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            m = 0
            try:
                while await load.turn():
                    m += 1
                    load.busy += 1
                    writer.write(encode_request({
                        "request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
                        "sender": sender, "queue_id": f"Q{c:03d}M{m:06d}",
                        "recipient_count": "1", "size": "100"}))
                    await writer.drain()
                    line = await asyncio.wait_for(reader.readuntil(b"\n\n"), 60)
                    load.busy -= 1
                    action = line.decode()[len("action="):-2]
                    got[action.split(" ")[0]] += 1
                    if action == "DUNNO":
                        load.admitted += 1
            finally:
                writer.close()

        await server.start()
        try:
            port = server.bound_endpoints[0].port
            clients = [asyncio.create_task(client(port, c)) for c in range(32)]
            try:
                await pause_under_load(private_redis.paused, load)
            finally:
                load.stop()
                await asyncio.gather(*clients)
            senders = sorted(answers)
            states = await store.inspect([store_key(limit, s) for s in senders], T0)
            spent = {s: BUDGET - (st.free_units(limit.refill, limit.unit, limit.burst, T0)
                                  if st else BUDGET)
                     for s, st in zip(senders, states, strict=True)}
            return answers, spent
        finally:
            await server.drain()
            await store.close()

    answers, spent = asyncio.run(go())
    assert sum(a["451"] for a in answers.values()) >= 32
    assert {a for got in answers.values() for a in got} <= {"DUNNO", "451"}
    assert spent == {s: got["DUNNO"] for s, got in answers.items()}


# ------------------------------------------------------------------ the clock, alone


def test_a_deadline_in_redis_clock_is_never_later_than_the_real_one() -> None:
    """Redis' clock is 5,000 ms ahead of the loop's. Each reply's time was taken before
    the reply was read: the estimate falls short of the true offset by the reply's way
    back, and the best (highest) estimate is kept."""
    clock = RedisClock(client=None)
    assert clock.deadline_ms(10.0) == 0  # unknown: no deadline sent
    true_offset_ms = 5_000
    # script ran at loop time 1.000 s, reply read at 1.004 s
    clock.observe(1_000 + true_offset_ms, 1.004)
    assert clock.deadline_ms(2.0) == 2_000 + true_offset_ms - 4
    # a faster reply gives a better estimate; a slower one does not replace it
    clock.observe(2_000 + true_offset_ms, 2.001)
    clock.observe(3_000 + true_offset_ms, 3.050)
    assert clock.deadline_ms(4.0) == 4_000 + true_offset_ms - 1
    # an estimate kept longer than CLOCK_KEEP_S gives way to the next one
    later = 3.0 + CLOCK_KEEP_S + 1
    clock.observe(int(later * 1000) + true_offset_ms - 2_000, later + 0.002)  # stepped back
    assert clock.deadline_ms(later + 1) == int((later + 1) * 1000) + true_offset_ms - 2_002
