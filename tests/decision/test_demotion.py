"""A message demoted to a lane meets that lane's limits in the same atomic decision, and
counts in it, not in its first lane (issue 16, contract rule 6), on both stores."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from mqpolicy.decision.engine import Action, Verdict
from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.request import Request
from mqpolicy.store.budget import CounterStore
from tests.support.decision_service import Clock

POLICY = """\
lanes:
  - name: normal
  - name: bulk
    transport: mq-bulk
default_lane: normal
limits:
  - name: per-sender
    rate: 2/1h
    key: sender
    lanes: [normal, bulk]
    action: {demote: bulk}
  - name: per-domain-bulk
    rate: 3/1h
    key: recipient_domain
    count: recipients
    lanes: [bulk]
    action: hold
  - name: normal-only
    rate: 100/1h
    key: sender
    lanes: [normal]
"""

_QUEUE_IDS = itertools.count(1)


def eom(recipient: str) -> Request:
    return Request(stage="END-OF-MESSAGE", sender="a@example.com", recipient=recipient,
                   recipients=(recipient,), recipient_count=1, size=100,
                   queue_id=f"D{next(_QUEUE_IDS)}", headers=())


def outcome(verdict: Verdict, name: str) -> tuple[bool, int]:
    [found] = [o for o in verdict.limits if o.name == name]
    return found.spent, found.cost


def test_demoted_mail_meets_the_target_lanes_limits(
        each_store: Callable[[], CounterStore]) -> None:
    async def go() -> None:
        store = each_store()
        try:
            service = DecisionService(parse_policy(POLICY), store, clock_ms=Clock())
            verdicts = [await service.decide(eom(f"r{i}@d.example")) for i in range(6)]
        finally:
            await store.close()
        assert [(v.action, v.lane.name) for v in verdicts] == [
            (Action.ACCEPT, "normal"), (Action.ACCEPT, "normal"),
            (Action.ACCEPT, "bulk"), (Action.ACCEPT, "bulk"), (Action.ACCEPT, "bulk"),
            (Action.HOLD, "bulk")]
        assert verdicts[5].deciding == "per-domain-bulk"
        # the first two count in normal, not in bulk; the demoted ones the other way
        assert outcome(verdicts[0], "normal-only") == (True, 1)
        assert outcome(verdicts[0], "per-domain-bulk") == (False, 0)
        assert outcome(verdicts[2], "normal-only") == (False, 0)
        assert outcome(verdicts[2], "per-domain-bulk") == (True, 1)
    asyncio.run(go())


def test_a_held_demoted_message_spends_nothing(
        each_store: Callable[[], CounterStore]) -> None:
    async def go() -> None:
        store = each_store()
        try:
            service = DecisionService(parse_policy(POLICY), store, clock_ms=Clock())
            for i in range(5):
                await service.decide(eom(f"r{i}@d.example"))
            held = await service.decide(eom("x@d.example"))
            other = await service.decide(eom("y@e.example"))  # another domain: room
        finally:
            await store.close()
        assert held.action is Action.HOLD
        assert outcome(held, "normal-only") == (False, 0)
        assert (other.action, other.lane.name) == (Action.ACCEPT, "bulk")
    asyncio.run(go())
