"""The counting contract (issue 16) as the milter keeps it, through pymilter's test context
with the decision service on a real asyncio loop in a thread of its own."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable

import Milter
import Milter.test  # makes @noreply callbacks answer CONTINUE under test
import pytest

from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.milter.gateway import DecisionGateway
from mqpolicy.policy.loader import parse_policy
from mqpolicy.store.budget import CounterStore
from mqpolicy.store.memory import MemoryStore
from tests.support.lanes import LANES
from tests.support.milter_session import Loop, Session

CONTINUE = Milter.CONTINUE


def gateway(loop: Loop, extra: str, store: CounterStore | None = None) -> DecisionGateway:
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


# ---------------------------------------------------------------- wiring B

B_MILTER = """\
milter:
  listen: unix:/tmp/unused.sock
  rcpt_limits: policy_server
classify:
  - name: lists
    when: {bulk_signals: true}
    lane: bulk
"""


class WiringB:
    """Postfix's order in wiring B: the policy server's RCPT and END-OF-MESSAGE requests,
    then the milter's callbacks for the same message (same queue id)."""

    def __init__(self, loop: Loop, limits: str, store: CounterStore | None = None) -> None:
        self.loop = loop
        # a budget nobody exhausts, so that every END-OF-MESSAGE decision has a limit
        everyone = "  - {name: everyone, rate: 1000/1h, key: client_address}\n"
        self.gateway = gateway(loop, B_MILTER + textwrap.dedent(limits) + everyone, store)
        self.handler = PostfixPolicyHandler(self.gateway.service)
        self.session = Session(self.gateway)
        self.session.connect()
        self.count = 0

    def send(self, recipients: list[str], headers: list[tuple[str, str]] | None = None,
             sender: str = "a@example.com") -> tuple[str, int | None]:
        """(the policy server's refusal at RCPT, else its END-OF-MESSAGE answer; the
        milter's eom answer, None when Postfix refused the message before it)."""
        self.count += 1
        qid, instance = f"QB{self.count}", f"i.{self.count}"
        common = {"request": "smtpd_access_policy", "sender": sender, "instance": instance,
                  "client_address": "192.0.2.10"}
        for i, rcpt in enumerate(recipients):
            answer = self.loop.run(self.handler.handle(
                {**common, "protocol_state": "RCPT", "recipient": rcpt,
                 "queue_id": qid if i else ""}))
            if answer != "DUNNO" and not answer.startswith("FILTER"):
                return answer, None  # the one recipient refused: the message has none
        end = self.loop.run(self.handler.handle(
            {**common, "protocol_state": "END-OF-MESSAGE", "queue_id": qid,
             "recipient_count": str(len(recipients)),
             **({"recipient": recipients[0]} if len(recipients) == 1 else {})}))
        if end != "DUNNO" and not end.startswith("FILTER") and not end.startswith("HOLD"):
            return end, None
        return end, self.session.message(sender, recipients, headers or [], queue_id=qid)


def test_b_header_limit_counts_at_the_milter(loop: Loop) -> None:
    b = WiringB(loop, """\
        limits:
          - name: urgent-cap
            rate: 1/1h
            key: sender
            when: {header: {name: Subject, regex: urgent}}
        """)
    answers = [b.send(["x@d.example"], [("Subject", "urgent")]) for _ in range(3)]
    assert answers == [("DUNNO", Milter.CONTINUE), ("DUNNO", Milter.TEMPFAIL),
                       ("DUNNO", Milter.TEMPFAIL)]


def test_b_lane_scoped_limit_counts_in_the_lane_the_message_leaves_in(loop: Loop) -> None:
    b = WiringB(loop, """\
        limits:
          - name: normal-recipients
            rate: 10/1h
            key: sender
            count: recipients
            lanes: [normal]
        """)
    newsletter = [f"r{i}@d.example" for i in range(10)]
    assert b.send(newsletter, [("List-Id", "<news.example>")]) == ("DUNNO", Milter.CONTINUE)
    assert b.session.ctx.lanes()[-1] == "bulk"
    # the newsletter left through bulk: the normal lane's budget is whole
    assert b.send(newsletter) == ("DUNNO", Milter.CONTINUE)
    assert b.session.ctx.lanes()[-1] == "normal"
    # the lane is the milter's to know: it refuses at its end of message
    assert b.send(["one@d.example"]) == ("DUNNO", Milter.TEMPFAIL)


def test_b_lane_scoped_hold_limit_holds_at_the_milter(loop: Loop) -> None:
    b = WiringB(loop, """\
        limits:
          - name: bulk-recipients
            rate: 20/1h
            key: sender
            count: recipients
            lanes: [bulk]
            action: hold
        """)
    bulk = [("Precedence", "list")]
    assert b.send([f"r{i}@d.example" for i in range(15)], bulk) == ("DUNNO", Milter.CONTINUE)
    assert b.session.ctx.quarantined == []
    assert b.send([f"s{i}@d.example" for i in range(15)], bulk) == ("DUNNO", Milter.CONTINUE)
    assert b.session.ctx.quarantined == ["held by mqpolicy limit bulk-recipients"]


def test_b_policy_server_refuses_when_sure_and_spends_nothing(loop: Loop) -> None:
    b = WiringB(loop, """\
        limits:
          - name: per-sender
            rate: 2/1h
            key: sender
        """)
    assert b.send(["x@d.example"]) == ("DUNNO", Milter.CONTINUE)
    assert b.send(["x@d.example"]) == ("DUNNO", Milter.CONTINUE)  # not a duplicate
    end, milter = b.send(["x@d.example"])
    assert end.startswith("450 4.7.1 ") and milter is None  # spent: 2 of 2, by the milter


def test_b_policy_server_end_of_message_checks_without_spending(loop: Loop) -> None:
    """A message whose recipients fit one by one at RCPT but not together: the policy
    server's END-OF-MESSAGE refuses it (sure: the limit applies in every lane) and spends
    nothing, so a smaller message fits after it."""
    b = WiringB(loop, """\
        limits:
          - name: per-sender
            rate: 5/1h
            key: sender
            count: recipients
        """)
    assert b.send([f"r{i}@d.example" for i in range(3)]) == ("DUNNO", Milter.CONTINUE)
    end, milter = b.send([f"s{i}@d.example" for i in range(3)])
    assert end.startswith("450 4.7.1 ") and milter is None
    assert b.send([f"t{i}@d.example" for i in range(2)]) == ("DUNNO", Milter.CONTINUE)


def test_b_message_that_can_never_fit_is_rejected_by_the_policy_server(loop: Loop) -> None:
    b = WiringB(loop, """\
        limits:
          - name: per-sender
            rate: 5/1h
            key: sender
            count: recipients
        """)
    end, milter = b.send([f"r{i}@d.example" for i in range(6)])
    assert end == "550 5.7.1 message exceeds limit per-sender: 6 recipients, at most 5 at once"
    assert milter is None


# ---------------------------------------------------------------- give-backs

GIVE_BACK_LIMITS = """\
limits:
  - name: per-domain
    rate: 5/1h
    key: recipient_domain
  - name: urgent-cap
    rate: 1/1h
    key: sender
    when: {header: {name: Subject, regex: urgent}}
"""


def test_b_milter_gives_back_the_policy_servers_rcpt_spends(
        loop: Loop, each_store: Callable[[], CounterStore]) -> None:
    store = each_store()
    try:
        b = WiringB(loop, GIVE_BACK_LIMITS, store)
        urgent = [("Subject", "urgent")]
        assert b.send(["0@d.example"], urgent) == ("DUNNO", Milter.CONTINUE)  # 1 of 5
        # refused by the milter at its end of message, after the policy server's RCPT
        # decisions spent 3 of the domain's budget: given back
        assert b.send(["1@d.example", "2@d.example", "3@d.example"], urgent) == (
            "DUNNO", Milter.TEMPFAIL)
        for i in range(4):
            assert b.send([f"r{i}@d.example"]) == ("DUNNO", Milter.CONTINUE)
        end, milter = b.send(["late@d.example"])
        assert end.startswith("450 4.7.1 ") and milter is None
    finally:
        loop.run(store.close())


def test_m_milter_gives_back_its_own_rcpt_spends(loop: Loop) -> None:
    s = Session(gateway(loop, "milter: {listen: unix:/tmp/unused.sock}\n"
                        + GIVE_BACK_LIMITS))
    s.connect()
    urgent = [("Subject", "urgent")]
    assert s.message("a@example.com", ["0@d.example"], urgent, queue_id="M0") == CONTINUE
    rc = s.message("a@example.com", ["1@d.example", "2@d.example"], urgent, queue_id="M1")
    assert rc == Milter.TEMPFAIL
    for i in range(4):
        assert s.message("a@example.com", [f"r{i}@d.example"], queue_id=f"M{i + 2}") == CONTINUE
    s.mail("a@example.com")
    assert s.rcpt("late@d.example") == Milter.TEMPFAIL


def test_m_a_recipient_the_milter_refused_is_not_counted(loop: Loop) -> None:
    s = Session(gateway(loop, """\
        milter: {listen: unix:/tmp/unused.sock}
        limits:
          - name: per-domain
            rate: 2/1h
            key: recipient_domain
          - name: per-sender
            rate: 3/1h
            key: sender
            count: recipients
        """))
    s.connect()
    s.mail("a@example.com")
    assert s.rcpt("1@d.example") == CONTINUE
    assert s.rcpt("2@d.example") == CONTINUE
    assert s.rcpt("3@d.example") == Milter.TEMPFAIL  # the domain's 2 are spent
    s.body(b"x\r\n")
    assert s.eom() == CONTINUE  # 2 recipients: 2 of the sender's 3 spent, not 3
    assert s.message("a@example.com", ["x@e.example"], queue_id="R2") == CONTINUE
    assert s.message("a@example.com", ["y@e.example"], queue_id="R3") == Milter.TEMPFAIL


def test_m_lane_scoped_recipient_limit_counts_in_the_final_lane(loop: Loop) -> None:
    """Rule 1: a recipient-keyed limit with lanes is spent at the end of the message, one
    unit per recipient, in the lane the headers give."""
    s = Session(gateway(loop, """\
        milter: {listen: unix:/tmp/unused.sock}
        classify:
          - name: lists
            when: {bulk_signals: true}
            lane: bulk
        limits:
          - name: bulk-per-domain
            rate: 3/1h
            key: recipient_domain
            count: recipients
            lanes: [bulk]
            action: hold
        """))
    s.connect()
    lists = [("List-Id", "<l.example>")]
    plain = [f"n{i}@d.example" for i in range(5)]
    assert s.message("a@example.com", plain, queue_id="L1") == CONTINUE  # normal: not counted
    assert s.message("a@example.com", ["1@d.example", "2@d.example"], lists,
                     queue_id="L2") == CONTINUE
    assert s.ctx.quarantined == []
    assert s.message("a@example.com", ["3@d.example", "4@d.example"], lists,
                     queue_id="L3") == CONTINUE
    assert s.ctx.quarantined == ["held by mqpolicy limit bulk-per-domain"]
    assert s.message("a@example.com", ["5@d.example"], lists, queue_id="L4") == CONTINUE
    assert len(s.ctx.quarantined) == 1  # the held one spent nothing: 1 of 3 was left


def test_b_lane_scoped_limit_of_another_lane_never_refuses_at_rcpt(loop: Loop) -> None:
    """Before the milter's end of message the lane is a guess: a limit of the normal lane,
    spent by plain mail, does not refuse a newsletter that leaves through bulk."""
    b = WiringB(loop, """\
        limits:
          - name: normal-messages
            rate: 1/1h
            key: sender
            lanes: [normal]
        """)
    assert b.send(["x@d.example"]) == ("DUNNO", Milter.CONTINUE)
    assert b.send(["y@d.example"], [("List-Id", "<l.example>")]) == ("DUNNO", Milter.CONTINUE)
    assert b.session.ctx.lanes()[-1] == "bulk"
    assert b.send(["z@d.example"]) == ("DUNNO", Milter.TEMPFAIL)  # normal: spent


def test_b_policy_servers_end_of_message_writes_no_once_key_and_spends_nothing(
        loop: Loop) -> None:
    b = WiringB(loop, """\
        limits:
          - name: per-sender
            rate: 2/1h
            key: sender
        """)
    store = b.gateway.service.store
    common = {"request": "smtpd_access_policy", "sender": "a@example.com",
              "instance": "i.only", "client_address": "192.0.2.10"}
    assert loop.run(b.handler.handle({**common, "protocol_state": "END-OF-MESSAGE",
                                      "queue_id": "QONLY", "recipient_count": "1"})) == "DUNNO"
    assert loop.run(store.scan("*")) == []  # no bucket spent, no once key
    # the milter, after it, is no duplicate: it spends
    assert b.session.message("a@example.com", ["x@d.example"], queue_id="QONLY") == CONTINUE
    assert [k for k in loop.run(store.scan("*")) if k.startswith("seen:")] == ["seen:QONLY"]
