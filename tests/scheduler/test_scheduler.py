"""The scheduler loop against an in-memory MTA queue, the memory stores and a fake clock:
order, budgets shared with live decisions, crash recovery, foreign and broken holds, the
lease and load."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence

import pytest

import mqpolicy.scheduler.scheduler as scheduler_module
from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import Policy
from mqpolicy.policy.request import Request
from mqpolicy.scheduler.mta_queue import QueueCommandError, QueueEntry, QueueSnapshot
from mqpolicy.scheduler.scheduler import Scheduler
from mqpolicy.store.budget import StoreError
from mqpolicy.store.hold_records import HoldRecord, MemoryHoldRecords, RecordState
from mqpolicy.store.memory import MemoryStore
from tests.support.async_poll import poll_async

POLICY = """\
lanes:
  - name: transactional
  - name: normal
    release_rate: 2/1s
    release_burst: 2
  - name: bulk
default_lane: normal
limits:
  - name: per-domain
    rate: 3/1m
    key: recipient_domain
    action: hold
scheduler:
  interval: 1s
  lock_ttl: 10s
  max_releases_per_pass: 100
  load:
    deferred: 10
    hold_lanes: 1
"""
T0 = 1_800_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class FakeQueue:
    """A hold queue in memory that counts every release and delivery."""

    def __init__(self) -> None:
        self.entries: dict[str, QueueEntry] = {}
        self.releases: Counter[str] = Counter()
        self.delivered: list[str] = []
        self.extra_counts: dict[str, int] = {}
        self.fail_release: BaseException | None = None
        self.fail_snapshot: BaseException | None = None

    @property
    def instance(self) -> str:
        return "fake"

    def hold(self, qid: str, *rcpts: str, sender: str = "s@x.example") -> None:
        self.entries[qid] = QueueEntry(qid, "hold", T0 // 1000 - 5, 100, sender,
                                       rcpts or ("r@a.example",))

    async def snapshot(self) -> QueueSnapshot:
        if self.fail_snapshot is not None:
            raise self.fail_snapshot
        entries = list(self.entries.values())
        counts = Counter(e.queue_name for e in entries)
        counts.update(self.extra_counts)
        return QueueSnapshot(entries, dict(counts), [])

    async def release(self, queue_ids: Sequence[str]) -> set[str]:
        if self.fail_release is not None:
            if isinstance(self.fail_release, QueueCommandError):
                for qid in self.fail_release.released:  # what it did before failing
                    self.entries[qid] = self.entries[qid]._replace(queue_name="deferred")
                    self.releases[qid] += 1
            raise self.fail_release
        released = set()
        for qid in queue_ids:
            entry = self.entries.get(qid)
            if entry is not None and entry.queue_name == "hold":
                self.entries[qid] = entry._replace(queue_name="deferred")
                self.releases[qid] += 1
                released.add(qid)
        return released

    async def deliver_now(self, queue_ids: Sequence[str]) -> None:
        for qid in queue_ids:
            if self.entries.pop(qid, None) is not None:
                self.delivered.append(qid)


class Rig:
    def __init__(self, text: str = POLICY) -> None:
        self.clock = Clock()
        self.policy: Policy = parse_policy(text)
        self.store = MemoryStore()
        self.service = DecisionService(self.policy, self.store, clock_ms=self.clock)
        self.records = MemoryHoldRecords(self.clock)
        self.queue = FakeQueue()
        self.scheduler = self.new_scheduler()

    def new_scheduler(self, owner: str = "one") -> Scheduler:
        return Scheduler(self.service, self.records, self.queue, clock_ms=self.clock,
                         owner=owner)

    async def hold(self, qid: str, lane: str, *rcpts: str, created: int = 0,
                   not_before: int = 0) -> None:
        self.queue.hold(qid, *rcpts)
        await self.records.put(HoldRecord(qid, lane, not_before or self.clock.now,
                                          created or self.clock.now, "test"))

    async def pass_(self) -> list[str]:
        assert await self.records.acquire_lease(self.scheduler.owner, 10_000)
        report = await self.scheduler.run_pass()
        return report.released


def run(coro_fn: object) -> None:
    asyncio.run(coro_fn())  # type: ignore[operator]


def test_highest_lane_first_fifo_within_a_lane_and_the_lane_rate() -> None:
    async def main() -> None:
        rig = Rig()
        created = T0 - 10_000
        for i, (qid, lane) in enumerate([("B1", "bulk"), ("N1", "normal"), ("T1", "transactional"),
                                         ("N2", "normal"), ("B2", "bulk"), ("N3", "normal"),
                                         ("T2", "transactional"), ("N4", "normal")]):
            await rig.hold(f"{qid}AAAAA", lane, f"r{i}@d{i}.example", created=created + i)
        released = await rig.pass_()
        # normal: 2 released (its burst), then its lane waits: no overtaking within it
        assert released == ["T1AAAAA", "T2AAAAA", "N1AAAAA", "N2AAAAA", "B1AAAAA", "B2AAAAA"]
        assert rig.scheduler.stats.held_by_lane == {"transactional": 0, "normal": 2, "bulk": 0}
        assert await rig.pass_() == []  # same instant: the lane budget is spent
        rig.clock.now += 500
        assert await rig.pass_() == ["N3AAAAA"]  # 2/s: one more every 500 ms
        rig.clock.now += 500
        assert await rig.pass_() == ["N4AAAAA"]
        assert rig.queue.delivered[-2:] == ["N3AAAAA", "N4AAAAA"]
        assert len(rig.records) == 0
        assert rig.scheduler.stats.released == {"transactional": 2, "normal": 4, "bulk": 2}

    run(main)


def test_never_before_its_time_and_the_next_pass_comes_then() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.hold("LATER01", "transactional", not_before=T0 + 300)
        assert await rig.pass_() == []
        report = await rig.scheduler.run_pass()
        assert report.next_wake_ms == 300
        rig.clock.now += 299
        assert await rig.pass_() == []
        rig.clock.now += 1
        assert await rig.pass_() == ["LATER01"]

    run(main)


def test_destination_budget_is_shared_with_live_traffic_and_highest_lane_wins() -> None:
    async def main() -> None:
        rig = Rig()
        # live traffic spends 2 of the 3 units of a.example
        for _ in range(2):
            verdict = await rig.service.decide(Request(stage="RCPT", sender="l@x.example",
                                                       recipient="z@a.example"))
            assert verdict.action.value == "accept"
        await rig.hold("BULKA01", "bulk", "x@a.example", created=T0 - 3)
        await rig.hold("TRANA01", "transactional", "y@a.example", created=T0 - 2)
        await rig.hold("TRANA02", "transactional", "w@a.example", created=T0 - 1)
        await rig.hold("BULKB01", "bulk", "x@b.example", created=T0)
        # one unit left: the highest lane's oldest gets it; its lane-mate and the bulk
        # message to a.example wait; bulk to b.example is not held up by them
        assert await rig.pass_() == ["TRANA01", "BULKB01"]
        # and the live decision now finds a.example spent (held, action: hold)
        verdict = await rig.service.decide(Request(stage="RCPT", sender="l@x.example",
                                                   recipient="z@a.example"))
        assert verdict.action.value == "hold"
        rig.clock.now += 20_000  # one unit back (3/1m)
        assert await rig.pass_() == ["TRANA02"]

    run(main)


FLOOD = """\
lanes:
  - name: normal
default_lane: normal
limits:
  - name: per-sender
    rate: 3/1m
    key: sender
    count: messages
    action: hold
scheduler:
  interval: 1s
  lock_ttl: 10s
"""


def test_mail_held_by_a_limit_leaves_at_the_limits_rate_and_spends_its_budget() -> None:
    """3/1m with action hold, 7 messages at once: 3 pass, 4 wait in the hold queue. Each
    leaves when the sender's budget admits it, one every 20 s, and its release spends that
    budget: the flood trickles out at the limit's rate, not all at the next pass."""
    async def main() -> None:
        rig = Rig(FLOOD)
        handler = PostfixPolicyHandler(rig.service, rig.records, clock_ms=rig.clock)
        sender = "flood@x.example"

        def end_of_message(qid: str) -> dict[str, str]:
            return {"request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
                    "sender": sender, "queue_id": qid, "instance": qid.lower(),
                    "recipient_count": "1", "client_address": "192.0.2.1"}

        answers = []
        for i in range(7):
            qid = f"FLOOD{i:02d}"
            answers.append(await handler.handle(end_of_message(qid)))
            if answers[-1].startswith("HOLD"):
                rig.queue.hold(qid, sender=sender)
        assert answers == ["DUNNO"] * 3 + ["HOLD held by mqpolicy limit per-sender"] * 4

        live = Request(stage="END-OF-MESSAGE", sender=sender, recipient_count=1,
                       queue_id="LIVE0001")
        released_at: dict[str, int] = {}
        while rig.clock.now <= T0 + 120_000:  # a pass every interval, two minutes long
            for qid in await rig.pass_():
                released_at[qid] = rig.clock.now - T0
                # the release spent the budget: a live message now would wait too
                verdict = await rig.service.decide(live, consume=False)
                assert verdict.action.value == "hold", (qid, released_at)
            rig.clock.now += 1000
        assert released_at == {"FLOOD03": 20_000, "FLOOD04": 40_000, "FLOOD05": 60_000,
                               "FLOOD06": 80_000}

    run(main)


def test_operator_held_message_is_never_released() -> None:
    async def main() -> None:
        rig = Rig()
        rig.queue.hold("OPERATOR1")
        await rig.hold("OURS00001", "bulk")
        assert await rig.pass_() == ["OURS00001"]
        for _ in range(3):
            rig.clock.now += 120_000
            assert await rig.pass_() == []
        assert rig.queue.releases == {"OURS00001": 1}
        assert rig.scheduler.stats.foreign == 1

    run(main)


def test_unreadable_record_is_reported_not_released(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        rig = Rig()
        rig.queue.hold("BROKEN001")
        rig.records.put_fields("BROKEN001", {"v": "1", "lane": "bulk", "created_ms": "x"})
        assert await rig.pass_() == []
        assert await rig.pass_() == []
        assert rig.scheduler.stats.broken == 1
        assert rig.queue.releases == {}

    run(main)
    errors = [r for r in caplog.records if "unreadable record" in r.getMessage()]
    assert len(errors) == 1  # reported once, not every pass


def test_crash_after_release_before_record_deletion_is_reconciled() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.hold("CRASH0001", "transactional")
        await rig.hold("CRASH0002", "transactional")
        original_delete = rig.records.delete

        async def dying_delete(queue_ids: Sequence[str]) -> int:
            raise StoreError("killed between postsuper -H and the record deletion")

        rig.records.delete = dying_delete  # type: ignore[method-assign]
        with pytest.raises(StoreError):
            await rig.pass_()
        assert rig.queue.releases == {"CRASH0001": 1, "CRASH0002": 1}
        (await rig.records.get("CRASH0001"))  # still there, state releasing
        rig.records.delete = original_delete  # type: ignore[method-assign]
        second = rig.new_scheduler("two")  # a new process after the crash
        await rig.records.release_lease("one")
        assert await rig.records.acquire_lease("two", 10_000)
        report = await second.run_pass()
        assert sorted(report.plan.finished) == ["CRASH0001", "CRASH0002"]
        assert report.released == []
        assert len(rig.records) == 0
        assert rig.queue.releases == {"CRASH0001": 1, "CRASH0002": 1}  # exactly once

    run(main)


def test_crash_before_postsuper_resumes_without_spending_twice() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.hold("HALF00001", "normal")
        rig.queue.fail_release = asyncio.CancelledError()  # killed inside postsuper
        with pytest.raises(asyncio.CancelledError):
            await rig.pass_()
        got = await rig.records.get("HALF00001")
        assert isinstance(got, HoldRecord) and got.state is RecordState.RELEASING
        rig.queue.fail_release = None
        await rig.hold("NEXT00001", "normal", created=T0 + 1)
        report = await rig.scheduler.run_pass()
        # resumed first, without its lane budget: the newcomer still gets one of the two
        assert report.resumed == ["HALF00001"]
        assert report.released == ["HALF00001", "NEXT00001"]
        assert rig.queue.releases == {"HALF00001": 1, "NEXT00001": 1}

    run(main)


def test_a_failing_release_command_keeps_the_records() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.hold("FAIL00001", "bulk")
        await rig.hold("FAIL00002", "bulk")
        rig.queue.fail_release = QueueCommandError("postsuper exited 1", {"FAIL00001"})
        report = await rig.scheduler.run_pass()
        assert report.released == ["FAIL00001"]
        assert await rig.records.get("FAIL00002") is not None  # kept: tried again
        rig.queue.fail_release = None
        assert await rig.pass_() == ["FAIL00002"]
        assert rig.scheduler.stats.errors == 1

    run(main)


def test_one_active_scheduler_per_instance() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.hold("LEASE0001", "bulk")
        one, two = rig.new_scheduler("one"), rig.new_scheduler("two")
        tries: list[tuple[str, bool]] = []  # (owner, got the lease)
        acquire = rig.records.acquire_lease

        async def recorded(owner: str, ttl_ms: int) -> bool:
            got = await acquire(owner, ttl_ms)
            tries.append((owner, got))
            return got

        rig.records.acquire_lease = recorded  # type: ignore[method-assign]
        stop = asyncio.Event()
        task_one = asyncio.create_task(one.run(stop))
        await poll_async(lambda: one.stats.active, "the first one to take the lease")
        task_two = asyncio.create_task(two.run(stop))
        await poll_async(lambda: any(owner == "two" for owner, _ in tries), "the second's try")
        assert ("two", True) not in tries
        assert not two.stats.active
        assert rig.queue.releases == {"LEASE0001": 1}
        stop.set()
        await asyncio.gather(task_one, task_two)
        assert await rig.records.lease_holder() is None  # given up on the way out

    run(main)


def test_a_failing_queue_keeps_the_lease_and_reconciles_once_it_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        rig = Rig()
        rig.queue.fail_snapshot = QueueCommandError("postqueue exited 69", set())
        with caplog.at_level(logging.INFO, logger="mqpolicy.scheduler"):
            for _ in range(3):
                await rig.scheduler._step()
                assert rig.scheduler.stats.active  # it holds the lease all along
            rig.queue.fail_snapshot = None
            for _ in range(2):
                await rig.scheduler._step()
        messages = [r.getMessage() for r in caplog.records]
        assert messages.count("scheduler lease acquired, reconciling") == 1
        assert messages.count("reconciled") == 1
        assert messages.count("scheduler step failed, retrying next interval") == 1
        (works,) = [r for r in caplog.records if r.getMessage() == "scheduler step works again"]
        assert works.fields["failures"] == 3  # type: ignore[attr-defined]

    run(main)


def test_a_queue_that_keeps_failing_is_said_once_then_reminded_not_every_pass(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``make run`` on a host whose Postfix has no main.cf: one warning, not one per pass;
    a reminder after FAILURE_REMINDER_S; a new error is said at once."""
    clock = [1000.0]
    monkeypatch.setattr(scheduler_module.time, "monotonic", lambda: clock[0])

    async def main() -> None:
        rig = Rig()
        rig.queue.fail_snapshot = QueueCommandError("postqueue exited 69: no main.cf", set())
        with caplog.at_level(logging.INFO, logger="mqpolicy.scheduler"):
            for _ in range(20):  # 20 passes, 5 s apart: 95 s
                await rig.scheduler._step()
                clock[0] += 5
            clock[0] += scheduler_module.FAILURE_REMINDER_S
            await rig.scheduler._step()
            rig.queue.fail_snapshot = QueueCommandError("postqueue exited 75: other", set())
            await rig.scheduler._step()
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert messages == ["scheduler step failed, retrying next interval",
                            "scheduler step still failing, retrying every interval",
                            "scheduler step failed, retrying next interval"]

    run(main)


def test_load_pauses_the_lowest_lane_and_publishes_it() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.hold("BULK00001", "bulk")
        await rig.hold("TRAN00001", "transactional")
        rig.queue.extra_counts = {"deferred": 50}
        assert await rig.pass_() == ["TRAN00001"]
        assert await rig.records.get_waiting_lanes() == frozenset({"bulk"})
        rig.queue.extra_counts = {"deferred": 9}  # under the threshold, not yet drained
        assert await rig.pass_() == []
        rig.queue.extra_counts = {"deferred": 7}
        assert await rig.pass_() == ["BULK00001"]
        assert await rig.records.get_waiting_lanes() == frozenset()

    run(main)


def test_store_error_in_budgets_releases_nothing_more() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.hold("STORE0001", "bulk", "x@a.example")

        async def broken(*args: object, **kwargs: object) -> object:
            raise StoreError("down")

        rig.store.evaluate = broken  # type: ignore[method-assign]
        report = await rig.scheduler.run_pass()
        assert report.released == [] and report.store_error == "down"
        assert rig.queue.releases == {}

    run(main)


def test_records_of_messages_gone_are_cleaned_after_the_grace() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.records.put(HoldRecord("DELETED01", "bulk", T0, T0, "test"))
        assert await rig.pass_() == []
        assert len(rig.records) == 1  # may not be queued yet
        rig.clock.now += 61_000
        report = await rig.scheduler.run_pass()
        assert report.plan.stale == ["DELETED01"]
        assert len(rig.records) == 0

    run(main)


OVERSIZE = """\
lanes:
  - name: normal
default_lane: normal
limits:
  - name: per-sender
    rate: 3/1m
    key: sender
    count: recipients
    oversize: hold
scheduler:
  interval: 1s
  lock_ttl: 10s
"""


def test_mail_that_can_never_fit_is_held_and_released_when_the_budget_is_full() -> None:
    """``oversize: hold``: 5 recipients against a burst of 3 are held (never a 4xx), and
    released once the budget is full again, the release spending the whole burst."""
    async def main() -> None:
        rig = Rig(OVERSIZE)
        handler = PostfixPolicyHandler(rig.service, rig.records, clock_ms=rig.clock)
        sender = "big@x.example"

        def end_of_message(qid: str, count: int) -> dict[str, str]:
            return {"request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
                    "sender": sender, "queue_id": qid, "instance": qid.lower(),
                    "recipient_count": str(count), "client_address": "192.0.2.1"}

        assert await handler.handle(end_of_message("SMALL1", 1)) == "DUNNO"  # 1 of 3
        assert (await handler.handle(end_of_message("BIG01", 5))).startswith("HOLD ")
        rig.queue.hold("BIG01", *(f"r{i}@d.example" for i in range(5)), sender=sender)
        released_at = None
        while rig.clock.now <= T0 + 60_000 and released_at is None:
            if await rig.pass_():
                released_at = rig.clock.now - T0
            rig.clock.now += 1000
        assert released_at == 20_000  # the one unit spent came back: full again
        live = Request(stage="END-OF-MESSAGE", sender=sender, recipient_count=1,
                       queue_id="LIVE0001")
        verdict = await rig.service.decide(live, consume=False)
        assert verdict.action.value == "defer"  # the release spent the whole burst

    run(main)
