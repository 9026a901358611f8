"""A live run's decision log, as the real decision service writes it with
``log.decisions: all``: the policy server's RCPT decisions (no headers) and the milter's end
of message (with headers), on a simulated clock, through the real log handler."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from mqpolicy.daemon.structured_log import configure_logging
from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.request import STAGE_END_OF_MESSAGE, Request
from mqpolicy.store.memory import MemoryStore
from tests.support.lanes import LANES

START_MS = int(datetime(2026, 12, 6, 9, 0, tzinfo=UTC).timestamp() * 1000)
REFERENCE = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

POLICY = LANES + """\
log:
  decisions: all
classify:
  - name: lists
    when: {bulk_signals: true}
    lane: bulk
  - name: campaigns
    when: {header: {name: X-Campaign, regex: spring}}
    lane: bulk
limits:
  - {name: per-sender, rate: 3/1h, burst: 3, key: sender, action: defer}
  - {name: bulk-per-sender, rate: 2/1h, burst: 2, key: sender, lanes: [bulk], action: defer}
"""

LIST_HEADERS = (("Subject", "news #1"), ("List-Id", "<news.a.example>"))
CAMPAIGN_HEADERS = (("Subject", "sale"), ("X-Campaign", "spring-2026"))
PLAIN_HEADERS = (("Subject", "lunch?"),)


class SimulatedClock:
    def __init__(self) -> None:
        self.now_ms = START_MS

    def __call__(self) -> int:
        return self.now_ms


@contextmanager
def captured_log(fmt: str, clock: SimulatedClock) -> Iterator[io.StringIO]:
    """The ``mqpolicy`` loggers into a string, each record stamped with the simulated
    clock's time (as a live server's records carry the time they were made). The logger
    is left as it was found (handlers, level, propagation): this runs at collection too."""
    logger = logging.getLogger("mqpolicy")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    out = io.StringIO()
    handler = configure_logging(fmt, "info", out)

    def stamp(record: logging.LogRecord) -> bool:
        record.created = clock.now_ms / 1000
        return True

    handler.addFilter(stamp)
    try:
        yield out
    finally:
        handler.stop()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def live_run(fmt: str = "kv", policy_text: str = POLICY) -> tuple[list[str], dict[str, int]]:
    """A live run's decision log: what a policy server (RCPT, without headers) and the
    milter (its end of message, with headers) decide, a minute between messages.

    alice: 5 plain messages (per-sender lets 3 in); carol: 3 list messages (bulk, where
    bulk-per-sender lets 2 in); dave: one campaign (bulk by X-Campaign); erin: one plain."""
    policy = parse_policy(policy_text)
    clock = SimulatedClock()
    service = DecisionService(policy, MemoryStore(), clock_ms=clock)
    sends = ([("alice@a.example", PLAIN_HEADERS)] * 5 + [("carol@c.example", LIST_HEADERS)] * 3
             + [("dave@d.example", CAMPAIGN_HEADERS), ("erin@e.example", PLAIN_HEADERS)])
    outcome: dict[str, int] = {}
    with captured_log(fmt, clock) as out:
        for n, (sender, headers) in enumerate(sends):
            clock.now_ms = START_MS + n * 60_000
            rcpt = f"r{n}@b.example"
            base = Request(client_address="192.0.2.7", client_name="app.example",
                           helo_name="app.example", sender=sender, size=2000,
                           instance=f"inst{n}")
            verdict = service.decide_now(base._replace(recipient=rcpt))
            assert verdict is not None
            if verdict.action.value != "accept":
                outcome[f"rcpt {verdict.action.value}"] = outcome.get(
                    f"rcpt {verdict.action.value}", 0) + 1
                continue
            end = service.decide_now(base._replace(
                stage=STAGE_END_OF_MESSAGE, queue_id=f"Q{n:04X}", recipient_count=1,
                recipients=(rcpt,), headers=headers))
            assert end is not None
            key = f"end {end.action.value} {end.lane.name}"
            outcome[key] = outcome.get(key, 0) + 1
    return out.getvalue().splitlines(), outcome
