"""Pure parsing for the scheduler: ``postqueue -j``, ``postsuper -H`` reports, Sendmail's
mailq, and the scheduled-delivery headers."""

from __future__ import annotations

import asyncio
import calendar
import json
import sys
import time

import pytest

from mqpolicy.milter.scheduled_delivery import (
    DEFERRED_DELIVERY,
    DELIVER_AFTER,
    parse_deferred_delivery,
    parse_deliver_after,
    requested_time,
)
from mqpolicy.scheduler.mta_queue import QueueCommandError, run_command
from mqpolicy.scheduler.postfix_queue import parse_postqueue_json, parse_released
from mqpolicy.scheduler.sendmail_queue import parse_mailq

# As Postfix 3.7 prints it (one object per line; delay_reason once tried).
POSTQUEUE_J = (
    '{"queue_name": "hold", "queue_id": "60D3820C733", "arrival_time": 1795813715, '
    '"message_size": 319, "forced_expire": false, "sender": "hold@x.test", "recipients": '
    '[{"address": "a@dest.test"}, {"address": "b@dest2.test"}]}\n'
    '{"queue_name": "deferred", "queue_id": "66A3820C822", "arrival_time": 1795813716, '
    '"message_size": 318, "forced_expire": false, "sender": "", "recipients": '
    '[{"address": "c@busy.test", "delay_reason": "421 4.7.0 Try again later"}]}\n'
)


def test_postqueue_json_entries_and_counts() -> None:
    snapshot = parse_postqueue_json(POSTQUEUE_J.encode())
    held, deferred = snapshot.entries
    assert held.queue_id == "60D3820C733"
    assert held.queue_name == "hold"
    assert held.recipients == ("a@dest.test", "b@dest2.test")
    assert (held.arrival_time, held.size, held.sender) == (1795813715, 319, "hold@x.test")
    assert deferred.sender == ""
    # why each recipient waits, once Postfix tried it
    assert held.delay_reasons == ()
    assert deferred.delay_reasons == ("421 4.7.0 Try again later",)
    line = json.loads(POSTQUEUE_J.splitlines()[1])
    line["recipients"].insert(0, {"address": "d@fresh.test"})  # not tried yet: ''
    (both,) = parse_postqueue_json(json.dumps(line)).entries
    assert both.recipients == ("d@fresh.test", "c@busy.test")
    assert both.delay_reasons == ("", "421 4.7.0 Try again later")
    assert snapshot.counts == {"hold": 1, "deferred": 1}
    assert snapshot.problems == []


@pytest.mark.parametrize("bad", [
    "not json",
    "[1, 2]",
    '{"queue_name": "hold", "queue_id": "../etc"}',
    '{"queue_name": "", "queue_id": "60D3820C733"}',
    '{"queue_name": "hold", "queue_id": "60D3820C733", "arrival_time": "soon"}',
])
def test_unreadable_lines_are_reported_not_guessed(bad: str) -> None:
    snapshot = parse_postqueue_json(POSTQUEUE_J + bad + "\n")
    assert len(snapshot.entries) == 2
    assert len(snapshot.problems) == 1
    assert snapshot.problems[0].startswith("line 3:")


def test_many_lines_parse() -> None:
    line = json.loads(POSTQUEUE_J.splitlines()[0])
    text = "\n".join(json.dumps({**line, "queue_id": f"Q{i:09d}"}) for i in range(10_000))
    snapshot = parse_postqueue_json(text)
    assert snapshot.counts == {"hold": 10_000}


def test_postsuper_release_report() -> None:
    err = ("postsuper: 60D3820C733: released from hold\n"
           "postsuper: 66A3820C822: released from hold\n"
           "postsuper: Released from hold: 2 messages\n")
    assert parse_released(err) == {"60D3820C733", "66A3820C822"}
    assert parse_released("postsuper: Released from hold: 0 messages\n") == set()


MAILQ = """\
\t\t/var/spool/mqueue (2 requests)
-----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------
5ARLf1a4012345      312 Fri Nov 27 21:00 <alice@example.com>
     QUARANTINE: held by mqpolicy limit per-sender
                                         <bob@example.org>
                                         <carol@example.net>
5ARLf2b4012346*       5 Fri Nov 27 21:01 <>
                 (Deferred: Connection refused by [127.0.0.1])
                                         <dave@example.org>
\t\tTotal requests: 2
"""


def test_mailq_entries() -> None:
    now = calendar.timegm((2026, 11, 27, 22, 0, 0)) + time.timezone
    snapshot = parse_mailq(MAILQ, "hold", now=now)
    first, second = snapshot.entries
    assert first.queue_id == "5ARLf1a4012345"
    assert first.sender == "alice@example.com"
    assert first.recipients == ("bob@example.org", "carol@example.net")
    assert first.size == 312
    assert time.localtime(first.arrival_time)[:5] == (2026, 11, 27, 21, 0)
    assert second.queue_id == "5ARLf2b4012346"
    assert second.sender == ""
    assert second.recipients == ("dave@example.org",)
    assert snapshot.counts == {"hold": 2}
    assert snapshot.problems == []


def test_empty_mailq() -> None:
    snapshot = parse_mailq("/var/spool/mqueue is empty\n\t\tTotal requests: 0\n", "hold")
    assert snapshot.entries == []
    assert snapshot.problems == []


# ---------------------------------------------------------------- scheduled delivery

NOW = 1_800_000_000_000


@pytest.mark.parametrize(("value", "expected"), [
    ("+20s", NOW + 20_000),
    ("+30m", NOW + 1_800_000),
    ("+ 1h", NOW + 3_600_000),
    ("+90", NOW + 90_000),
    ("2027-01-15T08:00:00Z", calendar.timegm((2027, 1, 15, 8, 0, 0)) * 1000),
    ("2027-01-15T08:00:00+01:00", calendar.timegm((2027, 1, 15, 7, 0, 0)) * 1000),
    ("2027-01-15t08:00:00.250z", calendar.timegm((2027, 1, 15, 8, 0, 0)) * 1000 + 250),
    ("2027-01-15 08:00:00.123456789Z", calendar.timegm((2027, 1, 15, 8, 0, 0)) * 1000 + 123),
])
def test_deliver_after(value: str, expected: int) -> None:
    assert parse_deliver_after(value, NOW) == expected


@pytest.mark.parametrize("value", ["tomorrow", "2027-01-15", "2027-01-15T08:00:00",
                                   "+", "+-5s", "-5m", "+5y", "x" * 300])
def test_deliver_after_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_deliver_after(value, NOW)


def test_deferred_delivery() -> None:
    assert parse_deferred_delivery("Fri, 15 Jan 2027 08:00:00 +0100") == \
        calendar.timegm((2027, 1, 15, 7, 0, 0)) * 1000
    for bad in ("soon", "Fri, 15 Jan 2027 08:00:00 -0000"):
        with pytest.raises(ValueError):
            parse_deferred_delivery(bad)


def test_requested_time_prefers_deliver_after_and_caps() -> None:
    headers = [(DEFERRED_DELIVERY.lower(), "Fri, 15 Jan 2027 08:00:00 +0000"),
               ("x-mq-deliver-after", "+20s")]
    asked = requested_time(headers, NOW, max_delay_ms=86_400_000)
    assert asked is not None
    assert (asked.not_before_ms, asked.header) == (NOW + 20_000, DELIVER_AFTER)
    capped = requested_time([("X-MQ-Deliver-After", "+30d")], NOW, max_delay_ms=3_600_000)
    assert capped is not None and capped.not_before_ms == NOW + 3_600_000
    past = requested_time([("X-MQ-Deliver-After", "2001-01-01T00:00:00Z")], NOW, 1000)
    assert past is not None and past.not_before_ms == NOW
    assert requested_time([("Subject", "hi")], NOW, 1000) is None


def test_requested_time_falls_back_and_reports_problems() -> None:
    asked = requested_time([("X-MQ-Deliver-After", "whenever"),
                            ("Deferred-Delivery", "Fri, 15 Jan 2027 08:00:00 +0000")],
                           NOW, max_delay_ms=10**12)
    assert asked is not None and asked.header == DEFERRED_DELIVERY
    broken = requested_time([("X-MQ-Deliver-After", "whenever")], NOW, 1000)
    assert broken is not None
    assert broken.not_before_ms is None
    assert "X-MQ-Deliver-After" in broken.problem


# ---------------------------------------------------------------- commands


def test_run_command_kills_an_overrunning_process() -> None:
    async def main() -> None:
        rc, out, _ = await run_command([sys.executable, "-c", "print('ok')"])
        assert (rc, out.strip()) == (0, b"ok")
        rc, out, _ = await run_command(
            [sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read())"],
            stdin=b"a\nb\n")
        assert out == b"a\nb\n"
        with pytest.raises(QueueCommandError, match="no answer within"):
            await run_command([sys.executable, "-c", "import time; time.sleep(30)"],
                              timeout_s=0.2)
        with pytest.raises(QueueCommandError):
            await run_command(["/nonexistent/postqueue"])

    asyncio.run(main())
