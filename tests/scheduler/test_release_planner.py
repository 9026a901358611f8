"""The pure release planner: order, due times, clean-ups, reports, budgets and load."""

from __future__ import annotations

import dataclasses
import json

from mqpolicy.decision.engine import make_plan
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import LoadThresholds, Policy
from mqpolicy.policy.request import Request
from mqpolicy.scheduler.mta_queue import QueueEntry
from mqpolicy.scheduler.planner import (
    Candidate,
    lane_release_check,
    lanes_to_pause,
    load_exceeded,
    plan_releases,
    release_checks,
    summarize,
)
from mqpolicy.store.budget import BudgetCheck
from mqpolicy.store.hold_records import BrokenRecord, HeldSpend, HoldRecord, RecordSet, RecordState
from tests.support.planner_policy import POLICY, policy

NOW = 10_000_000


def entry(qid: str, queue: str = "hold", arrival: int = 1, sender: str = "s@x.example",
          rcpts: tuple[str, ...] = ("r@a.example",), size: int = 100) -> QueueEntry:
    return QueueEntry(qid, queue, arrival, size, sender, rcpts)


def rec(qid: str, lane: str = "normal", created: int = 9_000_000, not_before: int = 0,
        state: RecordState = RecordState.HELD) -> HoldRecord:
    return HoldRecord(qid, lane, not_before, created, "test", (), "s@x.example", state)


def records(*items: HoldRecord) -> RecordSet:
    return RecordSet(records={r.queue_id: r for r in items})


def ids(candidates: list[Candidate]) -> list[str]:
    return [c.queue_id for c in candidates]


def test_highest_lane_first_then_fifo() -> None:
    entries = [entry(q) for q in ("BULK01", "NORM02", "TRAN03", "NORM01", "TRAN01")]
    plan = plan_releases(entries, records(
        rec("BULK01", "bulk", 1), rec("NORM02", created=20), rec("TRAN03", "transactional", 30),
        rec("NORM01", created=10), rec("TRAN01", "transactional", 40)),
        now_ms=NOW, lanes=policy().lanes)
    assert ids(plan.due) == ["TRAN03", "TRAN01", "NORM01", "NORM02", "BULK01"]
    assert plan.held_by_lane == {"bulk": 1, "normal": 2, "transactional": 2}


def test_a_message_listed_twice_is_planned_once() -> None:
    plan = plan_releases([entry("TWICE1"), entry("TWICE1"), entry("TWICE1", queue="active")],
                         records(rec("TWICE1")), now_ms=NOW, lanes=policy().lanes)
    assert ids(plan.due) == ["TWICE1"]
    assert plan.stale == [] and plan.finished == []


def test_not_before_is_respected() -> None:
    plan = plan_releases([entry("LATER1"), entry("SOONER"), entry("NOWNOW")],
                         records(rec("LATER1", not_before=NOW + 5000),
                                 rec("SOONER", not_before=NOW + 10),
                                 rec("NOWNOW", not_before=NOW)),
                         now_ms=NOW, lanes=policy().lanes)
    assert ids(plan.due) == ["NOWNOW"]
    assert ids(plan.waiting) == ["SOONER", "LATER1"]


def test_foreign_broken_and_paused() -> None:
    broken = BrokenRecord("BROKEN", "missing field 'lane'", {})
    plan = plan_releases(
        [entry("OPERAT"), entry("BROKEN"), entry("BULK01"), entry("NORM01")],
        RecordSet(records={"BULK01": rec("BULK01", "bulk"), "NORM01": rec("NORM01")},
                  broken={"BROKEN": broken}),
        now_ms=NOW, lanes=policy().lanes, paused_lanes=frozenset({"bulk"}))
    assert [e.queue_id for e in plan.foreign] == ["OPERAT"]
    assert plan.broken == [broken]
    assert ids(plan.paused) == ["BULK01"]
    assert ids(plan.due) == ["NORM01"]


def test_records_whose_message_left_hold() -> None:
    plan = plan_releases(
        [entry("RELEAS", queue="deferred"), entry("YOUNG1", queue="incoming")],
        records(rec("RELEAS", state=RecordState.RELEASING),
                rec("GONE01", created=NOW - 120_000),
                rec("YOUNG1", created=NOW - 1000),
                rec("YOUNG2", created=NOW - 1000)),
        now_ms=NOW, lanes=policy().lanes, grace_ms=60_000)
    assert plan.finished == ["RELEAS"]
    assert plan.stale == ["GONE01"]  # the young ones may not be queued yet
    assert plan.due == []


def test_interrupted_release_still_on_hold_is_resumed() -> None:
    plan = plan_releases([entry("HALF01")], records(rec("HALF01", state=RecordState.RELEASING)),
                         now_ms=NOW, lanes=policy().lanes, paused_lanes=frozenset({"normal"}))
    assert ids(plan.resume) == ["HALF01"]
    assert plan.due == [] and plan.paused == []


def test_reused_queue_id_makes_the_record_stale() -> None:
    plan = plan_releases([entry("REUSED", arrival=NOW // 1000 + 600)],
                         records(rec("REUSED", created=NOW - 5000)),
                         now_ms=NOW, lanes=policy().lanes)
    assert [e.queue_id for e in plan.foreign] == ["REUSED"]
    assert plan.stale == ["REUSED"]


def test_unknown_lane_comes_last() -> None:
    plan = plan_releases([entry("GONE01"), entry("BULK01")],
                         records(rec("GONE01", "retired", created=1), rec("BULK01", "bulk", 2)),
                         now_ms=NOW, lanes=policy().lanes)
    assert ids(plan.due) == ["BULK01", "GONE01"]
    assert plan.unknown_lanes == {"retired"}
    assert plan.due[1].lane is None


# ---------------------------------------------------------------- budgets


def test_lane_release_check() -> None:
    lanes = policy().lanes
    assert lane_release_check(lanes[0], 5000) is None
    normal = lane_release_check(lanes[1], 5000)
    assert normal is not None
    # no explicit burst: what one pass interval earns (10/s over 5 s)
    assert (normal.key, normal.interval_ms, normal.burst) == ("release:normal:10/1000/50/v2",
                                                              100.0, 50)
    bulk = lane_release_check(lanes[2], 5000)
    assert bulk is not None and (bulk.burst, bulk.cost) == (3, 1)


def test_release_checks_use_the_live_buckets_of_recipient_keyed_limits() -> None:
    p = policy()
    e = entry("MULTI1", rcpts=("a@a.example", "b@a.example", "c@b.example",
                               "d@watched.example"))
    plan = plan_releases([e], records(rec("MULTI1", "bulk")), now_ms=NOW, lanes=p.lanes)
    lane_check, checks = release_checks(p, plan.due[0], 1000)
    assert lane_check is not None and lane_check.key.startswith("release:bulk:")
    by_key = {c.key: c for c in checks}
    domain = "rl:per-domain:100/60000/5/v2:"
    assert by_key[domain + "a.example"].cost == 2  # two recipients, one bucket
    assert by_key[domain + "b.example"].cost == 1
    assert "rl:bulk-only:10/60000/10/v2:a@a.example" in by_key  # scoped to the record's lane
    assert not any("per-sender" in k for k in by_key)  # spent at submission already
    watch = by_key["rl:watch:1/3600000/1/v2:watched.example"]
    assert not watch.blocking
    # the normal lane: no bulk-only limit
    plan = plan_releases([e], records(rec("MULTI1", "normal")), now_ms=NOW, lanes=p.lanes)
    _, checks = release_checks(p, plan.due[0], 1000)
    assert not any("bulk-only" in c.key for c in checks)


def test_many_recipients_at_one_bucket_cost_at_most_its_burst() -> None:
    p = policy()
    e = entry("MANY01", rcpts=tuple(f"u{i}@a.example" for i in range(20)))
    plan = plan_releases([e], records(rec("MANY01", "transactional")), now_ms=NOW,
                         lanes=p.lanes)
    _, checks = release_checks(p, plan.due[0], 1000)
    (domain,) = [c for c in checks if "per-domain" in c.key]
    assert (domain.cost, domain.burst) == (5, 5)


def test_release_checks_spend_the_budgets_the_hold_left_unspent() -> None:
    """A message held by a limit spent none of its message budgets: its record keeps them
    (limit, key value, cost) and the release spends them in the buckets live
    END-OF-MESSAGE decisions spend, under the limits as configured at release."""
    text = POLICY + """\
  - name: hourly
    rate: 60/1h
    burst: 5
    key: sasl_username
    action: hold
  - name: watch-user
    rate: 1/1h
    key: sasl_username
    monitor: true
"""
    p = parse_policy(text)
    owing = (HeldSpend("hourly", "app", 1), HeldSpend("watch-user", "app", 1),
             HeldSpend("removed-since", "app", 1), HeldSpend("per-sender", "s@x.example", 1))
    held = dataclasses.replace(rec("OWING1", "transactional"), spends=owing)
    plan = plan_releases([entry("OWING1")], records(held), now_ms=NOW, lanes=p.lanes)
    _, checks = release_checks(p, plan.due[0], 1000)
    # the very buckets a live END-OF-MESSAGE decision of that user and sender spends
    live = make_plan(Request(stage="END-OF-MESSAGE", sender="s@x.example",
                             sasl_username="app", recipient_count=1, queue_id="LIVE01"),
                     p, lane=p.lane("transactional"))
    live_checks = {pl.limit.name: pl.check for pl in live.limits}
    assert checks == [
        checks_without_spends(p, "OWING1")[0],  # per-domain for r@a.example, as before
        live_checks["hourly"],
        live_checks["watch-user"],  # spent when it fits, never blocking (monitor)
        live_checks["per-sender"],
    ]
    assert not live_checks["watch-user"].blocking and live_checks["hourly"].blocking
    # a cost above the burst is capped (it would never fit); a limit whose rate changed
    # since is spent in its new buckets, as live decisions are
    big = dataclasses.replace(held, spends=(HeldSpend("hourly", "app", 9),))
    changed = parse_policy(text.replace("rate: 60/1h\n    burst: 5", "rate: 120/1h\n    burst: 5"))
    plan = plan_releases([entry("OWING1")], records(big), now_ms=NOW, lanes=changed.lanes)
    _, checks = release_checks(changed, plan.due[0], 1000)
    (hourly,) = [c for c in checks if "hourly" in c.key]
    assert (hourly.key, hourly.cost, hourly.interval_ms) == ("rl:hourly:120/3600000/5/v2:app",
                                                             5, 30_000)


def checks_without_spends(p: Policy, qid: str) -> list[BudgetCheck]:
    """The release checks of a message held with no unspent budgets."""
    plan = plan_releases([entry(qid)], records(rec(qid, "transactional")), now_ms=NOW,
                         lanes=p.lanes)
    return release_checks(p, plan.due[0], 1000)[1]


def test_release_checks_follow_destinations_and_backoff() -> None:
    p = parse_policy(POLICY + """\
destinations:
  - name: bigmail
    domains: [a.example, "*.a.example"]
    rate: 60/1m
    burst: 10
""")
    plan = plan_releases([entry("DEST01", rcpts=("x@a.example",))], records(rec("DEST01")),
                         now_ms=NOW, lanes=p.lanes)
    _, checks = release_checks(p, plan.due[0], 1000, destinations={"a.example": "bigmail"},
                               backoff={"bigmail": 0.5})
    (dest,) = [c for c in checks if c.key.startswith("rl:destination:bigmail")]
    assert dest.key.endswith(":bigmail")
    assert (dest.interval_ms, dest.burst) == (2000.0, 5)  # halved by backoff


# ---------------------------------------------------------------- load


def test_load_threshold_with_hysteresis() -> None:
    t = LoadThresholds(active=100, deferred=1000, hold_lanes=1)
    assert not load_exceeded({"active": 100, "deferred": 10}, t, False)
    assert load_exceeded({"active": 101}, t, False)
    assert load_exceeded({"active": 90}, t, True)  # not drained enough yet
    assert not load_exceeded({"active": 80}, t, True)
    assert load_exceeded({"deferred": 1001}, t, False)
    assert not load_exceeded({"incoming": 10**6}, t, False)  # not watched
    assert not load_exceeded({"active": 10**6}, LoadThresholds(), False)


def test_lanes_to_pause_never_the_highest() -> None:
    lanes = policy().lanes
    assert lanes_to_pause(lanes, 1) == frozenset({"bulk"})
    assert lanes_to_pause(lanes, 2) == frozenset({"normal", "bulk"})
    assert lanes_to_pause(lanes, 9) == frozenset({"normal", "bulk"})
    assert lanes_to_pause(lanes[:1], 1) == frozenset()


def test_summary_per_lane_and_destination() -> None:
    plan = plan_releases(
        [entry("A00001", rcpts=("x@a.example", "y@b.example")), entry("A00002"),
         entry("B00001"), entry("OPERAT")],
        records(rec("A00001", not_before=NOW + 60_000), rec("A00002"),
                rec("B00001", "bulk")),
        now_ms=NOW, lanes=policy().lanes, paused_lanes=frozenset({"bulk"}))
    summary = summarize(plan, NOW)
    lanes = {group.lane: group for group in summary.lanes}
    assert lanes["normal"].held == 2
    assert lanes["normal"].due == 1 and lanes["normal"].waiting == 1
    assert lanes["normal"].last_due_ms == NOW + 60_000
    assert lanes["bulk"].paused == 1
    assert summary.held == 3
    dests = {(g.lane, g.destination): g.held for g in summary.destinations}
    assert dests == {("normal", "a.example"): 2, ("normal", "b.example"): 1,
                     ("bulk", "a.example"): 1}
    # the JSON of `mqpolicy queue --json`
    as_json = summary.as_json()
    assert as_json["foreign"] == [{"queue_id": "OPERAT", "sender": "s@x.example",
                                   "arrival_time": 1}]
    assert as_json["lanes"][0] == {  # type: ignore[index]
        "lane": "bulk", "held": 1, "due": 0, "paused": 1, "waiting": 0,
        "next_due_ms": 0, "last_due_ms": 0, "oldest_held_ms": 9_000_000}
    assert as_json["destinations"][0] == {  # type: ignore[index]
        "lane": "bulk", "destination": "a.example", "held": 1, "due": 0, "paused": 1,
        "waiting": 0, "next_due_ms": 0, "last_due_ms": 0, "oldest_held_ms": 9_000_000}
    assert json.loads(json.dumps(as_json)) == as_json
