"""The scheduler passes again at once when more held mail is due than one pass may release
(issue 16: ``scheduler.max_releases_per_pass`` caps a pass, never the backlog's pace)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.loader import parse_policy
from mqpolicy.scheduler.mta_queue import QueueEntry, QueueSnapshot
from mqpolicy.scheduler.scheduler import Scheduler
from mqpolicy.store.hold_records import HoldRecord, MemoryHoldRecords
from mqpolicy.store.memory import MemoryStore

POLICY = """\
lanes:
  - name: normal
default_lane: normal
scheduler:
  interval: 30s
  max_releases_per_pass: 2
"""
T0 = 1_800_000_000_000


class HoldQueue:
    """Held messages in memory; a release moves them out of hold."""

    instance = "backlog"

    def __init__(self) -> None:
        self.entries: dict[str, QueueEntry] = {}

    async def snapshot(self) -> QueueSnapshot:
        entries = list(self.entries.values())
        return QueueSnapshot(entries, {"hold": sum(e.queue_name == "hold" for e in entries)},
                             [])

    async def release(self, queue_ids: Sequence[str]) -> set[str]:
        for qid in queue_ids:
            self.entries[qid] = self.entries[qid]._replace(queue_name="deferred")
        return set(queue_ids)

    async def deliver_now(self, queue_ids: Sequence[str]) -> None:
        for qid in queue_ids:
            self.entries.pop(qid, None)


def test_a_due_backlog_gets_the_next_pass_at_once() -> None:
    async def go() -> None:
        clock = lambda: T0  # noqa: E731
        policy = parse_policy(POLICY)
        records = MemoryHoldRecords(clock)
        queue = HoldQueue()
        scheduler = Scheduler(DecisionService(policy, MemoryStore(), clock_ms=clock),
                              records, queue, clock_ms=clock, owner="one")
        for i in range(5):
            qid = f"B{i}"
            queue.entries[qid] = QueueEntry(qid, "hold", T0 // 1000 - 5, 100, "s@x.example",
                                            (f"r@d{i}.example",))
            await records.put(HoldRecord(qid, "normal", T0, T0 + i, "test"))
        assert await records.acquire_lease("one", 10_000)
        interval = 30_000
        first = await scheduler.run_pass()
        assert len(first.released) == 2
        assert first.next_wake_ms < interval  # 3 more are due: not a whole interval away
        second = await scheduler.run_pass()
        assert len(second.released) == 2
        assert second.next_wake_ms < interval
        last = await scheduler.run_pass()
        assert len(last.released) == 1
        assert last.next_wake_ms == interval  # nothing left: the interval
    asyncio.run(go())
