"""The milter's side of an exception inside the real decision path: a store whose evaluation
raises something that is no store error, or a condition that raises, makes the step follow
``milter.on_error`` (``tempfail``: 451 4.3.0; ``accept``: the message goes on), and the
next message of the same connection is decided as usual. The gateway, the decision service
and the engine are the real ones; only the bug is planted."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import Milter
import pytest

from mqpolicy.decision.service import DecisionService
from mqpolicy.milter.gateway import DecisionGateway
from mqpolicy.policy.conditions import Predicate
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import ErrorAction, MilterSettings, Policy
from mqpolicy.policy.request import Request
from mqpolicy.store.budget import CounterStore
from mqpolicy.store.memory import MemoryStore
from tests.support.lanes import LANES
from tests.support.milter_session import Loop, Session
from tests.support.planted_bugs import (
    MemoryStoreWithABug,
    PolicyBug,
    RedisStoreWithABug,
)
from tests.support.redis_fixture import RedisServer

POLICY = LANES + """\
classify:
  - {name: lists, when: {bulk_signals: true}, lane: bulk}
limits:
  - {name: per-sender, rate: 2/1h, key: sender, count: messages}
"""


def raising(original: Predicate | None) -> Predicate:
    def when(request: Request) -> bool:
        if request.sender.startswith("bug@"):
            raise PolicyBug("a bug in a condition")
        return True if original is None else original(request)
    return when


def condition_bug(where: str) -> Callable[[Policy], Policy]:
    def plant(policy: Policy) -> Policy:
        if where == "classify":
            return dataclasses.replace(policy, classify=tuple(
                dataclasses.replace(rule, when=raising(rule.when)) for rule in policy.classify))
        return dataclasses.replace(policy, limits=tuple(
            dataclasses.replace(limit, when=raising(limit.when)) for limit in policy.limits))
    return plant


def unchanged(policy: Policy) -> Policy:
    return policy


@pytest.fixture(params=["store-on-the-milter-thread", "store-on-the-loop",
                        "classify-condition", "limit-condition"])
def bug(request: pytest.FixtureRequest) -> Iterator[tuple[CounterStore, Callable[[Policy], Policy]]]:
    if request.param == "store-on-the-milter-thread":
        yield MemoryStoreWithABug(), unchanged
    elif request.param == "store-on-the-loop":
        server: RedisServer = request.getfixturevalue("redis_clean")
        yield RedisStoreWithABug(server.unix_url, timeout_ms=10_000), unchanged
    else:
        yield MemoryStore(), condition_bug(request.param.split("-")[0])


@pytest.mark.parametrize("on_error", [ErrorAction.TEMPFAIL, ErrorAction.ACCEPT])
def test_a_bug_in_the_decision_follows_on_error_and_the_next_message_is_decided(
        loop: Loop, bug: tuple[CounterStore, Callable[[Policy], Policy]],
        on_error: ErrorAction) -> None:
    store, plant = bug
    service = DecisionService(plant(parse_policy(POLICY)), store)
    s = Session(DecisionGateway(service, loop.loop, MilterSettings(on_error=on_error)))
    try:
        s.connect()
        assert s.message("ok@example.com", ["r@example.net"], queue_id="Q1") == Milter.CONTINUE
        replies = len(s.ctx.replies)
        rc = s.message("bug@example.com", ["r@example.net"], queue_id="Q2")
        if on_error is ErrorAction.TEMPFAIL:
            assert rc == Milter.TEMPFAIL
            assert s.ctx.replies[-1] == ("451", "4.3.0", "Policy service error, try again later")
        else:
            assert rc == Milter.CONTINUE
            assert len(s.ctx.replies) == replies  # no refusal text
        # the same connection goes on, decided with the store: the budget of 2 is
        # spent by the second good message and refuses the third
        assert s.message("ok@example.com", ["r@example.net"], queue_id="Q3") == Milter.CONTINUE
        assert s.message("ok@example.com", ["r@example.net"], queue_id="Q4") == Milter.TEMPFAIL
        assert s.ctx.replies[-1][:2] == ("451", "4.7.1")
        assert s.milter.gateway.counters.failures >= 1
        assert s.milter.gateway.counters.timeouts == 0
    finally:
        loop.run(store.close())
