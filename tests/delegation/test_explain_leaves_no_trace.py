"""``explain`` without ``--consume`` leaves no trace (issue 16, contract rule 9): no budget
spent and no once key, so the message it looked at is counted when it really comes."""

from __future__ import annotations

import asyncio

from mqpolicy.decision.engine import Action
from mqpolicy.delegation.explanation import explain
from mqpolicy.policy.request import Request
from mqpolicy.store.memory import MemoryStore
from tests.support.decision_service import service


def eom(queue_id: str) -> Request:
    return Request.from_policy_attributes({
        "protocol_state": "END-OF-MESSAGE", "sender": "a@example.com",
        "client_address": "192.0.2.1", "queue_id": queue_id, "recipient_count": "2"})


def test_explain_spends_nothing_and_writes_no_once_key() -> None:
    svc, _ = service("- {name: per-sender, rate: 2/1h, key: sender, count: recipients}\n")
    assert isinstance(svc.store, MemoryStore)
    for _ in range(3):
        asyncio.run(explain(svc, eom("Q1"), consume=False))
    assert asyncio.run(svc.store.scan("*")) == []  # no bucket, no once key
    verdict = asyncio.run(svc.decide(eom("Q1")))  # the message itself, counted
    assert verdict.action is Action.ACCEPT and not verdict.duplicate
    assert verdict.limits[0].spent
    assert asyncio.run(svc.decide(eom("Q2"))).action is Action.DEFER  # 2 of 2 spent
