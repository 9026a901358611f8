"""Pause by rule: ``feedback.rules`` pause a destination whose delivery results match, for a
while, from the time of the evidence line, logged with it; per destination or for every
configured one; seen by decisions and ``destinations`` like a manual pause."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mqpolicy.decision.destination_report import destination_rows
from mqpolicy.decision.engine import Action
from mqpolicy.decision.runtime_state import RuntimeRefresher
from mqpolicy.decision.service import DecisionService
from mqpolicy.feedback.follower import FeedbackService
from mqpolicy.policy.loader import ConfigError, parse_policy
from mqpolicy.policy.request import Request
from mqpolicy.store.backoff_states import MemoryBackoffStore
from mqpolicy.store.memory import MemoryStore

POLICY = """\
lanes: [{name: normal}]
default_lane: normal
destinations:
  - {name: google, domains: [gmail.test], rate: 300/1m}
  - {name: yahoo, domains: [yahoo.test], rate: 50/1m}
feedback:
  log: /nonexistent/maillog
  rules:
    - {match: "4\\\\.7\\\\.28", action: pause, for: 2h, destination: google}
    - {match: "TSS04", action: pause, for: 30m}
"""
# 2026-11-27T20:52:09Z
AT_MS = 1_795_812_729_000
GMAIL = (
    "2026-11-27T20:52:09+00:00 mta postfix/smtp[368]: B084820C4AA: to=<u@gmail.test>, "
    "relay=gmail-smtp-in.l.google.test[192.0.2.25]:25, delay=0.06, "
    "delays=0.01/0.03/0.01/0.01, dsn=4.7.28, status=deferred (host "
    "gmail-smtp-in.l.google.test[192.0.2.25] said: 421-4.7.28 Our system has detected an "
    "unusual rate of 421-4.7.28 unsolicited mail originating from your IP address. "
    "(in reply to RCPT TO command))"
)
YAHOO = (
    "2026-11-27T20:52:09+00:00 mta postfix/smtp[369]: C084820C4AB: to=<u@{domain}>, "
    "relay=mta5.am0.yahoodns.test[192.0.2.26]:25, delay=0.3, delays=0.01/0/0.2/0.1, "
    "dsn=4.7.0, status=deferred (host mta5.am0.yahoodns.test[192.0.2.26] said: 421 4.7.0 "
    "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user "
    "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes (in reply to "
    "MAIL FROM command))"
)
SENT = ("2026-11-27T20:53:09+00:00 mta postfix/smtp[368]: D084820C4AC: to=<u@gmail.test>, "
        "relay=gmail-smtp-in.l.google.test[192.0.2.25]:25, delay=0.2, delays=0.01/0/0.1/0.1, "
        "dsn=2.0.0, status=sent (250 2.0.0 OK 4.7.28 gsmtp)")


class Rig:
    def __init__(self, now_ms: int = AT_MS + 1000) -> None:
        self.now = now_ms
        self.policy = parse_policy(POLICY)
        self.service = DecisionService(self.policy, MemoryStore(), clock_ms=lambda: self.now)
        self.store = MemoryBackoffStore()
        self.refresher = RuntimeRefresher(self.service, self.store)
        self.feedback = FeedbackService(lambda: self.policy, self.store,
                                        self.service.destination_of,
                                        clock_ms=lambda: self.now,
                                        on_change=self.refresher.refresh)

    async def action(self, recipient: str) -> Action:
        await self.refresher.refresh()
        return (await self.service.decide(Request(stage="RCPT", sender="a@shop.example",
                                                  recipient=recipient))).action


def test_a_matching_result_pauses_its_destination_for_the_rule_s_time(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        rig = Rig()
        assert await rig.action("v@gmail.test") is Action.ACCEPT
        with caplog.at_level(logging.WARNING, "mqpolicy.feedback"):
            await rig.feedback.handle_line(GMAIL)
        (pause,) = await rig.store.pauses()
        assert (pause.kind, pause.name, pause.since_ms, pause.until_ms) == (
            "destination", "google", AT_MS, AT_MS + 7_200_000)
        assert pause.by == "rule:4\\.7\\.28"
        assert pause.evidence == GMAIL
        assert pause.reason == "4.7.28"  # the matched text; by names the rule
        logged = [r for r in caplog.records if r.getMessage() == "destination paused by rule"]
        assert len(logged) == 1
        assert logged[0].fields["evidence"] == GMAIL  # type: ignore[attr-defined]
        assert logged[0].fields["destination"] == "google"  # type: ignore[attr-defined]
        # decisions see it at once (the feedback refreshes serve's view), as a manual pause
        assert await rig.action("v@gmail.test") is Action.HOLD
        assert await rig.action("v@yahoo.test") is Action.ACCEPT
        rows = await destination_rows(rig.policy, rig.store, None, rig.service.destination_of,
                                      rig.now)
        assert (rows[0].paused, rows[0].paused_by, rows[0].evidence) == (
            True, "rule:4\\.7\\.28", GMAIL)
        # over after two hours from the evidence line
        rig.now = AT_MS + 7_200_000
        assert await rig.action("v@gmail.test") is Action.ACCEPT

    asyncio.run(main())


def test_a_rule_for_one_destination_does_not_pause_another_a_global_one_does() -> None:
    async def main() -> None:
        rig = Rig()
        # the yahoo reply carries no 4.7.28; a gmail-style line for yahoo would not match
        # the google-only rule
        await rig.feedback.handle_line(GMAIL.replace("gmail.test", "yahoo.test"))
        assert await rig.store.pauses() == []
        await rig.feedback.handle_line(YAHOO.format(domain="yahoo.test"))
        (pause,) = await rig.store.pauses()
        assert (pause.name, pause.until_ms) == ("yahoo", AT_MS + 1_800_000)
        # global rules pause configured destinations only
        await rig.feedback.handle_line(YAHOO.format(domain="elsewhere.test"))
        assert [p.name for p in await rig.store.pauses()] == ["yahoo"]

    asyncio.run(main())


def test_no_pause_from_a_success_old_evidence_or_a_destination_already_paused() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.feedback.handle_line(SENT)  # "4.7.28" in a 250 reply: not a failure
        assert await rig.store.pauses() == []
        late = Rig(now_ms=AT_MS + 7_200_000)  # the line read again two hours on
        await late.feedback.handle_line(GMAIL)
        assert await late.store.pauses() == []
        await rig.feedback.handle_line(GMAIL)
        rig.now += 3_600_000
        await rig.feedback.handle_line(GMAIL.replace("20:52:09", "21:52:09"))
        (pause,) = await rig.store.pauses()
        assert pause.until_ms == AT_MS + 7_200_000  # not extended
        assert rig.feedback.stats.pauses == 1

    asyncio.run(main())


@pytest.mark.parametrize(("rule", "expected"), [
    ('{match: "(x", action: pause, for: 1h}', "feedback.rules[0].match: bad regex"),
    ('{match: "x", action: stop, for: 1h}', "feedback.rules[0].action: expected one of pause"),
    ('{match: "x", action: pause}', "feedback.rules[0]: missing for"),
    ('{match: "x", action: pause, for: 0s}', "feedback.rules[0].for:"),
    ('{match: "x", action: pause, for: 1h, destination: gmail}',
     "feedback.rules[0].destination: no destination named 'gmail' (destinations: google)"),
    ('{match: "x", action: pause, for: 1h, when: 1}', "feedback.rules[0].when: unknown key"),
])
def test_rule_errors(rule: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy("lanes: [{name: normal}]\ndefault_lane: normal\ndestinations:\n"
                     "  - {name: google, domains: [gmail.test], rate: 1/1s}\n"
                     f"feedback:\n  rules:\n    - {rule}\n", "p.yaml")
    assert expected in str(info.value)
