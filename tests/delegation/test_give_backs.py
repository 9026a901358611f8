"""Refused mail costs nothing (issue 16, contract rule 5), through the policy server alone
(wiring P) on the memory store and on Redis: a message refused or held at END-OF-MESSAGE
gets back the recipient budgets its RCPT decisions spent, found by Postfix's ``instance``."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.policy.loader import parse_policy
from mqpolicy.store.budget import CounterStore
from tests.support.decision_service import BASE, Clock

LIMITS = BASE + """\
limits:
  - name: per-domain
    rate: 5/1h
    key: recipient_domain
  - name: bytes-per-sender
    rate: 10000/1h
    key: sender
    count: bytes
  - name: one-big-message
    rate: 1/1h
    key: sender
    when: {recipient_count: {min: 3}}
    action: hold
"""

_INSTANCES = itertools.count(1)


class Postfix:
    """Postfix's requests for one message: one RCPT each, then END-OF-MESSAGE (the size
    known there only: the client gave no SIZE= at MAIL FROM)."""

    def __init__(self, handler: PostfixPolicyHandler) -> None:
        self.handler = handler

    async def message(self, recipients: list[str], size: int = 100,
                      sender: str = "a@example.com") -> list[str]:
        n = next(_INSTANCES)
        common = {"request": "smtpd_access_policy", "sender": sender,
                  "instance": f"a1b2.{n}", "client_address": "192.0.2.10"}
        answers = []
        accepted = 0
        for i, rcpt in enumerate(recipients):
            answer = await self.handler.handle({**common, "protocol_state": "RCPT",
                                                "recipient": rcpt,
                                                "queue_id": f"Q{n}" if i else ""})
            answers.append(answer)
            accepted += answer == "DUNNO"
        if accepted:
            answers.append(await self.handler.handle(
                {**common, "protocol_state": "END-OF-MESSAGE", "queue_id": f"Q{n}",
                 "recipient_count": str(accepted), "size": str(size)}))
        return answers


def scenario(make_store: Callable[[], CounterStore], body: Callable[[Postfix], object]) -> None:
    async def go() -> None:
        store = make_store()
        try:
            service = DecisionService(parse_policy(LIMITS), store, clock_ms=Clock())
            await body(Postfix(PostfixPolicyHandler(service)))  # type: ignore[misc]
        finally:
            await store.close()
    asyncio.run(go())


def test_a_message_rejected_at_the_end_gives_its_rcpt_spends_back(
        each_store: Callable[[], CounterStore]) -> None:
    async def body(postfix: Postfix) -> None:
        # 2 recipients spend 2 of the domain's 5 at RCPT; the message never fits the
        # bytes budget: rejected at END-OF-MESSAGE
        answers = await postfix.message(["1@d.example", "2@d.example"], size=20000)
        assert answers[:2] == ["DUNNO", "DUNNO"]
        assert answers[2].startswith("550 5.7.1 message exceeds limit bytes-per-sender")
        # the domain's budget is whole again: 5 messages, then the 6th is deferred
        for i in range(5):
            assert await postfix.message([f"r{i}@d.example"]) == ["DUNNO", "DUNNO"]
        [refused] = await postfix.message(["late@d.example"])
        assert refused.startswith("450 4.7.1 ")
    scenario(each_store, body)


def test_a_message_deferred_at_the_end_gives_its_rcpt_spends_back(
        each_store: Callable[[], CounterStore]) -> None:
    async def body(postfix: Postfix) -> None:
        assert (await postfix.message(["1@d.example"], size=9000))[-1] == "DUNNO"
        answers = await postfix.message(["2@d.example", "3@d.example"], size=5000)
        assert answers[-1].startswith("450 4.7.1 Rate limit bytes-per-sender")
        for i in range(4):  # 5 - the first message's 1
            assert await postfix.message([f"r{i}@d.example"]) == ["DUNNO", "DUNNO"]
        [refused] = await postfix.message(["late@d.example"])
        assert refused.startswith("450 4.7.1 ")
    scenario(each_store, body)


def test_a_message_held_at_the_end_gives_its_rcpt_spends_back(
        each_store: Callable[[], CounterStore]) -> None:
    """Held mail is spent when the scheduler releases it: not twice."""
    async def body(postfix: Postfix) -> None:
        three = ["1@d.example", "2@d.example", "3@d.example"]
        assert (await postfix.message(three))[-1] == "DUNNO"  # spends 3 of 5
        held = await postfix.message(["1@e.example", "2@e.example", "3@e.example"])
        assert held[-1].startswith("HOLD ")
        for i in range(5):  # e.example's budget is whole
            assert await postfix.message([f"r{i}@e.example"]) == ["DUNNO", "DUNNO"]
        [refused] = await postfix.message(["late@e.example"])
        assert refused.startswith("450 4.7.1 ")
    scenario(each_store, body)


def test_an_accepted_message_keeps_its_rcpt_spends(
        each_store: Callable[[], CounterStore]) -> None:
    async def body(postfix: Postfix) -> None:
        answers = await postfix.message(["1@d.example", "2@d.example"])
        assert answers == ["DUNNO", "DUNNO", "DUNNO"]
        for i in range(3):
            assert await postfix.message([f"r{i}@d.example"]) == ["DUNNO", "DUNNO"]
        [refused] = await postfix.message(["late@d.example"])
        assert refused.startswith("450 4.7.1 ")
    scenario(each_store, body)
