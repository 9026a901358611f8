"""The log parser's message lines (smtpd's client, qmgr's queued message, smtpd's
refusals), and the whole parser on mangled and interleaved lines: it never raises and
counts every line it skips."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mqpolicy.feedback.delivery_log import (
    OTHER,
    UNPARSABLE,
    DeliveryEvent,
    MessageLine,
    read_log_line,
)
from mqpolicy.feedback.log_replay import MailLog, RetrySchedule, replay
from mqpolicy.policy.loader import parse_policy
from tests.support.captured_maillog import CAPTURED, CAPTURED_OTHER
from tests.support.lanes import LANES
from tests.support.mangled_lines import mangled
from tests.support.postfix_log_writer import REFERENCE, PostfixLog


def test_smtpd_client_line_with_sasl_login() -> None:
    line = ("Dec  6 10:00:00 mta postfix/submission/smtpd[331]: 4B1C2D3E4F: "
            "client=laptop.example[2001:db8::5]:51234, sasl_method=PLAIN, "
            "sasl_username=alice@example.com")
    read = read_log_line(line, reference=REFERENCE)
    assert isinstance(read, MessageLine)
    assert (read.kind, read.queue_id, read.client_name, read.client_address,
            read.sasl_username) == ("client", "4B1C2D3E4F", "laptop.example", "2001:db8::5",
                                    "alice@example.com")


def test_captured_intake_lines() -> None:
    reads = [read_log_line(line, reference=REFERENCE) for line in CAPTURED_OTHER]
    kinds = [r.kind if isinstance(r, MessageLine) else r for r in reads]
    assert kinds == [OTHER, OTHER, OTHER, "client", OTHER, "queued", "removed", OTHER, OTHER,
                     OTHER]
    queued = reads[5]
    assert isinstance(queued, MessageLine)
    assert (queued.sender, queued.size, queued.nrcpt) == ("sender@mqpolicy.test", 342, 1)
    assert all(isinstance(read_log_line(line, reference=REFERENCE), DeliveryEvent)
               for line in CAPTURED.values())


def test_smtpd_refusal_of_a_recipient() -> None:
    line = ("Dec  6 10:00:00 mta postfix/smtpd[331]: NOQUEUE: reject: RCPT from "
            "unknown[192.0.2.1]: 450 4.7.1 <x@b.example>: Recipient address rejected: "
            "Sending rate of alice@a.example exceeded (3/1h), try again in 1200s; "
            "from=<alice@a.example> to=<x@b.example> proto=ESMTP helo=<client.example>")
    read = read_log_line(line, reference=REFERENCE)
    assert isinstance(read, MessageLine)
    assert (read.kind, read.queue_id, read.action, read.stage, read.code, read.sender,
            read.recipient, read.client_address) == (
        "refused", "NOQUEUE", "reject", "RCPT", 450, "alice@a.example", "x@b.example",
        "192.0.2.1")


def test_lines_that_are_not_log_lines_are_unparsable() -> None:
    assert read_log_line("", reference=REFERENCE) == UNPARSABLE
    assert read_log_line("hello world", reference=REFERENCE) == UNPARSABLE
    cut = "Dec  6 10:00:00 mta postfix/smtpd[331]: 4B1C2D3E4F: client=laptop[1.2"
    assert read_log_line(cut, reference=REFERENCE) == UNPARSABLE


def _real_lines() -> list[str]:
    log = PostfixLog()
    log.message(0, "alice@a.example", ["x@b.example", "y@c.example"], sasl_username="alice")
    log.refused(5, "bob@a.example", "z@b.example")
    log.message(9, "bob@a.example", ["z@b.example"], status="deferred")
    return [*log.lines, *CAPTURED.values(), *CAPTURED_OTHER]


REAL = _real_lines()


@settings(max_examples=300, deadline=None)
@given(st.lists(mangled(REAL), max_size=60))
def test_mangled_and_interleaved_lines_never_crash_and_are_counted(lines: list[str]) -> None:
    mail_log = MailLog(REFERENCE)
    facts = 0
    for line in lines:
        read = read_log_line(line, reference=REFERENCE)
        facts += not isinstance(read, str) and read.timestamp is not None
        mail_log.feed(line)
    s = mail_log.summary
    assert s.lines == len(lines)
    assert s.unparsable + s.other + s.no_time + facts == len(lines)
    assert s.unparsable == sum(read_log_line(x, reference=REFERENCE) == UNPARSABLE
                               for x in lines)
    assert len(s.unparsable_samples) == min(s.unparsable, 5)
    report = replay(parse_policy(LANES), mail_log.mails(RetrySchedule()))
    assert report.recipients == sum(t.recipients[o] for t in report.lanes.values()
                                    for o in ("accepted", "held", "rejected", "expired"))


@settings(max_examples=100, deadline=None)
@given(st.permutations(REAL))
def test_the_order_of_lines_does_not_change_the_mail(lines: list[str]) -> None:
    def mails(order: list[str]) -> list[tuple[int, str, str, tuple[str, ...]]]:
        mail_log = MailLog(REFERENCE)
        for line in order:
            mail_log.feed(line)
        return sorted((m.arrival_ms, m.sender, m.client_address, tuple(sorted(m.recipients)))
                      for m in mail_log.mails(RetrySchedule()))
    assert mails(lines) == mails(REAL)
