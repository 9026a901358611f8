"""Pauses of destinations and lanes on the decision path: paused mail is accepted and held
with a ``paused: ...`` record, never refused, and spends nothing of the paused destination's
budget; the pause is read from the store with the backoff factors, ends by resume or by
itself; the store keeps it across processes (Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import Milter
import Milter.test  # makes @noreply callbacks answer CONTINUE under test
import pytest

from mqpolicy.decision.engine import Action
from mqpolicy.decision.runtime_state import RuntimeRefresher
from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.milter.gateway import DecisionGateway
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import MilterSettings
from mqpolicy.policy.pauses import new_pause, pause_target_problem
from mqpolicy.policy.request import Request
from mqpolicy.store.backoff_states import MemoryBackoffStore, RedisBackoffStore
from mqpolicy.store.hold_records import HoldRecord, MemoryHoldRecords
from mqpolicy.store.memory import MemoryStore
from tests.support.milter_session import Loop, Session
from tests.support.redis_fixture import RedisServer

POLICY = """\
lanes:
  - {name: transactional, transport: mq-transactional}
  - {name: normal}
  - {name: bulk, transport: mq-bulk}
default_lane: normal
classify:
  - {name: resets, when: {sender: "@app.example"}, lane: transactional}
  - {name: news, when: {sender: "@news.example"}, lane: bulk}
destinations:
  - name: yahoo
    domains: [yahoo.test]
    rate: 2/1h
    action: defer
"""
T0 = 1_800_000_000_000


class Rig:
    def __init__(self) -> None:
        self.now = T0
        self.service = DecisionService(parse_policy(POLICY), MemoryStore(),
                                       clock_ms=lambda: self.now)
        self.records = MemoryHoldRecords(lambda: self.now)
        self.handler = PostfixPolicyHandler(self.service, self.records, clock_ms=lambda: self.now)
        self.pauses = MemoryBackoffStore()
        self.refresher = RuntimeRefresher(self.service, self.pauses)
        self.n = 0

    async def pause(self, kind: str, name: str, for_ms: int | None = None,
                    reason: str = "") -> None:
        await self.pauses.set_pause(new_pause(kind, name, self.now, for_ms,  # type: ignore[arg-type]
                                              reason))
        await self.refresher.refresh()

    async def message(self, sender: str, recipients: Sequence[str]) -> tuple[str, list[str]]:
        """One message through the policy server: (its queue id, the answers)."""
        self.n += 1
        instance, qid = f"i{self.n}", f"QID{self.n:05d}"

        def attrs(stage: str, recipient: str, queue_id: str) -> dict[str, str]:
            return {"request": "smtpd_access_policy", "protocol_state": stage,
                    "sender": sender, "recipient": recipient, "instance": instance,
                    "queue_id": queue_id, "client_address": "192.0.2.1",
                    "recipient_count": str(len(recipients))}

        answers = [await self.handler.handle(attrs("RCPT", r, qid if i else ""))
                   for i, r in enumerate(recipients)]
        answers.append(await self.handler.handle(attrs("END-OF-MESSAGE", "", qid)))
        return qid, answers


def test_mail_for_a_paused_destination_is_held_with_a_record_others_flow() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.pause("destination", "yahoo", reason="Yahoo TSS04")
        qid, answers = await rig.message("a@shop.example", ["u@yahoo.test"])
        assert answers == ["DUNNO", "HOLD held by mqpolicy: destination yahoo (Yahoo TSS04) "
                           "paused"]
        record = await rig.records.get(qid)
        assert record is not None and not isinstance(record, str)
        assert record.reason == "paused: destination yahoo (Yahoo TSS04)"
        assert record.not_before_ms == T0  # due as soon as the pause ends
        assert record.destinations == ("yahoo.test",)
        qid, answers = await rig.message("a@shop.example", ["u@other.test"])
        assert answers == ["DUNNO", "DUNNO"]
        assert await rig.records.get(qid) is None

    asyncio.run(main())


def test_a_message_with_one_paused_destination_waits_whole() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.pause("destination", "yahoo")
        qid, answers = await rig.message("a@shop.example", ["u@other.test", "u@yahoo.test",
                                                            "v@other.test"])
        # every recipient accepted at RCPT; the message (it cannot be split) is held
        assert answers[:3] == ["DUNNO"] * 3
        assert answers[3].startswith("HOLD ")
        record = await rig.records.get(qid)
        assert record is not None and not isinstance(record, str)
        assert record.reason == "paused: destination yahoo"
        assert set(record.destinations) == {"other.test", "yahoo.test"}

    asyncio.run(main())


def test_paused_mail_is_never_refused_and_spends_nothing_of_the_destination() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.pause("destination", "yahoo")
        # yahoo's budget is 2/1h with action defer: five messages while paused, all held
        for _ in range(5):
            _, answers = await rig.message("a@shop.example", ["u@yahoo.test"])
            assert answers[-1].startswith("HOLD ")
        await rig.pauses.clear_pause("destination", "yahoo")
        await rig.refresher.refresh()
        # the budget is whole: 2 accepted, then the destination defers as configured
        actions = [(await rig.service.decide(Request(
            stage="RCPT", sender="a@shop.example", recipient=f"u{i}@yahoo.test"))).action
            for i in range(3)]
        assert actions == [Action.ACCEPT, Action.ACCEPT, Action.DEFER]

    asyncio.run(main())


def test_a_paused_lane_holds_its_mail_even_the_highest_lane() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.pause("lane", "transactional", reason="bad template")
        qid, answers = await rig.message("reset@app.example", ["u@other.test"])
        assert answers == ["FILTER mq-transactional:",
                           "HOLD held by mqpolicy: lane transactional (bad template) paused"]
        record = await rig.records.get(qid)
        assert record is not None and not isinstance(record, str)
        assert (record.lane, record.reason) == ("transactional",
                                                "paused: lane transactional (bad template)")
        _, answers = await rig.message("n@news.example", ["u@other.test"])
        assert answers == ["FILTER mq-bulk:", "FILTER mq-bulk:"]

    asyncio.run(main())


def test_a_pause_for_a_while_ends_by_itself_and_resume_ends_it_at_once() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.pause("destination", "yahoo", for_ms=60_000)
        request = Request(stage="RCPT", sender="a@shop.example", recipient="u@yahoo.test")
        assert (await rig.service.decide(request)).action is Action.HOLD
        rig.now += 59_999
        await rig.refresher.refresh()
        assert (await rig.service.decide(request)).action is Action.HOLD
        rig.now += 1
        await rig.refresher.refresh()
        assert (await rig.service.decide(request)).action is Action.ACCEPT
        await rig.pause("lane", "normal")
        assert (await rig.service.decide(request)).action is Action.HOLD
        ended = await rig.pauses.clear_pause("lane", "normal")
        assert ended is not None and ended.name == "normal"
        await rig.refresher.refresh()
        assert (await rig.service.decide(request)).action is Action.ACCEPT

    asyncio.run(main())


def test_what_can_be_paused() -> None:
    lanes, destinations = ["normal", "bulk"], ["yahoo"]
    assert pause_target_problem("lane", "bulk", lanes, destinations) is None
    assert pause_target_problem("destination", "yahoo", lanes, destinations) is None
    assert pause_target_problem("destination", "example.org", lanes, destinations) is None
    assert "no lane named 'fast'" in str(pause_target_problem("lane", "fast", lanes,
                                                              destinations))
    assert "no destination named 'gmail'" in str(
        pause_target_problem("destination", "gmail", lanes, destinations))
    assert pause_target_problem("destination", "Example.ORG", lanes, destinations)


def test_pauses_in_redis_are_shared_and_outlive_the_process(redis_clean: RedisServer) -> None:
    async def main() -> None:
        one = RedisBackoffStore(redis_clean.unix_url)
        await one.set_pause(new_pause("destination", "yahoo", T0, 7_200_000, "TSS04\nagain"))
        await one.set_pause(new_pause("lane", "bulk", T0))
        await one.close()
        two = RedisBackoffStore(redis_clean.unix_url)  # another process, or after a restart
        found = {p.field: p for p in await two.pauses()}
        assert set(found) == {"destination:yahoo", "lane:bulk"}
        assert found["destination:yahoo"].until_ms == T0 + 7_200_000
        assert found["destination:yahoo"].reason == "TSS04 again"  # one line
        assert found["lane:bulk"].until_ms is None
        ended = await two.clear_pause("lane", "bulk")
        assert ended is not None and ended.kind == "lane"
        assert await two.clear_pause("lane", "bulk") is None
        assert [p.field for p in await two.pauses()] == ["destination:yahoo"]
        await two.close()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["destination", "lane"])
def test_pauses_are_not_applied_to_the_scheduler_s_release_plan(kind: str) -> None:
    """The scheduler plans a release's budgets with make_plan(releasing=True): a pause
    never turns that into a hold (the scheduler keeps paused mail back itself)."""
    from mqpolicy.decision.engine import make_plan

    async def main() -> None:
        rig = Rig()
        await rig.pause(kind, "yahoo" if kind == "destination" else "normal")
        request = Request(stage="RCPT", sender="a@shop.example", recipient="u@yahoo.test",
                          destination="yahoo")  # as the decision service finds it
        policy = rig.service.policy
        held = make_plan(request, policy, rig.service.runtime)
        assert held.paused and held.limits == ()
        released = make_plan(request, policy, rig.service.runtime, releasing=True)
        assert not released.paused
        assert [p.limit.name for p in released.limits] == ["destination:yahoo"]

    asyncio.run(main())


def test_the_milter_quarantines_mail_for_a_paused_destination(loop: Loop) -> None:
    service = DecisionService(parse_policy(POLICY), MemoryStore())
    pauses = MemoryBackoffStore()
    loop.run(pauses.set_pause(new_pause("destination", "yahoo", T0, None, "TSS04")))
    loop.run(RuntimeRefresher(service, pauses).refresh())
    records = MemoryHoldRecords()
    session = Session(DecisionGateway(service, loop.loop, MilterSettings(), records))
    session.connect()
    assert session.message("a@shop.example", ["u@other.test", "u@yahoo.test"],
                           [("Subject", "x")], queue_id="MQP00001") == Milter.CONTINUE
    assert session.ctx.quarantined == ["held by mqpolicy: destination yahoo (TSS04) paused"]
    record = loop.run(records.get("MQP00001"))
    assert isinstance(record, HoldRecord)
    assert (record.reason, record.destinations) == ("paused: destination yahoo (TSS04)",
                                                    ("other.test", "yahoo.test"))
    session.ctx.quarantined.clear()
    assert session.message("a@shop.example", ["u@other.test"], [("Subject", "y")],
                           queue_id="MQP00002") == Milter.CONTINUE
    assert session.ctx.quarantined == []
