"""Every store outage logged: its start (``store unavailable ...``, with the error) and its
end (``store available again``, with how many decisions were answered per
``on_store_error`` during it and how long it lasted), however close together two outages
come; the errors inside one outage are counted, not logged."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from mqpolicy.daemon.outage_log import OutageLog
from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.request import Request
from mqpolicy.store.redis import RedisStore
from tests.support.redis_fixture import RedisServer

DOWN = "store unavailable, applying on_store_error"
STILL = "store still unavailable"
UP = "store available again"

POLICY = """\
store: {timeout_ms: 10000, on_store_error: accept}
limits:
  - {name: per-sender, rate: 1000/1h, key: sender}
"""


def store_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    return [(r.getMessage(), dict(getattr(r, "fields", {}))) for r in caplog.records
            if r.name == "mqpolicy.store"]


def test_two_outages_close_together_are_each_logged_with_their_counts(
        private_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Redis stopped, then started, twice. The old log suppressed every line within an
    interval of the first; here the interval is an hour, so only a line per outage can
    show the second one. Each outage's count is the decisions whose verdicts say they
    were made without the store."""
    caplog.set_level(logging.WARNING, logger="mqpolicy.store")
    sent = 0

    async def decide(service: DecisionService) -> bool:
        """One decision; True when it was answered per on_store_error."""
        nonlocal sent
        sent += 1
        verdict = await service.decide(Request(sender=f"s{sent}@example.com",
                                               recipient="r@example.net"))
        return verdict.store_error

    async def outage(service: DecisionService, failures: int) -> tuple[int, float]:
        """Redis down for ``failures`` decisions, then up again until one is answered by
        it: the decisions answered without it, and the outage's length seen from here."""
        started = time.monotonic()
        private_redis.stop()
        assert all([await decide(service) for _ in range(failures)])
        private_redis.start()
        answered_without = failures
        while await decide(service):  # it reconnects by itself; until then on_store_error
            answered_without += 1
        return answered_without, (time.monotonic() - started) * 1000

    async def go() -> list[tuple[int, float]]:
        store = RedisStore(private_redis.unix_url, timeout_ms=10_000)
        service = DecisionService(parse_policy(POLICY), store, error_log_interval_s=3600)
        try:
            assert not await decide(service)
            first = await outage(service, 3)
            assert not await decide(service)  # between the two: the store answers
            second = await outage(service, 5)
            return [first, second]
        finally:
            await store.close()

    outages = asyncio.run(go())
    lines = store_lines(caplog)
    assert [message for message, _ in lines] == [DOWN, UP, DOWN, UP]
    for (count, span_ms), (down, up) in zip(outages, [lines[0:2], lines[2:4]], strict=True):
        assert down[1]["error"]  # what failed, as the store said it
        assert up[1]["answered_on_store_error"] == count
        assert 0 <= up[1]["lasted_ms"] <= span_ms + 1


def test_paused_redis_outages_pair_up_and_count_every_decision_made_without_it(
        private_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Redis paused (SIGSTOP) twice: its decisions miss the deadline. A deadline can also
    be missed by a loaded machine while Redis runs, which is an outage too: so the lines
    are checked as pairs (each start followed by its end) whose counts add up to every
    decision answered per on_store_error."""
    caplog.set_level(logging.WARNING, logger="mqpolicy.store")
    made_without = 0
    sent = 0

    async def decide_many(service: DecisionService, n: int) -> list[bool]:
        nonlocal sent, made_without
        requests = [Request(sender=f"s{sent + i}@example.com", recipient="r@example.net")
                    for i in range(n)]
        sent += n
        verdicts = await asyncio.gather(*(service.decide(r) for r in requests))
        made_without += sum(v.store_error for v in verdicts)
        return [v.store_error for v in verdicts]

    async def go() -> None:
        store = RedisStore(private_redis.unix_url, timeout_ms=250)
        service = DecisionService(parse_policy(POLICY.replace("10000", "250")), store,
                                  error_log_interval_s=3600)
        try:
            while any(await decide_many(service, 1)):  # connected: answered by Redis
                pass
            for _ in range(2):
                with private_redis.paused():
                    assert all(await decide_many(service, 4))
                while any(await decide_many(service, 1)):  # until Redis answers again
                    pass
        finally:
            await store.close()

    asyncio.run(go())
    lines = store_lines(caplog)
    assert len(lines) >= 4 and len(lines) % 2 == 0
    assert [m for m, _ in lines[0::2]] == [DOWN] * (len(lines) // 2)
    assert [m for m, _ in lines[1::2]] == [UP] * (len(lines) // 2)
    assert sum(f["answered_on_store_error"] for _, f in lines[1::2]) == made_without >= 8


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def outage_log(caplog: pytest.LogCaptureFixture, clock: Clock) -> OutageLog:
    caplog.set_level(logging.WARNING, logger="mqpolicy.test")
    return OutageLog(logging.getLogger("mqpolicy.test"), down="down", still="still",
                     up="up", count_field="failures", reminder_s=60, clock=clock)


def test_an_outage_is_logged_at_its_start_reminded_while_it_lasts_and_at_its_end(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    outages = outage_log(caplog, clock)
    outages.succeeded()  # no outage: nothing to say
    outages.failed("refused")
    clock.now += 59.9
    outages.failed("refused")  # inside the outage, before the reminder: quiet
    clock.now += 0.1
    outages.failed("timed out")  # a minute in: reminded, with the count so far
    outages.failed("timed out")
    clock.now += 30.0
    outages.succeeded()
    outages.succeeded()  # over already
    outages.failed("refused again")  # a new outage at once: logged
    clock.now += 0.25
    outages.succeeded()
    lines = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records
             if r.name == "mqpolicy.test"]
    assert lines == [
        ("down", {"error": "refused"}),
        ("still", {"error": "timed out", "failures": 3, "lasted_ms": 60_000}),
        ("up", {"failures": 4, "lasted_ms": 90_000}),
        ("down", {"error": "refused again"}),
        ("up", {"failures": 1, "lasted_ms": 250}),
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
