"""Recipient-keyed limits that are lane-scoped are spent at the end of the message, one
unit per recipient, in the lane the message leaves in (issue 16, contract rule 1), by the
policy server alone (wiring P: at END-OF-MESSAGE, with the recipients it accepted)."""

from __future__ import annotations

import asyncio
import itertools

from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.policy.loader import parse_policy
from mqpolicy.store.memory import MemoryStore
from tests.support.decision_service import BASE, Clock

POLICY = BASE + """\
limits:
  - name: bulk-per-domain
    rate: 3/1h
    key: recipient_domain
    count: recipients
    lanes: [bulk]
"""

_INSTANCES = itertools.count(1)


def message(handler: PostfixPolicyHandler, sender: str, recipients: list[str]) -> list[str]:
    async def go() -> list[str]:
        n = next(_INSTANCES)
        common = {"request": "smtpd_access_policy", "sender": sender,
                  "instance": f"c3d4.{n}", "client_address": "192.0.2.10"}
        answers = [await handler.handle({**common, "protocol_state": "RCPT", "recipient": r,
                                         "queue_id": f"E{n}" if i else ""})
                   for i, r in enumerate(recipients)]
        answers.append(await handler.handle(
            {**common, "protocol_state": "END-OF-MESSAGE", "queue_id": f"E{n}",
             "recipient_count": str(len(recipients))}))
        return answers
    return asyncio.run(go())


def test_lane_scoped_recipient_limit_is_spent_per_recipient_at_the_end() -> None:
    service = DecisionService(parse_policy(POLICY), MemoryStore(), clock_ms=Clock())
    handler = PostfixPolicyHandler(service)
    bulk, FILTER = "x@mail.news.example", "FILTER mq-bulk:"
    # normal-lane mail to the domain: not this limit's
    assert message(handler, "a@example.com", [f"n{i}@d.example" for i in range(5)]) == [
        "DUNNO"] * 6
    assert message(handler, bulk, ["1@d.example", "2@d.example"]) == [FILTER] * 3
    answers = message(handler, bulk, ["3@d.example", "4@d.example"])
    assert answers[:2] == [FILTER, FILTER]  # not spent at RCPT
    assert answers[2].startswith("450 4.7.1 Rate limit bulk-per-domain reached for d.example")
    assert message(handler, bulk, ["5@d.example"]) == [FILTER] * 2  # the last of 3


def test_recipients_of_unfinished_messages_are_bounded() -> None:
    service = DecisionService(parse_policy(POLICY), MemoryStore(), clock_ms=Clock())
    handler = PostfixPolicyHandler(service, max_pending=2)

    async def go() -> None:
        for n in range(5):  # five transactions that never reach END-OF-MESSAGE
            for i in range(3):
                await handler.handle({"request": "smtpd_access_policy",
                                      "protocol_state": "RCPT", "sender": "a@example.com",
                                      "recipient": f"{i}@d.example", "instance": f"u.{n}"})
        assert handler.remembered_recipients == 6  # the last two, 3 each
        await handler.handle({"request": "smtpd_access_policy",
                              "protocol_state": "END-OF-MESSAGE", "sender": "a@example.com",
                              "instance": "u.4", "queue_id": "U4", "recipient_count": "3"})
        assert handler.remembered_recipients == 3
    asyncio.run(go())
