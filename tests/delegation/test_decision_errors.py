"""An exception inside the real decision path (a store whose evaluation raises something that
is no store error, a condition that raises) is answered ``DEFER_IF_PERMIT 4.3.0 policy
service error`` over the policy protocol socket, and the server goes on answering: the same
connection's next request and other clients'. The policy server, the Postfix handler, the
decision service and the engine are the real ones; only the bug is planted."""

from __future__ import annotations

import dataclasses

import pytest

from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.delegation.server import PolicyServer
from mqpolicy.policy.conditions import Predicate
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import Policy
from mqpolicy.policy.request import Request
from mqpolicy.store.budget import CounterStore
from mqpolicy.store.memory import MemoryStore
from tests.support.bounded_run import run
from tests.support.lanes import RESETS_LANES
from tests.support.planted_bugs import (
    MemoryStoreWithABug,
    PolicyBug,
    RedisStoreWithABug,
)
from tests.support.policy_client import Client, serving
from tests.support.redis_fixture import RedisServer

SERVICE_ERROR = "DEFER_IF_PERMIT 4.3.0 policy service error"

POLICY = "store: {timeout_ms: 10000}\n" + RESETS_LANES + """\
limits:
  - {name: per-sender, rate: 2/1h, key: sender, count: messages}
"""


def eom(sender: str, n: int) -> dict[str, str]:
    return {"protocol_state": "END-OF-MESSAGE", "sender": sender, "recipient_count": "1",
            "client_address": "192.0.2.5", "queue_id": f"Q{sender[0]}{n}"}


async def answers(service: DecisionService) -> tuple[list[str], list[str], PolicyServer]:
    """Over one connection: a good request, the bug, good ones (the budget of 2 spent and
    then refused: the decisions after the bug are real ones); over a second connection
    opened afterwards, the bug, then a good one."""
    async with serving(PostfixPolicyHandler(service), idle_timeout_s=30) as server:
        endpoint = server.bound_endpoints[0]
        first = await Client.to(endpoint)
        one = [await first.ask(**eom("ok@example.com", 1)),
               await first.ask(**eom("bug@example.com", 1)),
               await first.ask(**eom("ok@example.com", 2)),
               await first.ask(**eom("ok@example.com", 3))]
        second = await Client.to(endpoint)
        two = [await second.ask(**eom("bug@example.com", 2)),
               await second.ask(**eom("other@example.com", 1))]
        first.close()
        second.close()
        return one, two, server


def assert_answered_and_going_on(service: DecisionService) -> None:
    found: dict[str, object] = {}

    async def go() -> None:
        found["one"], found["two"], server = await answers(service)
        found["errors"] = server.counters.handler_errors
        await service.store.close()

    run(go())
    one = found["one"]
    assert isinstance(one, list)
    assert one[:3] == ["DUNNO", SERVICE_ERROR, "DUNNO"]
    assert one[3].startswith("450 4.7.1 Rate limit per-sender ")  # 2 spent: refused
    assert found["two"] == [SERVICE_ERROR, "DUNNO"]
    assert found["errors"] == 2
    # a bug is not a store failure: on_store_error is not what answered it
    assert service.stats.store_errors == service.stats.store_timeouts == 0


def test_a_store_bug_on_the_loop_thread_is_answered_and_the_server_goes_on() -> None:
    assert_answered_and_going_on(DecisionService(parse_policy(POLICY), MemoryStoreWithABug()))


def test_a_store_bug_in_an_awaited_evaluation_is_answered_and_the_server_goes_on(
        redis_clean: RedisServer) -> None:
    store: CounterStore = RedisStoreWithABug(redis_clean.unix_url, timeout_ms=10_000)
    assert_answered_and_going_on(DecisionService(parse_policy(POLICY), store))


def raising(original: Predicate | None) -> Predicate:
    def when(request: Request) -> bool:
        if request.sender.startswith("bug@"):
            raise PolicyBug("a bug in a condition")
        return True if original is None else original(request)
    return when


def with_a_raising_condition(policy: Policy, where: str) -> Policy:
    if where == "classify":
        rules = tuple(dataclasses.replace(rule, when=raising(rule.when))
                      for rule in policy.classify)
        return dataclasses.replace(policy, classify=rules)
    limits = tuple(dataclasses.replace(limit, when=raising(limit.when))
                   for limit in policy.limits)
    return dataclasses.replace(policy, limits=limits)


@pytest.mark.parametrize("where", ["classify", "limit"])
def test_a_condition_that_raises_is_answered_and_the_server_goes_on(where: str) -> None:
    policy = with_a_raising_condition(parse_policy(POLICY), where)
    assert_answered_and_going_on(DecisionService(policy, MemoryStore()))
