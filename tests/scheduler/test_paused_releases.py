"""The scheduler and pauses: nothing of a paused destination or lane is released (whatever
held it), a message waits while any of its destinations is paused, and when the pause ends
the held mail leaves highest lane first, FIFO within a lane, within the budgets."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mqpolicy.decision.runtime_state import RuntimeRefresher
from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.pauses import new_pause
from mqpolicy.scheduler.mta_queue import QueueEntry, QueueSnapshot
from mqpolicy.scheduler.scheduler import Scheduler
from mqpolicy.store.backoff_states import MemoryBackoffStore
from mqpolicy.store.hold_records import HoldRecord, MemoryHoldRecords
from mqpolicy.store.memory import MemoryStore

POLICY = """\
lanes:
  - {name: transactional}
  - {name: normal}
  - {name: bulk}
default_lane: normal
destinations:
  - name: yahoo
    domains: [yahoo.test, ymail.test]
    rate: 3/1h
scheduler:
  interval: 1s
  max_releases_per_pass: 100
"""
T0 = 1_800_000_000_000


class HoldQueue:
    """The MTA's hold queue in memory: what was released, in order."""

    def __init__(self) -> None:
        self.entries: dict[str, QueueEntry] = {}
        self.released: list[str] = []

    @property
    def instance(self) -> str:
        return "test"

    async def snapshot(self) -> QueueSnapshot:
        return QueueSnapshot(list(self.entries.values()), {"hold": len(self.entries)}, [])

    async def release(self, queue_ids: Sequence[str]) -> set[str]:
        done = {q for q in queue_ids if self.entries.pop(q, None) is not None}
        self.released.extend(q for q in queue_ids if q in done)
        return done

    async def deliver_now(self, queue_ids: Sequence[str]) -> None:
        return None


class Rig:
    def __init__(self) -> None:
        self.now = T0
        self.service = DecisionService(parse_policy(POLICY), MemoryStore(),
                                       clock_ms=lambda: self.now)
        self.records = MemoryHoldRecords(lambda: self.now)
        self.queue = HoldQueue()
        self.pauses = MemoryBackoffStore()
        self.refresher = RuntimeRefresher(self.service, self.pauses)
        self.scheduler = Scheduler(self.service, self.records, self.queue,  # type: ignore[arg-type]
                                   clock_ms=lambda: self.now, owner="one")
        self.created = T0 - 100_000

    async def hold(self, qid: str, lane: str, *recipients: str,
                   reason: str = "paused: destination yahoo") -> None:
        self.created += 1
        self.queue.entries[qid] = QueueEntry(qid, "hold", self.created // 1000, 100,
                                             "s@shop.example", recipients)
        await self.records.put(HoldRecord(qid, lane, self.created, self.created, reason))

    async def pause(self, kind: str, name: str, for_ms: int | None = None) -> None:
        await self.pauses.set_pause(new_pause(kind, name, self.now, for_ms))  # type: ignore[arg-type]
        await self.refresher.refresh()

    async def resume(self, kind: str, name: str) -> None:
        await self.pauses.clear_pause(kind, name)
        await self.refresher.refresh()

    async def pass_(self) -> list[str]:
        assert await self.records.acquire_lease("one", 10_000)
        return (await self.scheduler.run_pass()).released


def test_nothing_of_a_paused_destination_leaves_then_highest_lane_first() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.pause("destination", "yahoo")
        await rig.hold("B1", "bulk", "a@yahoo.test")
        await rig.hold("N1", "normal", "b@ymail.test")
        await rig.hold("T1", "transactional", "c@yahoo.test")
        await rig.hold("N2", "normal", "d@yahoo.test")
        await rig.hold("T2", "transactional", "e@yahoo.test")
        # a message held by a limit, to another destination and to yahoo: it waits too
        await rig.hold("X1", "transactional", "f@other.test", "g@yahoo.test", reason="cap")
        await rig.hold("O1", "bulk", "h@other.test", reason="cap")
        assert await rig.pass_() == ["O1"]
        rig.now += 3_600_000
        assert await rig.pass_() == []
        await rig.resume("destination", "yahoo")
        # yahoo's budget (3/1h, burst 3) is shared: the highest lane first, FIFO within it
        assert await rig.pass_() == ["T1", "T2", "X1"]
        rig.now += 1_200_000  # one more unit
        assert await rig.pass_() == ["N1"]
        rig.now += 1_200_000
        assert await rig.pass_() == ["N2"]
        rig.now += 1_200_000
        assert await rig.pass_() == ["B1"]
        assert rig.queue.released == ["O1", "T1", "T2", "X1", "N1", "N2", "B1"]

    asyncio.run(main())


def test_a_paused_lane_keeps_its_held_mail_other_lanes_go() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.pause("lane", "transactional")
        await rig.hold("T1", "transactional", "a@other.test", reason="lane:transactional")
        await rig.hold("N1", "normal", "b@other.test", reason="cap")
        assert await rig.pass_() == ["N1"]
        assert await rig.pass_() == []
        await rig.resume("lane", "transactional")
        assert await rig.pass_() == ["T1"]

    asyncio.run(main())


def test_a_pause_for_a_while_releases_by_itself() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.pause("destination", "yahoo", for_ms=7_200_000)
        await rig.hold("N1", "normal", "a@yahoo.test")
        assert await rig.pass_() == []
        rig.now += 7_199_999
        await rig.refresher.refresh()
        assert await rig.pass_() == []
        rig.now += 1
        await rig.refresher.refresh()
        assert await rig.pass_() == ["N1"]

    asyncio.run(main())
