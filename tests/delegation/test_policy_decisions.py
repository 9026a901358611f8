"""The policy server with the real decision service on both stores, over real sockets."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqpolicy.decision.service import DecisionService, wall_clock_ms
from mqpolicy.delegation.codec import encode_request
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.delegation.server import PolicyServer
from mqpolicy.policy.endpoints import Endpoint
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import Policy
from mqpolicy.policy.request import Request
from mqpolicy.store.budget import CounterStore
from mqpolicy.store.memory import MemoryStore
from mqpolicy.store.redis import RedisStore
from tests.support.lanes import RESETS_LANES
from tests.support.redis_fixture import RedisServer

POLICY = """\
store: {timeout_ms: 50, on_store_error: %(on_error)s}
""" + RESETS_LANES + """\
limits:
  - {name: per-sender, rate: 50/1h, key: sender, count: messages}
  - {name: per-client, rate: 100000/1h, key: client_network, count: recipients}
"""


# The store deadline of tests about what is decided, not how fast: only a broken store
# misses it, however loaded the machine (bench/ measures latency). The Redis store keeps
# its own deadline (the one it was opened with), so the store gets it too, not only the
# policy.
GENEROUS_MS = 10_000


def make_policy(on_error: str = "accept", timeout_ms: int = GENEROUS_MS) -> Policy:
    text = POLICY % {"on_error": on_error}
    return parse_policy(text.replace("timeout_ms: 50", f"timeout_ms: {timeout_ms}"))


StoreFactory = Callable[[], CounterStore]


@pytest.fixture(params=["memory", "redis"])
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    if request.param == "memory":
        return MemoryStore
    server: RedisServer = request.getfixturevalue("redis_clean")
    return lambda: RedisStore(server.unix_url, timeout_ms=GENEROUS_MS)


@asynccontextmanager
async def running(policy: Policy, store: CounterStore, clock_ms: Callable[[], int] = wall_clock_ms,
                  ) -> AsyncIterator[tuple[int, DecisionService]]:
    service = DecisionService(policy, store, clock_ms=clock_ms)
    server = PolicyServer(PostfixPolicyHandler(service), [Endpoint(host="127.0.0.1", port=0)],
                          idle_timeout_s=10)
    await server.start()
    try:
        yield server.bound_endpoints[0].port, service
    finally:
        await server.drain()
        await store.close()


async def ask(port: int, attrs: dict[str, str]) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(encode_request(attrs))
        await writer.drain()
        reply = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
        return reply.decode()[len("action="):-2]
    finally:
        writer.close()


def eom(i: int, sender: str = "flood@example.com") -> dict[str, str]:
    return {"request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
            "sender": sender, "client_address": "192.0.2.1", "queue_id": f"Q{i:05d}",
            "recipient_count": "1", "size": "1200"}


def store_failures(service: DecisionService) -> int:
    return service.stats.store_errors + service.stats.store_timeouts


async def answer_from_the_store(port: int, service: DecisionService, first: int,
                                timeout_s: float = 60) -> str:
    """Ask (a sender of its own each time: no budget runs out) until a decision is made on
    the store's answer, not on its failure; that decision's action. A store that is not yet
    connected, or reconnects, may miss its deadline however long it is: the test waits."""
    give_up = time.monotonic() + timeout_s
    i = first
    while True:
        failures = store_failures(service)
        answer = await ask(port, eom(i, f"probe{i}@example.com"))
        if store_failures(service) == failures:
            return answer
        assert time.monotonic() < give_up, f"no answer from the store within {timeout_s} s"
        await asyncio.sleep(0.05)  # between attempts
        i += 1


def test_200_concurrent_clients_budget_of_50_exactly_50_accepted(
        store_factory: StoreFactory) -> None:
    async def go() -> tuple[Counter[str], int]:
        async with running(make_policy(), store_factory()) as (port, service):
            replies = await asyncio.gather(*(ask(port, eom(i)) for i in range(200)))
            failures = service.stats.store_errors + service.stats.store_timeouts
        return Counter(r.split(" ", 1)[0] for r in replies), failures

    counts, failures = asyncio.run(go())
    assert failures == 0
    assert counts == {"DUNNO": 50, "450": 150}


def test_persistent_connection_many_decisions_in_order(store_factory: StoreFactory) -> None:
    async def go() -> list[str]:
        async with running(make_policy(), store_factory()) as (port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # one write holding 60 requests: answered one by one, in order
            writer.write(b"".join(encode_request(eom(i, f"s{i % 3}@x.example"))
                                  for i in range(60)))
            replies = [(await reader.readuntil(b"\n\n")).decode() for _ in range(60)]
            writer.close()
            return replies

    replies = asyncio.run(go())
    assert all(r == "action=DUNNO\n\n" for r in replies[:60])


def test_lane_filter_and_counting_through_the_wire(store_factory: StoreFactory) -> None:
    now = wall_clock_ms()  # time stands still: what is spent is exactly what the bucket says

    async def go() -> tuple[list[str], int]:
        async with running(make_policy(), store_factory(), lambda: now) as (port, service):
            rcpts = [await ask(port, {"protocol_state": "RCPT", "sender": "noreply@app.example",
                                      "recipient": f"u{i}@d.example", "instance": "i1",
                                      "client_address": "192.0.2.1"}) for i in range(10)]
            await ask(port, {**eom(1, "noreply@app.example"), "recipient_count": "10"})
            state = await service.store.inspect(["rl:per-client:100000/3600000/100000/v2:192.0.2.0/24"],
                                                service.clock_ms())
            assert state[0] is not None
            limit = service.policy.limits_by_name["per-client"]
            used = 100_000 - state[0].free_units(limit.refill, limit.unit, limit.burst,
                                                 service.clock_ms())
            return rcpts, used

    rcpts, used = asyncio.run(go())
    assert rcpts == ["FILTER mq-transactional:"] * 10
    assert used == 10  # 10 recipients spent once at END-OF-MESSAGE


@pytest.mark.parametrize(("on_error", "expected"), [
    ("accept", "DUNNO"),
    ("defer", "451 4.3.0 Policy store unavailable, try again later"),
])
def test_paused_redis_answers_within_deadline_then_recovers(
        private_redis: RedisServer, on_error: str, expected: str) -> None:
    """Redis stays paused until all 20 are answered: each answer came from the deadline
    (a store failure each), never from Redis."""
    async def go() -> tuple[list[str], int, str]:
        store = RedisStore(private_redis.unix_url, timeout_ms=50)
        async with running(make_policy(on_error, timeout_ms=50), store) as (port, service):
            assert await answer_from_the_store(port, service, 1000) == "DUNNO"
            private_redis.pause()
            try:
                failures = store_failures(service)
                during = await asyncio.gather(*(ask(port, eom(i)) for i in range(1, 21)))
                failed = store_failures(service) - failures
            finally:
                private_redis.resume()
            after = await answer_from_the_store(port, service, 2000)  # recovers by itself
            return during, failed, after

    during, failed, after = asyncio.run(go())
    assert set(during) == {expected}
    assert failed == 20
    assert after == "DUNNO"


def test_stopped_redis_follows_on_store_error_and_recovers_after_restart(
        private_redis: RedisServer) -> None:
    async def go() -> tuple[str, str]:
        store = RedisStore(private_redis.unix_url, timeout_ms=50)
        async with running(make_policy("defer", timeout_ms=50), store) as (port, service):
            assert await answer_from_the_store(port, service, 1000) == "DUNNO"
            private_redis.stop()
            down = await ask(port, eom(1))
            private_redis.start()
            up = await answer_from_the_store(port, service, 2000)
            return down, up

    down, up = asyncio.run(go())
    assert down.startswith("451 4.3.0")
    assert up == "DUNNO"


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                       blacklist_characters="\n\r"), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attrs=st.dictionaries(
    st.sampled_from(["protocol_state", "sender", "recipient", "client_address", "size",
                     "recipient_count", "queue_id", "instance", "sasl_username", "helo_name",
                     "client_name"]),
    _text, max_size=11))
def test_engine_never_raises_on_any_attribute_values(attrs: dict[str, str]) -> None:
    """Whatever Postfix (or an attacker on the socket) sends, a verdict comes back."""
    policy = make_policy()
    service = DecisionService(policy, MemoryStore())
    verdict = asyncio.run(service.decide(Request.from_policy_attributes(attrs)))
    assert verdict.lane.name in {"transactional", "normal"}
