"""Replay from mqpolicy's own decision log (``log.decisions: all``): the lines the decision
service writes carry what a Postfix log does not (the headers the policy reads, the lane it
chose), and ``replay`` reads them back, key=value or JSON, bare or behind a syslog or
journal prefix, the lines of one transaction put together in any order.

The "live run" is the real decision service on a simulated clock, its log captured through
the real log handler; expected figures come from the policy's promise (a rate ``N/1h``
with ``burst: N`` lets N through at once)."""

from __future__ import annotations

import json
import random
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqpolicy.feedback.decision_log import (
    DecisionMessages,
    NotADecision,
    is_decision_line,
    read_decision_line,
)
from mqpolicy.feedback.log_replay import MailLog, ReplayReport, RetrySchedule, replay
from mqpolicy.policy.loader import ConfigError, parse_policy
from tests.support.decision_log_writer import POLICY, REFERENCE, START_MS, live_run
from tests.support.lanes import LANES
from tests.support.mangled_lines import mangled
from tests.support.postfix_log_writer import PostfixLog


def replayed(lines: list[str], policy_text: str = POLICY) -> ReplayReport:
    mail_log = MailLog(REFERENCE)
    for line in lines:
        mail_log.feed(line)
    schedule = RetrySchedule()
    return replay(parse_policy(policy_text), mail_log.mails(schedule), name="p",
                  schedule=schedule, summary=mail_log.summary)


def test_the_live_run_is_what_the_policy_promises() -> None:
    _, outcome = live_run()
    assert outcome == {"rcpt defer": 2, "end accept normal": 4, "end accept bulk": 3,
                       "end defer bulk": 1}


def test_every_decision_is_logged_with_the_facts_and_only_the_headers_the_policy_reads(
) -> None:
    lines, _ = live_run()
    decisions = [line for line in lines if " msg=decision " in line]
    # every RCPT (10) and every end of message (8) is logged, quiet accepts too
    assert len(decisions) == 18
    assert all(line.startswith("ts=2026-12-06T09:") for line in decisions)
    first = read_decision_line(decisions[0])
    request = first.request
    assert (request.stage, first.action, request.sender, request.recipient, request.size,
            request.helo_name, request.client_name, request.client_address) == (
        "RCPT", "accept", "alice@a.example", "r0@b.example", 2000, "app.example",
        "app.example", "192.0.2.7")
    assert request.headers is None  # a RCPT decision has no headers
    ends = [read_decision_line(x) for x in decisions if "stage=END-OF-MESSAGE" in x]
    kept = {name for end in ends for name, _ in end.request.headers or ()}
    assert kept == {"List-Id", "X-Campaign"}  # read by the conditions; Subject is not
    assert "lunch?" not in "\n".join(lines)


def test_notable_logs_only_what_changed_something_at_info() -> None:
    lines, _ = live_run(policy_text=POLICY.replace("decisions: all", "decisions: notable"))
    decisions = [line for line in lines if " msg=decision " in line]
    # the 2 deferred RCPTs and the 8 ends; the quiet RCPT accepts go to debug
    assert len(decisions) == 10
    assert all("headers=" not in line and "helo=" not in line for line in decisions)


def test_log_decisions_takes_notable_or_all() -> None:
    with pytest.raises(ConfigError, match="log.decisions: expected notable or all"):
        parse_policy(LANES + "log:\n  decisions: everything\n")
    assert parse_policy(LANES).log.decisions == "notable"


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_replay_of_the_decision_log_finds_the_lanes_the_headers_chose(fmt: str) -> None:
    lines, _ = live_run(fmt)
    report = replayed(lines)
    assert report.input.decision_lines == 18
    assert report.input.unreadable_decisions == report.input.unparsable == 0
    # the live run's lanes, read from its decisions...
    assert report.logged_lanes == {"normal": 4, "bulk": 3}
    assert report.logged == {"accepted": 7, "refused": 2, "deferred": 1}
    # ...and the replay's: every message gets in at last, in the lane its headers chose
    assert report.lanes["bulk"].messages["accepted"] == 4  # carol's 3, dave's 1
    assert report.lanes["normal"].messages["accepted"] == 6  # alice's 5, erin's 1
    # what the live run answered at the first try
    per_sender = report.limits["per-sender"]
    assert (per_sender.first_tries, per_sender.rcpt) == (2, 2)
    bulk = report.limits["bulk-per-sender"]
    assert (bulk.first_tries, bulk.end_of_message) == (1, 1)
    assert report.keys[("bulk-per-sender", "carol@c.example")] == 1


def test_a_postfix_log_alone_cannot_see_the_headers() -> None:
    """The same mail from Postfix's log: no headers, so no bulk lane and no bulk limit:
    what the decision log adds."""
    log = PostfixLog()
    for n, sender in enumerate(["alice@a.example"] * 5 + ["carol@c.example"] * 3):
        log.message(n * 60, sender, [f"r{n}@b.example"])
    report = replayed(log.lines)
    assert report.lanes["bulk"].messages["accepted"] == 0
    assert "bulk-per-sender" not in report.limits


def test_syslog_and_journal_prefixes_give_the_time() -> None:
    lines, _ = live_run()
    decisions = [line for line in lines if " msg=decision " in line]
    bare = [line.split(" ", 1)[1] for line in decisions]  # without ts=
    syslog = [f"{_syslog_time(line)} mta mqpolicy[812]: {rest}"
              for line, rest in zip(decisions, bare, strict=True)]
    journal = [f"{line[3:22]}+0000 mta mqpolicy[812]: {rest}"  # journalctl -o short-iso
               for line, rest in zip(decisions, bare, strict=True)]
    expected = replayed(lines).as_json()
    for prefixed in (syslog, journal):
        report = replayed(prefixed)
        assert report.input.decision_lines == 18
        assert report.as_json()["lanes"] == expected["lanes"]
        assert report.as_json()["limits"] == expected["limits"]
    assert read_decision_line(syslog[0], REFERENCE).ms == START_MS


def _syslog_time(line: str) -> str:
    when = datetime.fromisoformat(line[3:27])
    return f"{when:%b} {when.day:>2} {when:%H:%M:%S}"


def test_a_line_without_a_time_or_cut_is_counted_never_fatal() -> None:
    lines, _ = live_run()
    decision = next(line for line in lines if " msg=decision " in line)
    bad = [decision.split(" ", 1)[1],  # no ts, no prefix
           decision[:decision.index(" msg=decision") + 20] + ' user="unterminated',
           decision.replace("stage=RCPT", "stage=DATA")]
    mail_log = MailLog(REFERENCE)
    for line in bad:
        mail_log.feed(line)
    assert mail_log.summary.unreadable_decisions == 3
    assert len(mail_log.summary.unparsable_samples) == 3
    assert mail_log.mails(RetrySchedule()) == []


# ---------------------------------------------------------------- wiring B's lines

def _b_lines() -> list[str]:
    """One message in wiring B: the policy server's RCPTs (its instance; the first without
    a queue id), its END-OF-MESSAGE (check only, no headers), and the milter's end of
    message (its own instance, the queue id, the headers, the lane it chose)."""
    head = "level=info logger=mqpolicy.decision msg=decision"
    return [
        f"ts=2026-12-06T09:00:00.100Z {head} stage=RCPT action=accept lane=normal "
        "instance=pf.1 sender=carol@c.example rcpt=x@b.example client=192.0.2.7",
        f"ts=2026-12-06T09:00:00.200Z {head} stage=RCPT action=accept lane=normal "
        "qid=4F1A2B instance=pf.1 sender=carol@c.example rcpt=y@b.example client=192.0.2.7",
        f"ts=2026-12-06T09:00:00.300Z {head} stage=RCPT action=defer lane=normal "
        "qid=4F1A2B instance=pf.1 sender=carol@c.example rcpt=z@b.example client=192.0.2.7 "
        "by=per-domain limits=per-domain:defer:b.example",
        f"ts=2026-12-06T09:00:01.000Z {head} stage=END-OF-MESSAGE action=accept "
        "lane=normal qid=4F1A2B instance=pf.1 sender=carol@c.example nrcpt=2 size=5120",
        f"ts=2026-12-06T09:00:00.900Z {head} stage=END-OF-MESSAGE action=hold lane=bulk "
        "qid=4F1A2B instance=milter.7 sender=carol@c.example nrcpt=2 size=5120 "
        'headers="[[\\"List-Id\\", \\"<news.c.example>\\"]]"',
    ]


@settings(max_examples=60, deadline=None)
@given(st.permutations(_b_lines()))
def test_the_lines_of_one_transaction_are_one_mail_in_any_order(lines: list[str]) -> None:
    messages = DecisionMessages()
    for order, line in enumerate(lines):
        messages.add(read_decision_line(line), order)
    [message] = messages.messages()
    assert message.queue_id == "4F1A2B"
    assert message.end is not None
    # the milter's end counts: it saw the headers and chose the lane
    assert (message.end.request.instance, message.end.lane, message.end.action) == (
        "milter.7", "bulk", "hold")
    assert message.recipients == {"x@b.example": "held", "y@b.example": "held",
                                  "z@b.example": "refused defer"}
    assert message.first_ms == START_MS + 100


def test_an_end_without_rcpt_decisions_is_counted() -> None:
    mail_log = MailLog(REFERENCE)
    mail_log.feed(_b_lines()[4])  # the log starts after the RCPTs
    assert mail_log.mails(RetrySchedule()) == []
    assert mail_log.summary.no_rcpt_decisions == 1


def test_beside_a_postfix_log_the_decisions_give_the_mail() -> None:
    lines, _ = live_run()
    log = PostfixLog()
    log.message(0, "zoe@z.example", ["q@b.example"])
    report = replayed(lines + log.lines)
    assert report.mails == 10  # the decision log's; Postfix's message is not counted twice
    assert report.input.mail_log_messages_ignored == 1


# ---------------------------------------------------------------- hostile lines

def _real() -> list[str]:
    lines, _ = live_run()
    json_lines, _ = live_run("json")
    return lines[:8] + json_lines[:8] + _b_lines()


REAL = _real()


@settings(max_examples=300, deadline=None)
@given(st.lists(mangled(REAL, [" msg=decision", '"msg": "decision"', ""]), max_size=40))
def test_mangled_decision_lines_never_crash_and_are_counted(lines: list[str]) -> None:
    mail_log = MailLog(REFERENCE)
    readable = 0
    for line in lines:
        if is_decision_line(line):
            try:
                read_decision_line(line, REFERENCE)
                readable += 1
            except NotADecision:
                pass
        mail_log.feed(line)
    s = mail_log.summary
    assert s.lines == len(lines)
    assert s.decision_lines == readable
    assert s.decision_lines + s.unreadable_decisions == sum(map(is_decision_line, lines))
    report = replay(parse_policy(POLICY), mail_log.mails(RetrySchedule()))
    assert report.recipients == sum(t.recipients[o] for t in report.lanes.values()
                                    for o in ("accepted", "held", "rejected", "expired"))


def test_shuffled_files_give_the_same_replay() -> None:
    lines, _ = live_run()
    shuffled = list(lines)
    random.Random(7).shuffle(shuffled)
    assert (json.dumps(replayed(shuffled).as_json()["lanes"])
            == json.dumps(replayed(lines).as_json()["lanes"]))


def _b_message(minute: int, instance: str, milter: str, rcpt: str) -> list[str]:
    """Wiring B's lines of one list message from carol, queue id 4F1A2B, at 09:``minute``."""
    head = "level=info logger=mqpolicy.decision msg=decision"
    ts = f"2026-12-06T09:{minute:02d}:00"
    return [
        f"{ts}.100Z {head} stage=RCPT action=accept lane=normal instance={instance} "
        f"sender=carol@c.example rcpt={rcpt} client=192.0.2.7",
        f"{ts}.800Z {head} stage=END-OF-MESSAGE action=accept lane=normal qid=4F1A2B "
        f"instance={instance} sender=carol@c.example nrcpt=1 size=5120",
        f"{ts}.900Z {head} stage=END-OF-MESSAGE action=accept lane=bulk qid=4F1A2B "
        f"instance={milter} sender=carol@c.example nrcpt=1 size=5120 "
        'headers="[[\\"List-Id\\", \\"<news.c.example>\\"]]"',
    ]


def test_a_queue_id_postfix_used_again_names_two_messages() -> None:
    """Postfix reuses a queue id once its message is gone: two transactions five minutes
    apart with one queue id are two mails, each with its own milter end, and the replay counts
    each (a queue id of its own per try: the second is no duplicate of the first)."""
    lines = [f"ts={line}" for line in (_b_message(0, "pf.1", "milter.1", "x@b.example")
                                       + _b_message(5, "pf.2", "milter.2", "y@b.example"))]
    messages = DecisionMessages()
    for order, line in enumerate(reversed(lines)):
        messages.add(read_decision_line(line), order)
    found = sorted(messages.messages(), key=lambda m: m.first_ms)
    assert [(m.rcpts[0].request.recipient, m.end.request.instance if m.end else "")
            for m in found] == [
        ("x@b.example", "milter.1"), ("y@b.example", "milter.2")]
    once_a_day = LANES + """\
classify:
  - {name: lists, when: {bulk_signals: true}, lane: bulk}
limits:
  - {name: bulk-daily, rate: 1/1d, burst: 1, key: sender, count: messages, lanes: [bulk],
     action: defer}
"""
    report = replayed(lines, once_a_day)
    assert report.limits["bulk-daily"].first_tries == 1  # the second message, at 09:05
    assert report.lanes["bulk"].messages["deferred"] == 1
