"""The counting contract (issue 16) through a real Sendmail, whose only hook is the milter:
the Sendmail column of the cells of tests/contract/test_counting_wirings.py (header limit,
lane-scoped limit, hold, demotion, a refused message's give-back, a message that can never
fit), run by the same scenarios (tests/support/wiring_cells.py).

One ``mqpolicy serve`` (memory store, the milter on the session Sendmail's socket, an admin
socket, the scheduler's view of Sendmail's quarantine) serves every cell; each test uses
a HELO name and a recipient domain of its own. The lane a message left in is the
``X-MQ-Lane`` header the sink got; a held message is in the quarantine (``-bp -qQ``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from mqpolicy.lab.readiness import free_port, poll
from mqpolicy.lab.smtp_client import Submission
from mqpolicy.postfix.settings import LANE_HEADER
from tests.support import wiring_cells as cells
from tests.support.postfix_fixture import LANES
from tests.support.postfix_wirings import admin_ask
from tests.support.sendmail_fixture import (
    MilterSendmail,
    milter_sendmail,  # noqa: F401  (the session fixture)
)
from tests.support.serve_process import MqpolicyProcess

pytestmark = pytest.mark.e2e

TIMEOUT_S = 60.0  # generous: a loaded machine; each wait ends when it is met


def sendmail_queue_id(sent: Submission) -> str:
    """Sendmail's queue id from its reply to the data (``2.0.0 ID Message accepted...``)."""
    assert sent.data is not None and sent.data.ok, sent.replies()
    return sent.data.text.split()[1]


class SendmailWiring:
    """Sendmail with the milter in ``serve``, running the cells' policy."""

    name = "Sendmail"

    def __init__(self, sendmail: MilterSendmail, serve: MqpolicyProcess, admin: Path) -> None:
        self.sendmail = sendmail
        self.serve = serve
        self.admin = admin

    @property
    def sees_headers(self) -> bool:
        return True

    def send(self, helo: str, sender: str, recipients: Sequence[str], subject: str,
             headers: Mapping[str, str] | None = None, body: str = "") -> Submission:
        return cells.send_with_helo(self.sendmail.port, helo, sender, recipients, subject,
                                    headers, body, TIMEOUT_S)

    def lane_left_in(self, subject: str) -> str:
        message = self.sendmail.sink.wait_for_subject(subject, TIMEOUT_S)
        (lane,) = message.header_values(LANE_HEADER)
        return lane

    def wait_held(self, sent: Submission, subject: str) -> None:
        queue_id = sendmail_queue_id(sent)
        sink = self.sendmail.sink

        def held() -> bool:
            if any(m.header("Subject") == subject for m in sink.messages()):
                raise AssertionError(f"{subject!r} was delivered, in lane "
                                     f"{self.lane_left_in(subject)}, not held")
            return any(q.queue_id == queue_id for q in self.sendmail.quarantined())

        poll(held, TIMEOUT_S, f"{queue_id} in the quarantine", interval_s=0.1)

    def held_records(self, destination: str) -> list[tuple[str, int]]:
        summary = admin_ask(self.admin, "queue")
        return [(group["lane"], group["held"]) for group in summary["destinations"]
                if group.get("destination") == destination]

    def remaining(self, limit: str, key: str) -> int:
        result = admin_ask(self.admin, "counters.show", {"limit": limit, "key": key})
        rows = [row for row in result["rows"] if row["key"] == key]
        if not rows:  # never spent
            return cells.BURSTS[limit]
        (row,) = rows
        return int(row["remaining"])

    def recipients_of(self, subject: str) -> tuple[str, ...]:
        return self.sendmail.sink.wait_for_subject(subject, TIMEOUT_S).rcpt_tos

    def queue_id(self, sent: Submission) -> str:
        return sendmail_queue_id(sent)

    def serve_log(self) -> str:
        return self.serve.log_text()


@pytest.fixture(scope="module")
def sendmail_wiring(milter_sendmail: MilterSendmail,  # noqa: F811
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[SendmailWiring]:
    sendmail = milter_sendmail
    root = tmp_path_factory.mktemp("sendmail-cells")
    admin = root / "admin.sock"
    policy = root / "policy.yaml"
    policy.write_text(f"""\
listen: ["127.0.0.1:{free_port()}"]
store: {{url: "memory://", timeout_ms: 200}}
log: {{format: kv, level: info}}
admin: {{listen: "unix:{admin}", mode: "0600"}}
milter:
  listen: unix:{sendmail.milter_socket}
scheduler:
  mta: sendmail
  sendmail_cf: {sendmail.cf}
  interval: 1h
  lock_ttl: 2h
""" + LANES + cells.CELLS)
    # the scheduler's view of the quarantine runs this Sendmail (the admin queue operation)
    env = {**os.environ, "MQPOLICY_SENDMAIL": str(sendmail.command)}
    serve = MqpolicyProcess("serve", policy, root / "serve.log", env=env)
    try:
        serve.start(str(sendmail.milter_socket), str(admin), timeout=TIMEOUT_S)
        yield SendmailWiring(sendmail, serve, admin)
    finally:
        serve.stop()
        sendmail.delete_all()


def test_a_refused_recipient_is_deferred_alone_and_not_counted(
    sendmail_wiring: SendmailWiring,
) -> None:
    cells.refused_recipient(sendmail_wiring)


def test_a_header_limit_passes_one_of_three(sendmail_wiring: SendmailWiring) -> None:
    cells.header_limit(sendmail_wiring)


@pytest.mark.parametrize("bulk_by", cells.BULK_BY)
def test_a_lane_scoped_limit_is_not_charged_by_mail_leaving_in_another_lane(
    sendmail_wiring: SendmailWiring, bulk_by: str,
) -> None:
    cells.lane_scoped_limit(sendmail_wiring, bulk_by)


@pytest.mark.parametrize("bulk_by", cells.BULK_BY)
def test_a_bulk_hold_limit_holds_the_second_bulk_message(
    sendmail_wiring: SendmailWiring, bulk_by: str,
) -> None:
    cells.hold(sendmail_wiring, bulk_by)


def test_demoted_mail_meets_the_limits_of_its_new_lane(sendmail_wiring: SendmailWiring) -> None:
    cells.demotion(sendmail_wiring)


def test_a_message_refused_at_the_end_of_data_gives_its_recipient_budget_back(
    sendmail_wiring: SendmailWiring,
) -> None:
    cells.give_back(sendmail_wiring)


def test_a_message_that_can_never_fit_is_refused_for_good(
    sendmail_wiring: SendmailWiring,
) -> None:
    cells.never_fits(sendmail_wiring)


def test_a_message_that_can_never_fit_waits_in_the_quarantine_when_so_configured(
    sendmail_wiring: SendmailWiring,
) -> None:
    cells.never_fits_held(sendmail_wiring)


def test_the_decision_log_says_what_was_done(sendmail_wiring: SendmailWiring) -> None:
    cells.decision_log(sendmail_wiring)
