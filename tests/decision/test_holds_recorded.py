"""Holds become records at end of message: the Postfix policy front-end (RCPT holds answered
as accepted and remembered per instance, END-OF-MESSAGE writes the record then answers
HOLD) and the milter (records before quarantine; scheduled-delivery headers)."""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import Sequence

import Milter
import Milter.test  # makes @noreply callbacks answer CONTINUE under test

from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.milter.gateway import DecisionGateway
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import ErrorAction, MilterSettings
from mqpolicy.store.budget import StoreError
from mqpolicy.store.hold_records import (
    MAX_DESTINATIONS,
    HeldSpend,
    HoldRecord,
    MemoryHoldRecords,
)
from mqpolicy.store.memory import MemoryStore
from tests.support.lanes import LANES
from tests.support.milter_session import Loop, Session

POLICY = LANES + """\
classify:
  - name: later
    when: {sender: "@.later.example"}
    lane: scheduled
  - name: news
    when: {sender: "@news.example"}
    lane: bulk
limits:
  - name: one-a-day
    rate: 1/1d
    key: sender
    action: hold
    when: {sender: "@capped.example"}
  - name: quota
    rate: 2/1d
    key: sender
    count: recipients
    action: reject
    when: {sender: "@q.later.example"}
scheduler:
  schedule:
    allow: {sender: "@app.example"}
    max_delay: 1h
"""
NOW = 1_800_000_000_000


def clock() -> int:
    return NOW


class FailingRecords(MemoryHoldRecords):
    async def put(self, record: HoldRecord, ttl_ms: int = 1) -> None:
        raise StoreError("redis: ConnectionError")


def handler(records: MemoryHoldRecords | None = None) -> PostfixPolicyHandler:
    service = DecisionService(parse_policy(POLICY), MemoryStore(), clock_ms=clock)
    return PostfixPolicyHandler(service, records, clock_ms=clock)


def attrs(stage: str, sender: str, recipient: str = "", instance: str = "i1",
          queue_id: str = "", count: int = 1) -> dict[str, str]:
    return {"request": "smtpd_access_policy", "protocol_state": stage, "sender": sender,
            "recipient": recipient, "instance": instance, "queue_id": queue_id,
            "client_address": "192.0.2.1", "recipient_count": str(count)}


async def message(h: PostfixPolicyHandler, sender: str, recipients: Sequence[str],
                  instance: str, queue_id: str) -> list[str]:
    answers = [await h.handle(attrs("RCPT", sender, r, instance, queue_id if i else ""))
               for i, r in enumerate(recipients)]
    answers.append(await h.handle(attrs("END-OF-MESSAGE", sender, "", instance, queue_id,
                                        len(recipients))))
    return answers


def test_rcpt_hold_is_answered_as_accepted_and_held_at_end_of_message() -> None:
    async def main() -> None:
        records = MemoryHoldRecords(clock)
        h = handler(records)
        sender = "x@capped.example"
        assert await message(h, sender, ["a@one.example"], "i1", "QID00001") == \
            ["DUNNO", "DUNNO"]
        answers = await message(h, sender, ["a@one.example", "b@two.example"], "i2",
                                "QID00002")
        assert answers == ["DUNNO", "DUNNO", "HOLD held by mqpolicy limit one-a-day"]
        got = await records.get("QID00002")
        # 1/1d, spent by the first message: not before a day has passed, and the release
        # spends what the held message did not (one message of the sender's budget)
        assert got == HoldRecord("QID00002", "normal", NOW + 86_400_000, NOW, "one-a-day",
                                 ("one.example", "two.example"), sender,
                                 spends=(HeldSpend("one-a-day", sender, 1),))
        assert await records.get("QID00001") is None
        assert h.pending_holds == 0

    asyncio.run(main())


def test_hold_lane_answers_its_filter_at_rcpt() -> None:
    async def main() -> None:
        records = MemoryHoldRecords(clock)
        h = handler(records)
        answers = await message(h, "a@later.example", ["r@x.example"], "i3", "QID00003")
        assert answers == ["FILTER mq-bulk:", "HOLD held by mqpolicy lane scheduled"]
        got = await records.get("QID00003")
        assert isinstance(got, HoldRecord)
        assert (got.lane, got.reason) == ("scheduled", "lane:scheduled")

    asyncio.run(main())


def test_a_refusal_at_end_of_message_wins_over_a_remembered_hold() -> None:
    async def main() -> None:
        records = MemoryHoldRecords(clock)
        h = handler(records)
        # each RCPT fits the recipients quota and is held by its lane (remembered); the
        # message's 3 recipients do not fit: END-OF-MESSAGE rejects, nothing is recorded
        answers = await message(h, "x@q.later.example",
                                ["a@x.example", "b@x.example", "c@x.example"], "i5",
                                "QID00005")
        assert answers[:3] == ["FILTER mq-bulk:"] * 3
        assert answers[3].startswith("550 5.7.1")
        assert await records.get("QID00005") is None
        assert h.pending_holds == 0

    asyncio.run(main())


def test_record_not_written_means_a_temporary_failure() -> None:
    async def main() -> None:
        h = handler(FailingRecords(clock))
        answers = await message(h, "a@later.example", ["r@x.example"], "i6", "QID00006")
        assert answers[-1] == "451 4.3.0 Policy store unavailable, try again later"
        assert h.record_failures == 1

    asyncio.run(main())


def test_without_a_record_store_postfix_holds_as_before() -> None:
    async def main() -> None:
        h = handler(None)
        answers = await message(h, "a@later.example", ["r@x.example"], "i7", "QID00007")
        assert answers[0].startswith("HOLD")

    asyncio.run(main())


def test_a_recipient_without_a_domain_takes_no_destination_of_the_record() -> None:
    async def main() -> None:
        records = MemoryHoldRecords(clock)
        h = handler(records)
        domains = [f"d{i}.example" for i in range(MAX_DESTINATIONS)]
        recipients = ["postmaster", *(f"r@{d}" for d in domains)]
        answers = await message(h, "a@later.example", recipients, "i8", "QID00008")
        assert answers[-1].startswith("HOLD")
        got = await records.get("QID00008")
        assert got is not None
        assert got.destinations == tuple(domains)

    asyncio.run(main())


def test_remembered_holds_are_bounded() -> None:
    async def main() -> None:
        service = DecisionService(parse_policy(POLICY), MemoryStore(), clock_ms=clock)
        h = PostfixPolicyHandler(service, MemoryHoldRecords(clock), clock_ms=clock,
                                 max_pending=3)
        for i in range(10):
            await h.handle(attrs("RCPT", "a@later.example", "r@x.example", f"n{i}"))
        assert h.pending_holds == 3

    asyncio.run(main())


# ---------------------------------------------------------------- the milter


def milter_session(lp: Loop, records: MemoryHoldRecords | None,
                   settings: MilterSettings | None = None) -> Session:
    policy = parse_policy(textwrap.dedent(POLICY))
    service = DecisionService(policy, MemoryStore())
    gateway = DecisionGateway(service, lp.loop, settings or MilterSettings(), records)
    s = Session(gateway)
    s.connect()
    return s


def _removed(s: Session) -> list[tuple[str, int, str]]:
    return [c for c in s.ctx.changed if c[0] != "X-MQ-Lane"]


def test_milter_records_before_quarantine(loop: Loop) -> None:
    records = MemoryHoldRecords()
    s = milter_session(loop, records)
    rc = s.message("a@later.example", ["r@x.example", "q@y.example"], [("Subject", "x")],
                   queue_id="MQID0001")
    assert rc == Milter.CONTINUE
    assert s.ctx.quarantined == ["held by mqpolicy lane scheduled"]
    got = loop.run(records.get("MQID0001"))
    assert isinstance(got, HoldRecord)
    assert (got.lane, got.reason, got.destinations) == ("scheduled", "lane:scheduled",
                                                        ("x.example", "y.example"))
    assert got.not_before_ms <= got.created_ms + 1


def test_milter_hold_by_a_limit_waits_for_its_budget_and_owes_it(
    loop: Loop,
) -> None:
    records = MemoryHoldRecords()
    s = milter_session(loop, records)
    sender = "x@capped.example"
    assert s.message(sender, ["r@x.example"], [("Subject", "1")], queue_id="MQCAP001") == \
        Milter.CONTINUE
    assert s.ctx.quarantined == []
    s.message(sender, ["r@x.example"], [("Subject", "2")], queue_id="MQCAP002")
    assert s.ctx.quarantined == ["held by mqpolicy limit one-a-day"]
    got = loop.run(records.get("MQCAP002"))
    assert isinstance(got, HoldRecord)
    # 1/1d, spent by the first message a moment ago: a day from now, less that moment
    assert 86_390_000 <= got.not_before_ms - got.created_ms <= 86_400_000
    assert got.spends == (HeldSpend("one-a-day", sender, 1),)


def test_milter_schedules_an_allowed_sender(loop: Loop) -> None:
    records = MemoryHoldRecords()
    s = milter_session(loop, records)
    rc = s.message("app@app.example", ["r@x.example"],
                   [("Subject", "later"), ("X-MQ-Deliver-After", "+20s")], queue_id="MQID0002")
    assert rc == Milter.CONTINUE
    assert _removed(s) == [("X-MQ-Deliver-After", 1, "")]
    got = loop.run(records.get("MQID0002"))
    assert isinstance(got, HoldRecord)
    # the quarantine reason names the schedule: the header that asked, and until when
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(got.not_before_ms // 1000))
    assert s.ctx.quarantined == [
        f"held by mqpolicy schedule until {until} (X-MQ-Deliver-After)"]
    assert got.reason == "schedule:X-MQ-Deliver-After"
    assert 19_000 <= got.not_before_ms - got.created_ms <= 20_000
    assert got.lane == "normal"


def test_milter_caps_the_delay(loop: Loop) -> None:
    records = MemoryHoldRecords()
    s = milter_session(loop, records)
    s.message("app@app.example", ["r@x.example"],
              [("Deferred-Delivery", "Fri, 01 Jan 2100 00:00:00 +0000")], queue_id="MQID0003")
    got = loop.run(records.get("MQID0003"))
    assert isinstance(got, HoldRecord)
    assert 3_599_000 <= got.not_before_ms - got.created_ms <= 3_600_000  # max_delay: 1h


def test_milter_ignores_and_strips_headers_of_senders_not_allowed(loop: Loop) -> None:
    records = MemoryHoldRecords()
    s = milter_session(loop, records)
    rc = s.message("someone@else.example", ["r@x.example"],
                   [("X-MQ-Deliver-After", "+20s"), ("x-mq-deliver-after", "+1m"),
                    ("Deferred-Delivery", "Fri, 01 Jan 2100 00:00:00 +0000")],
                   queue_id="MQID0004")
    assert rc == Milter.CONTINUE
    assert s.ctx.quarantined == []
    assert sorted(_removed(s)) == [("Deferred-Delivery", 1, ""), ("X-MQ-Deliver-After", 1, ""),
                                   ("X-MQ-Deliver-After", 2, "")]
    assert loop.run(records.load()).records == {}


def test_milter_unreadable_or_past_time_delivers_now(loop: Loop) -> None:
    records = MemoryHoldRecords()
    for value in ("whenever", "2001-01-01T00:00:00Z"):
        s = milter_session(loop, records)
        s.message("app@app.example", ["r@x.example"], [("X-MQ-Deliver-After", value)],
                  queue_id="MQID0005")
        assert s.ctx.quarantined == []
        assert _removed(s) == [("X-MQ-Deliver-After", 1, "")]


def test_milter_record_failure_applies_on_error(loop: Loop) -> None:
    s = milter_session(loop, FailingRecords())
    rc = s.message("app@app.example", ["r@x.example"], [("X-MQ-Deliver-After", "+1m")],
                   queue_id="MQID0006")
    assert rc == Milter.TEMPFAIL
    assert s.ctx.quarantined == []


def test_milter_record_failure_accepting_changes_each_header_once(loop: Loop) -> None:
    """on_error accept after the lane was chosen: the changes planned before the failure
    are replaced by on_error's own, not sent twice."""
    s = milter_session(loop, FailingRecords(), MilterSettings(on_error=ErrorAction.ACCEPT))
    rc = s.message("app@app.example", ["r@x.example"],
                   [("X-MQ-Lane", "transactional"), ("X-MQ-Deliver-After", "+1m")],
                   queue_id="MQID0007")
    assert rc == Milter.CONTINUE
    assert s.ctx.quarantined == []
    assert sorted(s.ctx.changed) == [("X-MQ-Deliver-After", 1, ""), ("X-MQ-Lane", 1, "normal")]
    assert s.ctx.headers == [("X-MQ-Lane", "normal")]
