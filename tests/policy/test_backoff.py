"""The backoff controller: decrease, cooldown, floor, stepwise recovery, no flapping."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqpolicy.policy.backoff import (
    MAX_EVIDENCE,
    BackoffChange,
    BackoffSettings,
    BackoffState,
    on_slow_down,
    on_success,
    scale_budget,
)


class BackoffController:
    """The states of several destinations driven through the pure steps (``on_slow_down``,
    ``on_success``) as the feedback process drives them through its store: a test harness.

    Destinations that are not backed off and have no history need no entry: a missing
    entry is the default state (the feedback service keeps none either:
    ``test_destinations.test_success_of_a_destination_never_backed_off_writes_nothing``).
    """

    def __init__(
        self, settings: BackoffSettings | None = None,
        states: Mapping[str, BackoffState] | None = None,
    ) -> None:
        self.settings = settings or BackoffSettings()
        self._states: dict[str, BackoffState] = dict(states or {})

    def state(self, destination: str) -> BackoffState:
        return self._states.get(destination, BackoffState())

    def factor(self, destination: str) -> float:
        return self.state(destination).factor

    def slow_down(
        self, destination: str, now_ms: int, reason: str, evidence: str = ""
    ) -> BackoffChange | None:
        new, change = on_slow_down(self.state(destination), self.settings, now_ms, reason,
                                   evidence, destination)
        self._states[destination] = new
        return change

    def success(self, destination: str, now_ms: int, evidence: str = "") -> BackoffChange | None:
        old = self._states.get(destination)
        if old is None:
            return None  # never backed off: nothing to count
        new, change = on_success(old, self.settings, now_ms, evidence, destination)
        self._states[destination] = new
        return change

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {d: s.to_dict() for d, s in self._states.items()}

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Mapping[str, Any]], settings: BackoffSettings | None = None
    ) -> BackoffController:
        """States ``to_dict`` wrote; an entry that is not a state raises ValueError."""
        return cls(settings, {str(d): BackoffState.from_dict(s) for d, s in data.items()})


S = BackoffSettings(decrease=0.5, min_factor=0.1, cooldown_ms=60_000, recover_step=0.1,
                    recover_after=3, recover_interval_ms=300_000)
LINE = ("Nov 27 20:52:09 mta postfix/smtp[368]: B084820C4AA: to=<u@gmail.com>, ... "
        "status=deferred (host gmail-smtp-in.l.google.com[142.250.1.26] said: 421-4.7.28 ...)")
MIN = 60_000


def test_defaults_are_valid() -> None:
    d = BackoffSettings()
    assert 0 < d.decrease < 1 and d.min_factor <= 1 and d.recover_after >= 1


def test_slow_down_decreases_and_keeps_the_evidence() -> None:
    c = BackoffController(S)
    change = c.slow_down("google", 1_000, "gmail-unusual-rate", LINE)
    assert change is not None
    assert (change.destination, change.kind, change.old_factor, change.new_factor) == (
        "google", "decrease", 1.0, 0.5,
    )
    assert (change.reason, change.evidence, change.at_ms) == ("gmail-unusual-rate", LINE, 1_000)
    assert change.log_fields()["evidence"] == LINE
    assert c.factor("google") == 0.5
    state = c.state("google")
    assert (state.reason, state.evidence, state.last_decrease_ms) == (
        "gmail-unusual-rate", LINE, 1_000,
    )
    assert c.factor("yahoo") == 1.0  # other destinations are untouched


def test_a_burst_of_deferrals_counts_once_per_cooldown() -> None:
    c = BackoffController(S)
    changes = [c.slow_down("google", 1_000 + i * 100, "smtp-421", f"line {i}") for i in range(50)]
    assert [ch for ch in changes if ch is not None] == [changes[0]]
    assert c.factor("google") == 0.5
    assert c.state("google").evidence == "line 49"  # the latest evidence is kept
    # the cooldown counts from the decrease, not from the latest deferral
    assert c.slow_down("google", 1_000 + MIN - 1, "smtp-421") is None
    change = c.slow_down("google", 1_000 + MIN, "smtp-421", "again")
    assert change is not None and (change.old_factor, change.new_factor) == (0.5, 0.25)


def test_floor() -> None:
    c = BackoffController(S)
    factors = []
    for i in range(10):
        c.slow_down("google", i * MIN, "smtp-421")
        factors.append(c.factor("google"))
    assert factors == [0.5, 0.25, 0.125, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    # at the floor nothing changes, so nothing is reported
    assert c.slow_down("google", 20 * MIN, "smtp-421") is None


def test_recovery_is_stepwise_and_waits_for_both_conditions() -> None:
    c = BackoffController(S)
    c.slow_down("google", 0, "smtp-421")
    assert c.factor("google") == 0.5
    # enough successes, but too early
    for t in range(1, 10):
        assert c.success("google", t * 1000) is None
    assert c.state("google").successes == 9
    # late enough: the next success steps up once
    change = c.success("google", 300_000, "250 2.0.0 OK")
    assert change is not None
    assert (change.kind, change.old_factor, change.new_factor) == ("recover", 0.5, 0.6)
    assert change.evidence == "250 2.0.0 OK"
    assert c.state("google").successes == 0
    # the next step needs recover_after successes again AND the interval since this change
    for t in range(1, 10):
        assert c.success("google", 300_000 + t) is None
    assert c.success("google", 600_000 - 1) is None
    change = c.success("google", 600_000)
    assert change is not None and change.new_factor == 0.7


def test_recovery_needs_consecutive_successes() -> None:
    c = BackoffController(S)
    c.slow_down("google", 0, "smtp-421")
    t = 1_000_000  # long after: only the count matters now
    assert c.success("google", t) is None
    assert c.success("google", t + 1) is None
    assert c.slow_down("google", t + 2, "smtp-421") is not None  # cooldown long over
    assert c.factor("google") == 0.25
    # a slow-down inside a cooldown still breaks the run of successes
    assert c.success("google", t + 3) is None
    assert c.slow_down("google", t + 4, "smtp-421") is None
    assert c.state("google").successes == 0


def test_full_recovery_returns_to_the_neutral_state() -> None:
    c = BackoffController(S)
    c.slow_down("google", 0, "smtp-421")  # 0.5
    t, steps = 0, []
    while c.factor("google") < 1.0:
        t += 300_000
        for i in range(3):
            change = c.success("google", t + i)
            if change is not None:
                steps.append(change.new_factor)
    assert steps == [0.6, 0.7, 0.8, 0.9, 1.0]
    assert c.state("google") == BackoffState(last_change_ms=t + 2)
    assert not c.state("google").backed_off


def test_no_flapping_under_alternating_events() -> None:
    c = BackoffController(S)
    changes = []
    for i in range(200):
        t = i * 30_000  # one event every 30 s for 100 minutes
        if i % 2:
            changes.append(c.success("google", t, f"ok {i}"))
        else:
            changes.append(c.slow_down("google", t, "smtp-421", f"421 {i}"))
    made = [ch for ch in changes if ch is not None]
    assert len(made) >= 2  # a few decreases happened (the checks below are over them)
    assert all(ch.kind == "decrease" for ch in made)  # never climbs back meanwhile
    # decreases are at least a cooldown apart
    times = [ch.at_ms for ch in made]
    assert all(b - a >= S.cooldown_ms for a, b in itertools.pairwise(times))
    assert c.factor("google") == S.min_factor


def test_out_of_order_events() -> None:
    c = BackoffController(S)
    assert c.slow_down("google", 500_000, "smtp-421") is not None
    # an older line (another delivery agent, a replayed log) is inside the cooldown
    assert c.slow_down("google", 10_000, "smtp-421") is None
    assert c.factor("google") == 0.5
    assert c.state("google").last_slow_down_ms == 500_000
    for i in range(5):  # successes stamped before the change do not make time pass
        assert c.success("google", 400_000 + i) is None


def test_state_round_trip() -> None:
    c = BackoffController(S)
    c.slow_down("google", 1_000, "gmail-unusual-rate", LINE)
    c.success("google", 2_000)
    c.slow_down("yahoo", 3_000, "yahoo-deferred", "x")
    data = json.loads(json.dumps(c.to_dict()))  # what a store would keep
    again = BackoffController.from_dict(data, S)
    assert again.to_dict() == c.to_dict()
    assert again.state("google") == c.state("google")
    assert again.slow_down("google", 1_000 + MIN - 1, "smtp-421") is None  # cooldown kept


@pytest.mark.parametrize(
    "data",
    [
        {"factor": 0},
        {"factor": 1.5},
        {"factor": "nan"},
        {"factor": "x"},
        {"successes": -1},
        {"last_decrease_ms": "soon"},
        [],
    ],
)
def test_bad_state_is_rejected(data: Any) -> None:
    with pytest.raises(ValueError, match="not a backoff state"):
        BackoffState.from_dict(data)


def test_evidence_is_bounded() -> None:
    state, change = on_slow_down(BackoffState(), S, 0, "smtp-421", "x" * 10_000)
    assert change is not None
    assert len(change.evidence) == len(state.evidence) == MAX_EVIDENCE
    assert len(BackoffState.from_dict({"evidence": "y" * 10_000}).evidence) == MAX_EVIDENCE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decrease": 1.0}, "decrease"),
        ({"decrease": 0}, "decrease"),
        ({"min_factor": 0}, "min_factor"),
        ({"min_factor": 1.1}, "min_factor"),
        ({"recover_step": 0}, "recover_step"),
        ({"recover_after": 0}, "recover_after"),
        ({"cooldown_ms": -1}, "cooldown"),
        ({"recover_interval_ms": -1}, "recover_interval"),
    ],
)
def test_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BackoffSettings(**kwargs)


def test_pure_functions_do_not_touch_their_input() -> None:
    state = BackoffState()
    new, _ = on_slow_down(state, S, 0, "smtp-421")
    assert state == BackoffState() and new.factor == 0.5
    after, _ = on_success(new, S, 1)
    assert new.successes == 0 and after.successes == 1


def test_scale_budget() -> None:
    # 300/min is one per 200 ms, burst 50
    assert scale_budget(200.0, 50, 1.0) == (200.0, 50)
    assert scale_budget(200.0, 50, 0.5) == (400.0, 25)
    assert scale_budget(200.0, 50, 0.01) == (20_000.0, 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=10_000)),
                max_size=300))
def test_factor_stays_in_bounds_and_changes_are_consistent(
    events: list[tuple[bool, int]]
) -> None:
    state, t = BackoffState(), 0
    for slow, gap in events:
        t += gap * 100
        before = state.factor
        if slow:
            state, change = on_slow_down(state, S, t, "smtp-421")
        else:
            state, change = on_success(state, S, t)
        assert S.min_factor <= state.factor <= 1.0
        if change is None:
            assert state.factor == before
        else:
            assert (change.old_factor, change.new_factor) == (before, state.factor)
            assert (change.kind == "decrease") == (change.new_factor < change.old_factor)


def test_feedback_pipeline_from_a_rotated_postfix_log(tmp_path: Any) -> None:
    """Lines captured from Postfix, followed through a rotation, parsed, classified and
    fed to the controller with the recipient domain as the destination."""
    from datetime import UTC, datetime

    from mqpolicy.feedback.delivery_log import parse_delivery_line, slow_down_reason
    from mqpolicy.feedback.log_follower import LogFollower
    from tests.support.captured_maillog import CAPTURED, CAPTURED_OTHER

    log = tmp_path / "maillog"
    log.write_text("")
    reference = datetime(2026, 11, 28, tzinfo=UTC)
    c = BackoffController(S)
    changes = []

    def feed(follower: LogFollower) -> None:
        for line in follower.poll():
            event = parse_delivery_line(line, reference=reference)
            if event is None or event.timestamp is None:
                continue
            now_ms = int(event.timestamp.timestamp() * 1000)
            reason = slow_down_reason(event)
            if reason is not None:
                changes.append(c.slow_down(event.domain, now_ms, reason, event.line))
            elif event.status == "sent":
                changes.append(c.success(event.domain, now_ms, event.line))

    with LogFollower(log) as follower:
        feed(follower)
        with log.open("a") as fh:
            fh.write("\n".join([*CAPTURED_OTHER[:4], CAPTURED["gmail_421"], CAPTURED["sent"]]))
            fh.write("\n")
        feed(follower)
        log.rename(tmp_path / "maillog.1")
        with log.open("a") as fh:
            fh.write("\n".join([CAPTURED["yahoo_421"], CAPTURED["gmail_421"],
                                CAPTURED["refused"], CAPTURED["bounced"]]) + "\n")
        for _ in range(3):
            feed(follower)
    made = [ch for ch in changes if ch is not None]
    assert [(ch.destination, ch.kind, ch.new_factor) for ch in made] == [
        ("gmail.test", "decrease", 0.5),
        ("yahoo.test", "decrease", 0.5),
    ]
    assert made[0].evidence == CAPTURED["gmail_421"]
    assert c.state("gmail.test").successes == 0  # the second 421 came after the success
