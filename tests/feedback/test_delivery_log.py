"""Parsing Postfix delivery results and recognising "slow down" replies.

``CAPTURED`` lines are verbatim from a private Postfix 3.7.11 (``maillog_file``) relaying
to a local SMTP server that answered with the providers' texts; the other lines are the
same shapes as seen in syslog files (RFC 3339 stamps, real relay names, custom
``syslog_name``), written out by hand.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqpolicy.feedback.delivery_log import (
    DeliveryEvent,
    collapse_reply,
    compile_patterns,
    parse_delivery_line,
    parse_delivery_lines,
    slow_down_reason,
)
from tests.support.captured_maillog import CAPTURED, CAPTURED_OTHER

REF = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


# Hand-written lines in the shapes syslog files show.
ISO_GMAIL = (
    "2026-11-27T20:31:02.123456+00:00 mail1 postfix/mq-bulk/smtp[123]: 4XyZ1k2LmNz7Qp: "
    "to=<Alice.Smith@GMail.com>, orig_to=<alice@lists.example.org>, "
    "relay=gmail-smtp-in.l.google.com[142.250.102.27]:25, delay=1.4, "
    "delays=0.1/0/0.7/0.6, dsn=4.7.28, status=deferred (host "
    "gmail-smtp-in.l.google.com[142.250.102.27] said: 421-4.7.28 [203.0.113.5      15] "
    "Our system has detected an unusual rate of 421-4.7.28 unsolicited mail originating "
    "from your IP address. 421 4.7.28 https://support.google.com/mail/?p=UnsolicitedRateLimitError "
    "d2e1a72fcca58-7a1si1.123 - gsmtp (in reply to end of DATA command))"
)
ISO_YAHOO = (
    "2026-11-27T21:00:00+01:00 mail1 postfix-bulk/smtp[9]: 3F2A1B0C: "
    "to=<bob@yahoo.com>, relay=mta7.am0.yahoodns.net[67.195.204.72]:25, delay=0.5, "
    "delays=0/0/0.4/0, dsn=4.7.0, status=deferred (host mta7.am0.yahoodns.net"
    "[67.195.204.72] refused to talk to me: 421 4.7.0 [TS03] All messages from "
    "203.0.113.5 will be permanently deferred; Retrying will NOT succeed. See "
    "https://postmaster.yahooinc.com/error-codes)"
)


def parse(line: str, reference: datetime | None = REF) -> DeliveryEvent:
    event = parse_delivery_line(line, reference=reference)
    assert event is not None, line
    return event


# ---------------------------------------------------------------- parsing


def test_sent() -> None:
    e = parse(CAPTURED["sent"])
    assert e.status == "sent"
    assert e.timestamp == datetime(2026, 11, 27, 20, 52, 9, tzinfo=UTC)
    assert (e.host, e.service, e.pid, e.program, e.syslog_name) == (
        "mta", "postfix/smtp", 368, "smtp", "postfix",
    )
    assert e.queue_id == "AD7D120D033"
    assert (e.recipient, e.domain, e.orig_recipient) == ("ok@gmail.test", "gmail.test", "")
    assert (e.relay, e.relay_host) == ("127.0.0.1[127.0.0.1]:53003", "127.0.0.1")
    assert e.dsn == "2.0.0"
    assert e.reply_code == 250
    assert e.reply == "250 2.0.0 OK  1732739462 a1-20020a05600000001si123456wrx.123 - gsmtp"
    assert e.line == CAPTURED["sent"]
    assert slow_down_reason(e) is None


def test_deferred_with_multiline_421() -> None:
    e = parse(CAPTURED["gmail_421"])
    assert (e.status, e.dsn, e.reply_code) == ("deferred", "4.7.28", 421)
    assert e.reply.startswith("421-4.7.28 [192.0.2.10      15] Our system has detected")
    assert e.reply.endswith("review our Bulk Email Senders Guidelines. a1si123.456 - gsmtp")
    assert "in reply to" not in e.reply
    # the joined continuation prefixes are gone from the message: phrases read whole
    assert "has been temporarily rate limited. Please visit" in e.message
    assert "421" not in e.message and "4.7.28" not in e.message
    assert slow_down_reason(e) == "gmail-unusual-rate"


def test_bounced_with_parentheses_inside_the_reply() -> None:
    e = parse(CAPTURED["bounced"])
    assert (e.status, e.dsn, e.reply_code) == ("bounced", "5.1.1", 550)
    assert e.reply.endswith("unnecessary spaces. (user (x) unknown) a1si - gsmtp")
    assert slow_down_reason(e) is None


def test_quoted_local_part() -> None:
    e = parse(CAPTURED["odd_quoting"])
    assert (e.recipient, e.domain, e.status) == ('"odd user"@odd.test', "odd.test", "sent")


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ('"odd user"@example.com', "example.com"),
        ('"a>b, status=sent (x)"@Example.COM', "example.com"),
        ('"a@b"@example.com', "example.com"),
        ('"a\\"b>c"@example.com', "example.com"),
        ("user@[192.0.2.1]", "[192.0.2.1]"),
        ("user@example.com.", "example.com"),
    ],
)
def test_awkward_addresses(address: str, domain: str) -> None:
    line = (
        f"Nov 27 20:52:09 mta postfix/smtp[1]: 4ABCD1234: to=<{address}>, "
        f"orig_to=<{address}>, relay=mx.example.com[192.0.2.25]:25, delay=1, "
        "delays=0/0/0/1, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 123)"
    )
    e = parse(line)
    assert (e.recipient, e.orig_recipient, e.domain) == (address, address, domain)
    assert e.status == "sent"


def test_custom_syslog_names() -> None:
    bulk = parse(CAPTURED["bulk_sent"])
    assert (bulk.service, bulk.syslog_name, bulk.program) == (
        "postfix/mq-bulk/smtp", "postfix/mq-bulk", "smtp",
    )
    yahoo = parse(ISO_YAHOO)
    assert (yahoo.service, yahoo.program) == ("postfix-bulk/smtp", "smtp")


def test_transport_from_the_syslog_name() -> None:
    """The master.cf service that delivered: the lane's transport when its service has its
    own syslog_name (postfix-config's ``-o syslog_name=postfix/<transport>``)."""
    assert parse(CAPTURED["bulk_sent"]).transport == "mq-bulk"
    assert parse(CAPTURED["sent"]).transport == "smtp"
    assert parse(CAPTURED["discard"]).transport == "discard"
    assert parse(ISO_YAHOO).transport == "smtp"  # another instance's smtp: postfix-bulk/smtp


def test_remote_queue_id_from_the_reply() -> None:
    """The receiving server's queue id, when its 250 reply names one (``queued as ID``, as
    Postfix and the lab's sink answer): what ties a message received there to this line."""
    line = ("Nov 27 20:52:09 mta postfix/mq-bulk/smtp[378]: C05C920D26E: to=<ok@bulk.test>, "
            "relay=127.0.0.1[127.0.0.1]:53003, delay=0.09, delays=0/0.08/0/0, dsn=2.0.0, "
            "status=sent (250 2.0.0 Ok: queued as S000017)")
    assert parse(line).remote_queue_id == "S000017"
    assert parse(CAPTURED["sent"]).remote_queue_id == ""  # Gmail's reply names none
    assert parse(CAPTURED["gmail_421"]).remote_queue_id == ""


def test_rfc3339_timestamps_and_orig_to() -> None:
    e = parse(ISO_GMAIL, reference=None)
    assert e.timestamp == datetime(2026, 11, 27, 20, 31, 2, 123456, tzinfo=UTC)
    assert e.host == "mail1"
    assert e.queue_id == "4XyZ1k2LmNz7Qp"  # long queue ids
    assert (e.recipient, e.domain) == ("Alice.Smith@GMail.com", "gmail.com")
    assert e.orig_recipient == "alice@lists.example.org"
    assert e.relay_host == "gmail-smtp-in.l.google.com"
    assert slow_down_reason(e) == "gmail-unusual-rate"
    y = parse(ISO_YAHOO, reference=None)
    assert y.timestamp == datetime(2026, 11, 27, 20, 0, tzinfo=UTC)
    assert y.timestamp is not None and y.timestamp.utcoffset() == timedelta(hours=1)
    assert y.reply.startswith("421 4.7.0 [TS03] All messages")
    assert slow_down_reason(y) == "yahoo-deferred"


@pytest.mark.parametrize(
    "stamp",
    ["2026-11-27T20:31:02Z", "2026-11-27T20:31:02+0000", "2026-11-27T20:31:02.5+00:00"],
)
def test_rfc3339_variants(stamp: str) -> None:
    line = CAPTURED["sent"].replace("Nov 27 20:52:09", stamp)
    e = parse(line, reference=None)
    assert e.timestamp is not None
    assert e.timestamp.replace(microsecond=0) == datetime(2026, 11, 27, 20, 31, 2, tzinfo=UTC)


def test_syslog_timestamps_need_a_reference_for_the_year() -> None:
    assert parse(CAPTURED["sent"], reference=None).timestamp is None
    # December's lines read early in January belong to the year before
    january = datetime(2027, 1, 2, tzinfo=UTC)
    dec = CAPTURED["sent"].replace("Nov 27", "Dec 31")
    assert parse(dec, reference=january).timestamp == datetime(2026, 12, 31, 20, 52, 9, tzinfo=UTC)
    # single-digit days are padded with a space; the reference's zone is used
    cet = timezone(timedelta(hours=1))
    line = CAPTURED["sent"].replace("Nov 27", "Mar  3")
    assert parse(line, reference=datetime(2026, 3, 3, 22, 0, tzinfo=cet)).timestamp == datetime(
        2026, 3, 3, 20, 52, 9, tzinfo=cet
    )
    # Feb 29 exists only in leap years
    leap = CAPTURED["sent"].replace("Nov 27", "Feb 29")
    assert parse(leap, reference=datetime(2029, 3, 1, tzinfo=UTC)).timestamp == datetime(
        2028, 2, 29, 20, 52, 9, tzinfo=UTC
    )


def test_replies_without_a_remote_server() -> None:
    refused = parse(CAPTURED["refused"])
    assert (refused.status, refused.relay_host, refused.reply_code) == ("deferred", "", None)
    assert refused.reply == "connect to 127.0.0.1[127.0.0.1]:50587: Connection refused"
    assert slow_down_reason(refused) is None
    discard = parse(CAPTURED["discard"])
    assert (discard.program, discard.status, discard.reply, discard.reply_code) == (
        "discard", "sent", "discard.test", None,
    )


def test_greeting_refused() -> None:
    e = parse(CAPTURED["greeting_421"])
    assert e.reply_code == 421
    assert e.reply.startswith("421 4.7.0 mx.test Service unavailable, too many connections")
    assert slow_down_reason(e) == "smtp-421"


@pytest.mark.parametrize(
    ("line", "status", "program", "recipient", "code"),
    [
        (  # local delivery
            "Nov 27 20:52:09 mta postfix/local[4242]: 5D3E21A0: to=<root@mta.example.com>, "
            "orig_to=<postmaster>, relay=local, delay=0.02, delays=0/0/0/0.01, dsn=2.0.0, "
            "status=sent (delivered to mailbox)",
            "sent", "local", "root@mta.example.com", None,
        ),
        (  # local bounce
            'Nov 27 20:52:09 mta postfix/local[4242]: 5D3E21A0: to=<nobody@mta.example.com>, '
            'relay=local, delay=0.02, delays=0/0/0/0.01, dsn=5.1.1, status=bounced (unknown '
            'user: "nobody")',
            "bounced", "local", "nobody@mta.example.com", None,
        ),
        (  # LMTP over a unix socket
            "Nov 27 20:52:09 mta postfix/lmtp[77]: 5D3E21A0: to=<u@example.com>, "
            "relay=mx.example.com[private/dovecot-lmtp], delay=0.1, delays=0/0/0/0.1, "
            "dsn=2.0.0, status=sent (250 2.0.0 <u@example.com> kGlnAo0+R2ZzWQAA Saved)",
            "sent", "lmtp", "u@example.com", 250,
        ),
        (  # soft_bounce = yes
            "Nov 27 20:52:09 mta postfix/smtp[1]: 5D3E21A0: to=<u@example.com>, "
            "relay=mx.example.com[192.0.2.25]:25, delay=1, delays=0/0/0/1, dsn=5.1.1, "
            "status=SOFTBOUNCE (host mx.example.com[192.0.2.25] said: 550 5.1.1 no such user "
            "(in reply to RCPT TO command))",
            "deferred", "smtp", "u@example.com", 550,
        ),
        (  # the queue manager repeats an earlier result for a dead destination
            "Nov 27 20:52:09 mta postfix/qmgr[328]: 5D3E21A0: to=<u@yahoo.com>, relay=none, "
            "delay=300, delays=300/0/0/0, dsn=4.7.0, status=deferred (delivery temporarily "
            "suspended: host mta5.am0.yahoodns.net[98.136.96.75] refused to talk to me: 421 "
            "4.7.0 [TSS04] Messages from 203.0.113.5 temporarily deferred due to unexpected "
            "volume or user complaints)",
            "deferred", "qmgr", "u@yahoo.com", 421,
        ),
        (  # message-level expiry has no recipient
            "Nov 27 20:52:09 mta postfix/qmgr[328]: 5D3E21A0: from=<s@example.com>, "
            "status=expired, returned to sender",
            "expired", "qmgr", "", None,
        ),
    ],
)
def test_other_delivery_agents(
    line: str, status: str, program: str, recipient: str, code: int | None
) -> None:
    e = parse(line)
    assert (e.status, e.program, e.recipient, e.reply_code) == (status, program, recipient, code)


def test_suspended_deferral_still_names_the_cause() -> None:
    line = (
        "Nov 27 20:52:09 mta postfix/qmgr[328]: 5D3E21A0: to=<u@yahoo.com>, relay=none, "
        "delay=300, delays=300/0/0/0, dsn=4.7.0, status=deferred (delivery temporarily "
        "suspended: host mta5.am0.yahoodns.net[98.136.96.75] refused to talk to me: 421 "
        "4.7.0 [TSS04] Messages from 203.0.113.5 temporarily deferred)"
    )
    e = parse(line)
    assert e.suspended
    assert e.reply.startswith("421 4.7.0 [TSS04]")  # the remote words, not Postfix's
    assert slow_down_reason(e) == "yahoo-deferred"
    expired = parse(
        "Nov 27 20:52:09 mta postfix/qmgr[328]: 5D3E21A0: from=<s@example.com>, "
        "status=expired, returned to sender"
    )
    assert (expired.domain, expired.reply, slow_down_reason(expired)) == (
        "", "returned to sender", None,
    )


def test_line_cut_short_by_syslog() -> None:
    cut = CAPTURED["gmail_421"][:400]
    e = parse(cut)
    assert (e.status, e.reply_code) == ("deferred", 421)
    assert e.reply.startswith("421-4.7.28")
    assert slow_down_reason(e) == "gmail-unusual-rate"


@pytest.mark.parametrize("line", CAPTURED_OTHER)
def test_captured_non_delivery_lines(line: str) -> None:
    assert parse_delivery_line(line, reference=REF) is None


@pytest.mark.parametrize(
    "line",
    [
        "",
        "garbage",
        "status=sent",
        "Nov 27 20:52:09 mta postfix/smtp[1]: 4ABCD1234: to=<u@example.com>, relay=x",
        # verification probes are not deliveries
        "Nov 27 20:52:09 mta postfix/smtp[1]: 4ABCD1234: to=<u@example.com>, relay=mx[192.0.2.1]:25, "
        "delay=1, delays=0/0/0/1, dsn=2.1.5, status=deliverable (250 2.1.5 Ok)",
        # an unterminated address
        "Nov 27 20:52:09 mta postfix/smtp[1]: 4ABCD1234: to=<\"u@example.com, relay=x, status=sent (250 ok)",
        # not Postfix: a program without a syslog_name/daemon path
        "Nov 27 20:52:09 mta sm-mta[1]: 4ABCD1234: to=<u@example.com>, relay=x, status=sent (250 ok)",
        # the status text is not at the end of the fields
        "Nov 27 20:52:09 mta postfix/smtp[1]: 4ABCD1234: to=<u@example.com>, status=sent junk",
        # smtpd rejects look a bit alike
        "Nov 27 20:52:09 mta postfix/smtpd[1]: NOQUEUE: reject: RCPT from unknown[192.0.2.9]: "
        "450 4.7.1 <u@example.com>: Recipient address rejected: try again later; "
        "from=<s@example.com> to=<u@example.com> proto=ESMTP helo=<x>",
        "Nov 27 20:52:09 mta postfix/smtp[1]: warning: TLS library problem: error:0A000126",
        "Xyz 27 20:52:09 mta postfix/smtp[1]: 4ABCD1234: to=<u@example.com>, relay=x, dsn=2.0.0, status=sent (250 ok)",
        "Nov 27 20:52:09 mta postfix/smtp[1]: 4ABCD1234: to=<u@example.com>, " + "x=" * 20000,
    ],
)
def test_not_delivery_results(line: str) -> None:
    assert parse_delivery_line(line, reference=REF) is None


def test_unknown_month_with_a_reference_is_not_a_crash() -> None:
    # "Xyz" is no month: with or without a reference the line is ignored
    line = "Xyz 27 20:52:09 mta postfix/smtp[1]: 4ABCD1234: to=<u@e.com>, dsn=2.0.0, status=sent (250 ok)"
    assert parse_delivery_line(line, reference=None) is None
    assert parse_delivery_line(line, reference=REF) is None


def test_parse_many_lines() -> None:
    lines = [*CAPTURED.values(), *CAPTURED_OTHER]
    events = list(parse_delivery_lines(lines, reference=REF))
    assert len(events) == len(CAPTURED)
    assert {e.status for e in events} == {"sent", "deferred", "bounced"}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_never_raises_on_garbage(text: str) -> None:
    parse_delivery_line(text, reference=REF)
    parse_delivery_line("Nov 27 20:52:09 mta postfix/smtp[1]: 4ABCD1234: to=<" + text, reference=REF)
    parse_delivery_line(
        "2026-11-27T20:52:09Z mta postfix/smtp[1]: 4ABCD1234: to=<a@b>, status=deferred (" + text
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(CAPTURED["gmail_421"])))
def test_any_prefix_of_a_line_is_safe(cut: int) -> None:
    event = parse_delivery_line(CAPTURED["gmail_421"][:cut], reference=REF)
    assert event is None or event.status == "deferred"
    if cut == len(CAPTURED["gmail_421"]):  # the whole line is a deferral
        assert event is not None


# ---------------------------------------------------------------- slow down


def deferred(reply: str, dsn: str = "4.0.0", status: str = "deferred") -> DeliveryEvent:
    line = (
        "Nov 27 20:52:09 mta postfix/smtp[1]: 4ABCD1234: to=<u@example.com>, "
        f"relay=mx.example.com[192.0.2.25]:25, delay=1, delays=0/0/0/1, dsn={dsn}, "
        f"status={status} (host mx.example.com[192.0.2.25] said: {reply} "
        "(in reply to RCPT TO command))"
    )
    return parse(line)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("gmail_421", "gmail-unusual-rate"),
        ("yahoo_421", "yahoo-deferred"),
        ("microsoft_451", "microsoft-rate-limited"),
        ("greeting_421", "smtp-421"),
        ("mailbox_busy", None),  # one busy mailbox, not the destination
        ("refused", None),
        ("bounced", None),
        ("sent", None),
        ("discard", None),
    ],
)
def test_slow_down_on_captured_lines(key: str, reason: str | None) -> None:
    assert slow_down_reason(parse(CAPTURED[key])) == reason


@pytest.mark.parametrize(
    ("reply", "dsn", "reason"),
    [
        ("421 4.7.0 Try again later, closing connection.", "4.7.0", "smtp-421"),
        ("421 Too many concurrent SMTP connections", "4.0.0", "smtp-421"),
        ("450 4.7.28 Gmail has detected an unusual rate of unsolicited mail", "4.7.28", "gmail-unusual-rate"),
        ("451 4.7.1 [TS01] Messages from 203.0.113.5 temporarily deferred due to user complaints",
         "4.7.1", "yahoo-deferred"),
        ("451 4.7.500 Server busy. Please try again later from [203.0.113.5]. (S3150)", "4.7.500",
         "microsoft-rate-limited"),
        ("452 4.7.0 too many connections from your host", "4.7.0", "too-many-connections"),
        ("450 4.7.1 Message rate limit exceeded for 203.0.113.5", "4.7.1", "rate-limited"),
        ("451 4.7.1 You are being throttled", "4.7.1", "rate-limited"),
        ("451 4.3.2 System busy, try again later", "4.3.2", "try-again-later"),
        # not throttling
        ("450 4.7.1 <u@example.com>: Recipient address rejected: Greylisted, try again later",
         "4.7.1", None),
        ("451 4.7.1 Please try again later (greylisting)", "4.7.1", None),
        ("452 4.2.2 Mailbox full", "4.2.2", None),
        ("450 4.2.1 receiving mail at a rate that prevents additional messages", "4.2.1", None),
        ("450 4.1.1 <u@example.com>: Recipient address rejected: User unknown", "4.1.1", None),
        ("451 4.3.0 Temporary local problem, try again", "4.3.0", None),
    ],
)
def test_slow_down_reasons(reply: str, dsn: str, reason: str | None) -> None:
    assert slow_down_reason(deferred(reply, dsn)) == reason


def test_permanent_failures_need_an_operator_pattern() -> None:
    event = deferred("550 5.7.1 Too many messages from 203.0.113.5, rate limited", "5.7.1",
                     status="bounced")
    assert event.status == "bounced"
    assert slow_down_reason(event) is None
    patterns = compile_patterns([r"5\.7\.1 too many messages"])
    assert slow_down_reason(event, patterns) == r"pattern:5\.7\.1 too many messages"


def test_operator_patterns() -> None:
    patterns = compile_patterns([r"please slow", r"\bmx-busy-\d+\b"])
    assert all(p.flags & re.IGNORECASE for p in patterns)
    busy = deferred("451 4.3.0 MX-BUSY-17 come back soon", "4.3.0")
    assert slow_down_reason(busy) is None
    assert slow_down_reason(busy, patterns) == r"pattern:\bmx-busy-\d+\b"
    # patterns see the message with the continuation prefixes removed as well
    joined = deferred("451-4.3.0 we ask you to please 451 4.3.0 slow down a bit", "4.3.0")
    assert slow_down_reason(joined, compile_patterns(["please slow down"])) == (
        "pattern:please slow down"
    )
    # ... and never fire on successes
    ok = parse(CAPTURED["sent"])
    assert slow_down_reason(ok, compile_patterns(["gsmtp"])) is None


def test_bad_operator_pattern() -> None:
    with pytest.raises(ValueError, match="bad regular expression"):
        compile_patterns(["ok", "(unclosed"])


def test_collapse_reply() -> None:
    assert collapse_reply("421-4.7.0 one 421-4.7.0 two 421 4.7.0 three", 421) == "one two three"
    assert collapse_reply("250 2.0.0 Ok: queued as 421", 250) == "Ok: queued as 421"
    assert collapse_reply("no code here", None) == "no code here"
    assert collapse_reply("550-first 550 second", 550) == "first second"
