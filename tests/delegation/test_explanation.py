"""What ``explain`` says, made by a decision service on the memory store with a fixed clock:
the same whether printed where it was made or carried as JSON (the admin socket), and
neither counted nor logged as a decision."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from mqpolicy.delegation.explanation import Explanation, explain, render_explanation
from mqpolicy.policy.request import Request
from tests.support.decision_service import service

LIMITS = """\
- {name: fast-budget, rate: 1/1h, key: sender, action: {demote: bulk}}
- {name: watch, rate: 1/1h, key: client_address, action: reject, monitor: true}
- {name: per-user, rate: 10/1h, key: sasl_username}
- {name: per-rcpt, rate: 5/1m, key: recipient, count: recipients, action: hold}
"""


def eom(queue_id: str) -> Request:
    return Request.from_policy_attributes({
        "protocol_state": "END-OF-MESSAGE", "sender": "a@example.com",
        "client_address": "192.0.2.1", "queue_id": queue_id, "recipient_count": "2"})


def test_an_explanation_sent_as_json_prints_the_same(caplog: pytest.LogCaptureFixture) -> None:
    svc, _ = service(LIMITS)
    asyncio.run(svc.decide(eom("Q1")))  # spends fast-budget and watch
    with caplog.at_level(logging.DEBUG, logger="mqpolicy.decision"):
        made = asyncio.run(explain(svc, eom("Q2"), consume=False))
    assert [r for r in caplog.records if r.getMessage() == "decision"] == []
    assert sum(svc.stats.decisions.values()) == 1  # the explained one is not counted

    text = render_explanation(made)
    assert "         demoted to bulk" in text
    assert "watch" in text and "-> would reject" in text
    assert "per-user                 request has no sasl_username" in text
    assert "per-rcpt                 recipient-keyed: spent per recipient at RCPT" in text
    received = Explanation.from_json(json.loads(json.dumps(made.as_json())))
    assert received == made
    assert render_explanation(received) == text

    noted = Explanation.from_json({**made.as_json(), "note": "full budgets"})
    assert render_explanation(noted).splitlines()[6] == "note:    full budgets"
    with pytest.raises(KeyError):
        Explanation.from_json({k: v for k, v in made.as_json().items() if k != "lane"})
