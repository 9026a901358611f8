"""One bad decision never fails its batch: the Redis store sends the decisions made together
in one script call, and a decision that cannot be sent (a key that is not text) or that
the script cannot run (its bucket key holds another type: WRONGTYPE) fails alone. Its
limits follow their ``on_store_error``; every other decision of the batch gets the answer
it would have had without it, and the budgets hold exactly what those spent."""

from __future__ import annotations

import asyncio

import pytest

from mqpolicy.decision.engine import store_key
from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.codec import encode_request
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.delegation.server import PolicyServer
from mqpolicy.policy.endpoints import Endpoint
from mqpolicy.policy.loader import parse_policy
from mqpolicy.store.batch_script import PendingDecision
from mqpolicy.store.budget import Evaluation, StoreError, budget_check
from mqpolicy.store.hold_records import HoldRecord, RedisHoldRecords
from mqpolicy.store.redis import RedisStore
from tests.support.redis_fixture import RedisServer

T0 = 1_760_000_000_000
HOUR = 3_600_000


def test_a_key_of_another_type_fails_its_decision_alone(redis_clean: RedisServer) -> None:
    """Nine decisions in one batch; the fifth one's bucket key holds a hash. Before, the
    script stopped at it: all nine failed, and the four before it had been spent anyway
    (Redis keeps a script's writes up to its error)."""
    with redis_clean.client() as client:
        client.hset("mqpolicy:poisoned", "x", "1")

    async def go() -> tuple[list[object], int, list[object]]:
        store = RedisStore(redis_clean.unix_url, timeout_ms=10_000)
        try:
            keys = [f"good{i}" for i in range(4)] + ["poisoned"] + [
                f"good{i}" for i in range(4, 8)]
            got = await asyncio.gather(
                *(store.evaluate([budget_check(k, 10, HOUR, 10, 1)], T0, once_key=f"seen:{k}")
                  for k in keys),
                return_exceptions=True)
            states = await store.inspect([f"good{i}" for i in range(8)], T0)
            return list(got), store.batches_sent, list(states)
        finally:
            await store.close()

    got, batches, states = asyncio.run(go())
    assert batches == 1
    assert isinstance(got[4], StoreError) and "WRONGTYPE" in str(got[4])
    good = [g for i, g in enumerate(got) if i != 4]
    assert all(isinstance(g, Evaluation) and g.committed for g in good), good
    assert [g.results[0].remaining for g in good if isinstance(g, Evaluation)] == [9] * 8
    assert all(s is not None for s in states)  # each good bucket spent once
    with redis_clean.client() as client:
        assert client.type("mqpolicy:poisoned") == b"hash"  # untouched
        assert not client.exists("mqpolicy:seen:poisoned")  # the failed one wrote nothing
        assert client.exists("mqpolicy:seen:good0") and client.exists("mqpolicy:seen:good7")


def test_a_key_that_cannot_be_sent_is_a_store_error_of_its_caller(
        redis_clean: RedisServer) -> None:
    """A key that is not text (bytes, a lone surrogate) fails its caller with a StoreError
    (so its limits follow on_store_error), and the decisions beside it are answered."""
    async def go() -> tuple[list[object], int]:
        store = RedisStore(redis_clean.unix_url, timeout_ms=10_000)
        good = budget_check("k", 10, 1000, 10, 1)
        try:
            got = await asyncio.gather(
                store.evaluate([good], T0),
                store.evaluate([good._replace(key=b"raw\xff")], T0),  # type: ignore[arg-type]
                store.evaluate([good], T0, once_key="seen:\udcff"),
                store.evaluate([good], T0),
                return_exceptions=True)
            return list(got), store.batches_sent
        finally:
            await store.close()

    got, batches = asyncio.run(go())
    assert isinstance(got[1], StoreError) and isinstance(got[2], StoreError)
    assert [g.results[0].remaining for g in (got[0], got[3])  # type: ignore[union-attr]
            ] == [9, 8]
    assert batches == 1


def test_a_batch_that_cannot_be_packed_sends_the_decisions_that_can(
        redis_clean: RedisServer) -> None:
    """The batch runner's own guard, behind the callers' validation: a decision in a batch
    that the packer refuses fails alone, the others are sent in one call."""
    async def go() -> tuple[list[object], int]:
        store = RedisStore(redis_clean.unix_url, timeout_ms=10_000)
        loop = asyncio.get_running_loop()
        check = budget_check("k", 10, HOUR, 10, 1)

        def pending(once_key: object) -> PendingDecision:
            return PendingDecision([check], T0, once_key, HOUR,  # type: ignore[arg-type]
                                   loop.create_future())
        try:
            await store.ping()
            got = await store._run([pending("seen:a"), pending(object()), pending("seen:b")])
            return list(got), (await store.inspect(["k"], T0))[0].debt  # type: ignore[union-attr]
        finally:
            await store.close()

    got, debt = asyncio.run(go())
    assert isinstance(got[1], StoreError) and "cannot be sent" in str(got[1])
    assert [g.results[0].remaining for g in (got[0], got[2])  # type: ignore[union-attr]
            ] == [9, 8]
    assert debt > 0


POLICY = """\
store: {timeout_ms: 10000, on_store_error: defer}
lanes: [{name: normal}]
default_lane: normal
limits:
  - {name: per-sender, rate: 5/1h, key: sender, count: messages}
"""


def test_one_poisoned_sender_among_concurrent_clients_through_the_policy_server(
        redis_clean: RedisServer) -> None:
    """Forty clients at once, each sending 7 messages (budget 5) from a sender of its own;
    one sender's bucket key holds a hash. That sender's messages follow on_store_error
    (451), every other client gets exactly 5 accepted then 2 deferred, and their budgets
    hold exactly 5 spent each."""
    policy = parse_policy(POLICY)
    poisoned = "sender3@example.com"
    limit = policy.limits_by_name["per-sender"]
    with redis_clean.client() as client:
        client.hset(f"mqpolicy:{store_key(limit, poisoned)}", "x", "1")

    async def client_run(port: int, c: int) -> list[str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        try:
            for m in range(7):
                writer.write(encode_request({
                    "request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
                    "sender": f"sender{c}@example.com", "queue_id": f"Q{c:03d}M{m}",
                    "recipient_count": "1", "size": "100", "instance": f"i{c}.{m}"}))
                await writer.drain()
                line = await asyncio.wait_for(reader.readuntil(b"\n\n"), 30)
                answers.append(line.decode()[len("action="):-2])
        finally:
            writer.close()
        return answers

    async def go() -> tuple[list[list[str]], int, list[int]]:
        store = RedisStore(redis_clean.unix_url, timeout_ms=10_000)
        service = DecisionService(policy, store, clock_ms=lambda: T0)
        server = PolicyServer(PostfixPolicyHandler(service),
                              [Endpoint(host="127.0.0.1", port=0)], idle_timeout_s=30)
        await server.start()
        try:
            port = server.bound_endpoints[0].port
            answers = await asyncio.gather(*(client_run(port, c) for c in range(40)))
            states = await store.inspect(
                [store_key(limit, f"sender{c}@example.com") for c in range(40) if c != 3], T0)
            free = [s.free_units(limit.refill, limit.unit, limit.burst, T0) if s else -1
                    for s in states]
            return list(answers), store.batches_sent, free
        finally:
            await server.drain()
            await store.close()

    answers, batches, free = asyncio.run(go())
    assert batches < 40 * 7  # decisions did share batches with the poisoned ones
    assert all(a.startswith("451 4.3.0") for a in answers[3]), answers[3]
    for c, got in enumerate(answers):
        if c == 3:
            continue
        assert got[:5] == ["DUNNO"] * 5, (c, got)
        assert all(a.startswith("450 4.7.1") for a in got[5:]), (c, got)
    assert free == [0] * 39


def test_a_hold_record_of_a_queue_id_that_is_not_utf8_is_a_store_error(
        redis_clean: RedisServer) -> None:
    """The hold record of such a message cannot be written: a StoreError (the handler
    answers 451 and logs it), not an exception out of the store."""
    odd = b"4Xq\xff1".decode("utf-8", "surrogateescape")

    async def go() -> None:
        records = RedisHoldRecords(redis_clean.unix_url, timeout_ms=5000)
        try:
            with pytest.raises(StoreError, match="queue id"):
                await records.put(HoldRecord(queue_id=odd, lane="bulk", not_before_ms=T0,
                                             created_ms=T0, reason="r"))
            await records.put(HoldRecord(queue_id="Q1", lane="bulk", not_before_ms=T0,
                                         created_ms=T0, reason="r"))
            assert await records.get("Q1") is not None
        finally:
            await records.close()

    asyncio.run(go())
