"""Sendmail's delivery log read as Postfix's is: ``stat=Sent``, ``stat=Deferred``, bounces
by their 5.x.x DSN, the remote reply from ``reply=`` (else the ``stat`` text); backoff and
pause-by-rule from those lines.

CAPTURED_* are verbatim from Sendmail 8.17.1.9 relaying to a local sink that answered
Yahoo's text (tests/feedback/test_sendmail_feedback_e2e.py catches them); the others follow
the same format with other providers' replies."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from mqpolicy.decision.service import DecisionService
from mqpolicy.feedback.delivery_log import parse_delivery_line, slow_down_reason
from mqpolicy.feedback.follower import FeedbackService
from mqpolicy.policy.loader import parse_policy
from mqpolicy.store.backoff_states import MemoryBackoffStore
from mqpolicy.store.memory import MemoryStore

HEAD = "Nov 27 20:52:09 mta sm-mta[11211]: 5ARKq9Ab011209: "
YAHOO = (HEAD + "to=<u@yahoo.test>, ctladdr=<www-data@shop.example> (33/33), "
         "delay=00:00:05, xdelay=00:00:05, mailer=esmtp, pri=120418, "
         "relay=mta5.am0.yahoodns.test. [192.0.2.26], dsn=4.7.0, stat=Deferred: 421 4.7.0 "
         "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or "
         "user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes")
GMAIL = (HEAD + "to=<a@gmail.test>,<b@gmail.test>, delay=00:00:01, xdelay=00:00:01, "
         "mailer=esmtp, pri=30000, relay=gmail-smtp-in.l.google.test. [192.0.2.25], "
         "dsn=4.0.0, stat=Deferred: 421 4.7.28 Our system has detected an unusual rate of "
         "unsolicited mail originating from your IP address.")
SENT = (HEAD + "to=<a@gmail.test>, delay=00:00:01, xdelay=00:00:01, mailer=esmtp, "
        "pri=30000, relay=gmail-smtp-in.l.google.test. [192.0.2.25], dsn=2.0.0, "
        "stat=Sent (OK  1700000000 a1si1 - gsmtp)")
UNKNOWN = (HEAD + "to=<nobody@gmail.test>, delay=00:00:01, xdelay=00:00:01, mailer=esmtp, "
           "pri=30000, relay=gmail-smtp-in.l.google.test. [192.0.2.25], dsn=5.1.1, "
           "stat=User unknown")
REFUSED = (HEAD + "to=<x@down.test>, delay=00:00:01, xdelay=00:00:01, mailer=esmtp, "
           "pri=30000, relay=mx.down.test., dsn=4.0.0, "
           "stat=Deferred: Connection refused by mx.down.test.")
CAPTURED_RESET = (
    "Dec  7 11:31:26 mta.sendmail.test sendmail[19641]: 6B7BVQZu019632: to=<u@yahoo.sm.test>, "
    "delay=00:00:00, xdelay=00:00:00, mailer=relay, pri=30180, relay=[127.0.0.1] [127.0.0.1], "
    "dsn=4.7.0, reply=421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to "
    "unexpected volume or user complaints - 4.16.55.1; see "
    "https://postmaster.yahooinc.com/error-codes, stat=Deferred: Connection reset by "
    "[127.0.0.1]")
CAPTURED_RETRY = (
    "Dec  7 11:32:26 mta.sendmail.test sendmail[20904]: 6B7BVQZu019632: to=<u@yahoo.sm.test>, "
    "delay=00:01:00, xdelay=00:00:00, mailer=relay, pri=120180, relay=[127.0.0.1] [127.0.0.1], "
    "dsn=4.7.0, reply=421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to "
    "unexpected volume or user complaints - 4.16.55.1; see "
    "https://postmaster.yahooinc.com/error-codes, stat=Deferred: 421 4.7.0 [TSS04] Messages "
    "from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - "
    "4.16.55.1; see https://postmaster.yahooinc.com/error-codes")
REFERENCE = datetime(2026, 11, 28, tzinfo=UTC)


def test_sendmail_results_are_read() -> None:
    deferred = parse_delivery_line(YAHOO, reference=REFERENCE)
    assert deferred is not None
    assert (deferred.status, deferred.recipient, deferred.domain, deferred.dsn,
            deferred.reply_code, deferred.relay_host, deferred.queue_id, deferred.service) == (
        "deferred", "u@yahoo.test", "yahoo.test", "4.7.0", 421, "mta5.am0.yahoodns.test",
        "5ARKq9Ab011209", "sm-mta")
    assert deferred.reply.startswith("421 4.7.0 [TSS04] Messages from")
    assert deferred.timestamp == datetime(2026, 11, 27, 20, 52, 9, tzinfo=UTC)
    several = parse_delivery_line(GMAIL, reference=REFERENCE)
    assert several is not None and several.recipient == "a@gmail.test"
    sent = parse_delivery_line(SENT, reference=REFERENCE)
    assert sent is not None
    assert (sent.status, sent.reply, sent.reply_code) == ("sent", "OK  1700000000 a1si1 - gsmtp",
                                                          None)
    bounced = parse_delivery_line(UNKNOWN, reference=REFERENCE)
    assert bounced is not None and (bounced.status, bounced.dsn) == ("bounced", "5.1.1")
    refused = parse_delivery_line(REFUSED, reference=REFERENCE)
    assert refused is not None and (refused.status, refused.reply_code) == ("deferred", None)
    for line in (CAPTURED_RESET, CAPTURED_RETRY):
        captured = parse_delivery_line(line, reference=datetime(2026, 12, 8, tzinfo=UTC))
        assert captured is not None
        assert (captured.status, captured.recipient, captured.dsn, captured.reply_code,
                captured.service, captured.host) == (
            "deferred", "u@yahoo.sm.test", "4.7.0", 421, "sendmail", "mta.sendmail.test")
        assert captured.reply.startswith("421 4.7.0 [TSS04] Messages from 192.0.2.1")
        assert captured.reply.endswith("error-codes")
    iso = parse_delivery_line(YAHOO.replace("Nov 27 20:52:09", "2026-11-27T20:52:09+00:00"))
    assert iso is not None and iso.timestamp == deferred.timestamp


@pytest.mark.parametrize("line", [
    HEAD + "from=<a@shop.example>, size=1234, class=0, nrcpts=1, msgid=<x@shop.example>, "
           "proto=ESMTP, daemon=MTA, relay=localhost [127.0.0.1]",
    HEAD + "to=<u@yahoo.test>, delay=00:00:00, mailer=esmtp, pri=30000, stat=queued",
    HEAD + "Milter (mqpolicy): quarantine: held by mqpolicy lane scheduled",
    "Nov 27 20:52:09 mta sm-mta[11211]: starting daemon (8.17.1.9): SMTP+queueing@00:10:00",
    HEAD + "to=<u@yahoo.test>, delay=00:00:00, mailer=esmtp, pri=30000, stat=",
    "Dec  7 11:31:26 mta.sendmail.test sendmail[19632]: 6B7BVQZu019632: Milter (mqpolicy) "
    "change (add): header: X-MQ-Lane: normal",
])
def test_other_sendmail_lines_are_skipped(line: str) -> None:
    assert parse_delivery_line(line, reference=REFERENCE) is None


def test_slow_down_signs_in_sendmail_lines() -> None:
    def reason(line: str) -> str | None:
        event = parse_delivery_line(line, reference=REFERENCE)
        assert event is not None
        return slow_down_reason(event)

    assert reason(YAHOO) == "yahoo-deferred"
    assert reason(CAPTURED_RESET) == "yahoo-deferred"  # the reply, not the reset
    assert reason(GMAIL) == "gmail-unusual-rate"
    assert reason(SENT) is None
    assert reason(UNKNOWN) is None
    assert reason(REFUSED) is None  # no remote reply: not the receiver's request


def test_backoff_and_pause_by_rule_from_sendmail_lines() -> None:
    policy = parse_policy("""\
lanes: [{name: normal}]
default_lane: normal
destinations:
  - {name: google, domains: [gmail.test], rate: 300/1m}
  - {name: yahoo, domains: [yahoo.test], rate: 50/1m}
feedback:
  log: /nonexistent/maillog
  rules: [{match: "TSS04", action: pause, for: 1h}]
""")
    service = DecisionService(policy, MemoryStore())
    store = MemoryBackoffStore()
    at = datetime(2026, 11, 27, 20, 52, 9, tzinfo=UTC)
    now_ms = int(at.timestamp() * 1000) + 3_000_000  # 50 minutes after the lines
    gmail, yahoo = (line.replace("Nov 27 20:52:09", "2026-11-27T20:52:09+00:00")
                    for line in (GMAIL, YAHOO))
    feedback = FeedbackService(lambda: policy, store, service.destination_of,
                               clock_ms=lambda: now_ms)

    async def main() -> None:
        change = await feedback.handle_line(gmail)
        assert change is not None and (change.destination, change.new_factor) == ("google", 0.5)
        await feedback.handle_line(yahoo)
        assert await store.factors() == {"google": 0.5, "yahoo": 0.5}
        (pause,) = await store.pauses()
        assert (pause.name, pause.by, pause.evidence) == ("yahoo", "rule:TSS04", yahoo)

    asyncio.run(main())
