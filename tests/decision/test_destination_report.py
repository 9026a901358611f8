"""``mqpolicy destinations``' rows: patterns and budgets from the policy, the backoff factor
and the burst it leaves, the pause, the last evidence line, the held mail from the hold
records; ``destinations reset`` ends a backoff."""

from __future__ import annotations

import asyncio

from mqpolicy.decision.destination_report import (
    DestinationRow,
    destination_rows,
    render_destinations,
    reset_backoff,
)
from mqpolicy.policy.backoff import BackoffSettings, on_slow_down
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.pauses import new_pause
from mqpolicy.store.backoff_states import MemoryBackoffStore
from mqpolicy.store.hold_records import HoldRecord, MemoryHoldRecords

POLICY = """\
lanes: [{name: normal}]
default_lane: normal
destinations:
  - {name: google, mx: "*.google.test", domains: [gmail.test], rate: 300/1m, burst: 60}
  - {name: yahoo, domains: [yahoo.test, ymail.test], rate: 50/1m, burst: 10}
"""
T0 = 1_800_000_000_000
EVIDENCE = "Nov 27 20:52:09 mta postfix/smtp[368]: ... said: 421-4.7.28 unusual rate"


async def destination_of(domain: str) -> str:
    return {"gmail.test": "google", "company.test": "google", "yahoo.test": "yahoo",
            "ymail.test": "yahoo"}.get(domain, domain)


def test_rows_say_budget_factor_pause_evidence_and_held_mail() -> None:
    async def main() -> list[DestinationRow]:
        policy = parse_policy(POLICY)
        backoff = MemoryBackoffStore()
        await backoff.update("google", lambda s: on_slow_down(
            s, BackoffSettings(), now_ms=T0, reason="gmail-unusual-rate",
            destination="google", evidence=EVIDENCE))
        await backoff.set_pause(new_pause("destination", "yahoo", T0, 7_200_000, "TSS04"))
        await backoff.set_pause(new_pause("destination", "example.org", T0 - 10, 5))  # ran out
        await backoff.set_pause(new_pause("destination", "other.test", T0))
        records = MemoryHoldRecords(lambda: T0)
        for qid, created, domains in [("Q1", T0 - 90_000, ("gmail.test",)),
                                      ("Q2", T0 - 30_000, ("company.test", "ymail.test")),
                                      ("Q3", T0 - 5_000, ("yahoo.test",))]:
            await records.put(HoldRecord(qid, "normal", T0, created, "x", domains))
        return await destination_rows(policy, backoff, records, destination_of, T0)

    rows = asyncio.run(main())
    assert [r.name for r in rows] == ["google", "yahoo", "other.test"]
    google, yahoo, other = rows
    assert (google.domains, google.mx, google.rate, google.burst) == (
        ("gmail.test",), ("*.google.test",), "300/1m", 60)
    assert (google.factor, google.effective_burst) == (0.5, 30)  # the default decrease
    assert (google.backoff_reason, google.evidence) == ("gmail-unusual-rate", EVIDENCE)
    assert (google.held, google.oldest_held_ms) == (2, T0 - 90_000)
    assert not google.paused
    assert (yahoo.paused, yahoo.paused_until_ms, yahoo.pause_reason, yahoo.paused_by) == (
        True, T0 + 7_200_000, "TSS04", "operator")
    assert (yahoo.factor, yahoo.effective_burst, yahoo.held) == (1.0, 10, 2)
    assert (other.configured, other.paused, other.paused_until_ms, other.rate) == (
        False, True, None, "")
    text = render_destinations(rows, T0)
    assert "google: gmail.test, mx *.google.test\n  budget 300/1m, burst 60; backed off to " \
           "0.5 (burst 30): gmail-unusual-rate\n  held 2, oldest 90s ago\n  evidence: " \
           + EVIDENCE in text
    assert "  PAUSED until " in text and "(in 2.0h) by operator: TSS04" in text
    assert [DestinationRow.from_json(r.as_json()) for r in rows] == rows


def test_reset_ends_a_backoff_and_keeps_its_evidence() -> None:
    async def main() -> None:
        policy = parse_policy(POLICY)
        backoff = MemoryBackoffStore()
        await backoff.update("google", lambda s: on_slow_down(
            s, BackoffSettings(), now_ms=T0, reason="smtp-421", destination="google",
            evidence=EVIDENCE))
        assert await backoff.factors() == {"google": 0.5}
        assert await reset_backoff(backoff, "google", T0 + 1) == 0.5
        assert await backoff.factors() == {}
        rows = await destination_rows(policy, backoff, None, destination_of, T0 + 1)
        assert (rows[0].factor, rows[0].effective_burst, rows[0].evidence) == (1.0, 60,
                                                                               EVIDENCE)
        assert await reset_backoff(backoff, "google", T0 + 2) == 1.0

    asyncio.run(main())
