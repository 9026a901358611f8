"""The counting contract (issue 16) as the milter keeps it, through pymilter's test context
with the decision service on a real asyncio loop in a thread of its own."""

from __future__ import annotations

import logging
import textwrap

import Milter
import Milter.test  # makes @noreply callbacks answer CONTINUE under test
import pytest

from mqpolicy.decision.service import DecisionService
from mqpolicy.milter.gateway import DecisionGateway
from mqpolicy.policy.loader import parse_policy
from mqpolicy.store.memory import MemoryStore
from tests.support.lanes import LANES
from tests.support.milter_session import Loop, Session


def gateway(loop: Loop, extra: str, store: MemoryStore | None = None) -> DecisionGateway:
    policy = parse_policy(LANES + textwrap.dedent(extra))
    service = DecisionService(policy, store if store is not None else MemoryStore())
    assert policy.milter is not None
    return DecisionGateway(service, loop.loop, policy.milter)


def decision_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [dict(r.fields) for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "mqpolicy.decision" and r.getMessage() == "decision"
            and r.fields.get("stage") == "END-OF-MESSAGE"]  # type: ignore[attr-defined]


HOLD_PER_DOMAIN = """\
milter:
  listen: unix:/tmp/unused.sock
limits:
  - name: per-domain
    rate: 1/1h
    key: recipient_domain
    action: hold
"""


def test_log_line_says_hold_for_a_held_message(loop: Loop,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mqpolicy.decision")
    s = Session(gateway(loop, HOLD_PER_DOMAIN))
    s.connect()
    assert s.message("a@example.com", ["1@d.example"], queue_id="Q1") == Milter.CONTINUE
    assert s.message("a@example.com", ["2@d.example"], queue_id="Q2") == Milter.CONTINUE
    assert s.ctx.quarantined == ["held by mqpolicy limit per-domain"]
    lines = decision_lines(caplog)
    assert [(line["qid"], line["action"]) for line in lines] == [("Q1", "accept"),
                                                                 ("Q2", "hold")]
    assert all("duplicate" not in line for line in lines)


def test_log_line_says_reject_for_mail_that_can_never_fit(
        loop: Loop, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mqpolicy.decision")
    s = Session(gateway(loop, """\
        milter:
          listen: unix:/tmp/unused.sock
        limits:
          - name: per-sender
            rate: 2/1h
            key: sender
            count: recipients
        """))
    s.connect()
    rc = s.message("a@example.com", ["1@x.example", "2@x.example", "3@x.example"],
                   queue_id="Q3")
    assert rc == Milter.REJECT
    assert s.ctx.replies[-1] == ("550", "5.7.1", "message exceeds limit per-sender: "
                                 "3 recipients, at most 2 at once")
    [line] = decision_lines(caplog)
    assert line["action"] == "reject"
    assert line["reason"] == "oversize"
