"""The milter behind a real Sendmail (tests/support/sendmail_fixture.py, ``milter_sendmail``): the
lane header reaches the sink (a client's own lane header does not), a recipient over its
budget gets ``451 4.7.1`` with the configured text while the others are accepted, and a held
message lands in Sendmail's quarantine (``-bp -qQ``) until released. Evidence: the SMTP
replies, the sink, the ``-X`` trace and the quarantine listing (no syslog here)."""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from mqpolicy.lab.processes import stop_process
from mqpolicy.lab.readiness import poll
from mqpolicy.lab.smtp_client import Submission, make_message, submit, submit_on
from mqpolicy.postfix.settings import LANE_HEADER
from mqpolicy.scheduler.sendmail_queue import parse_mailq
from tests.support.lanes import MILTER_LANE_RULES
from tests.support.postfix_fixture import unique_address
from tests.support.sendmail_fixture import (
    HOSTNAME,
    MilterSendmail,
    milter_sendmail,  # noqa: F401  (the session fixture)
)

pytestmark = pytest.mark.e2e

TIMEOUT_S = 60.0  # generous: a loaded machine; each wait ends when it is met

LANES = """\
lanes:
  - name: transactional
  - name: normal
  - name: bulk
default_lane: normal
""" + MILTER_LANE_RULES


class MilterProcess:
    """``mqpolicy milter -c FILE`` (or another milter command) on the Sendmail's socket;
    ready when the socket accepts, stopped by its PID."""

    def __init__(self, policy_file: Path, socket_path: Path, log_file: Path,
                 command: Sequence[str] = ()) -> None:
        self.policy_file = policy_file
        self.socket_path = socket_path
        self.log_file = log_file
        self.command = tuple(command) or (sys.executable, "-m", "mqpolicy", "milter", "-c",
                                          str(policy_file))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log)
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the milter exited {proc.returncode}: {self.log()}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.socket_path))
                except OSError:
                    return False
                return True

        poll(listening, TIMEOUT_S, f"mqpolicy milter on {self.socket_path}")

    def stop(self, *, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
            proc.wait(timeout=5)
            return
        stop_process(proc, 20)

    def log(self) -> str:
        try:
            return self.log_file.read_text("utf-8", "replace")[-3000:]
        except FileNotFoundError:
            return ""


@pytest.fixture
def start_milter(milter_sendmail: MilterSendmail,  # noqa: F811
                 tmp_path: Path) -> Iterator[Callable[..., MilterProcess]]:
    """Starts the milter with a policy (LANES, or the lanes given, + body) for one test; a
    clean sink and queue."""
    sendmail = milter_sendmail
    sendmail.sink.clear()
    started: list[MilterProcess] = []

    def start(body: str, lanes: str = LANES) -> MilterProcess:
        policy = tmp_path / "policy.yaml"
        policy.write_text(f"""\
store:
  url: memory://
milter:
  listen: unix:{sendmail.milter_socket}
log:
  format: kv
  level: info
""" + lanes + body)
        process = MilterProcess(policy, sendmail.milter_socket, tmp_path / "milter.log")
        started.append(process)
        process.start()
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()
        sendmail.delete_all()


def send(sendmail: MilterSendmail, sender: str, recipients: Sequence[str], subject: str,
         headers: Mapping[str, str] | None = None) -> Submission:
    message = make_message(sender, recipients, subject, headers=headers)
    return submit("127.0.0.1", sendmail.port, sender, recipients, message)


def traced(sendmail: MilterSendmail, needle: str) -> None:
    """Wait until the -X trace shows ``needle``."""
    def seen() -> bool:
        try:
            return needle in sendmail.trace.read_text("utf-8", "replace")
        except FileNotFoundError:
            return False

    poll(seen, TIMEOUT_S, f"{needle!r} in the -X trace")


# A milter that writes down what Sendmail tells it at connect, nothing else.
PROBE_MILTER = """\
import sys
import Milter

class Probe(Milter.Base):
    def connect(self, hostname, family, hostaddr):
        with open(sys.argv[2], "a") as out:
            out.write("client_addr=%s j=%s\\n" % (self.getsymval("{client_addr}"),
                                                 self.getsymval("j")))
        return Milter.CONTINUE

Milter.factory = Probe
Milter.runmilter("probe", "unix:" + sys.argv[1], 30)
"""


def test_the_connect_macros_include_client_addr(
    milter_sendmail: MilterSendmail,  # noqa: F811
    tmp_path: Path,
) -> None:
    sendmail = milter_sendmail
    cf = sendmail.cf.read_text()
    assert f"Xmqpolicy, S=unix:{sendmail.milter_socket}, F=T, " in cf
    assert sendmail.cf_option("InputMailFilters") == "mqpolicy"
    connect = [m.strip() for m in sendmail.cf_option("Milter.macros.connect").split(",")]
    assert "{client_addr}" in connect
    assert "j" in connect  # added to Sendmail's defaults, not instead of them

    script, seen = tmp_path / "probe.py", tmp_path / "macros.txt"
    script.write_text(PROBE_MILTER)
    probe = MilterProcess(script, sendmail.milter_socket, tmp_path / "probe.log",
                          command=(sys.executable, str(script), str(sendmail.milter_socket),
                                   str(seen)))
    try:
        probe.start()
        send(sendmail, "probe@example.com", ["r@dest.milter.test"], "probe")
        poll(seen.exists, TIMEOUT_S, "the probe milter's connect")
        assert seen.read_text().splitlines() == [f"client_addr=127.0.0.1 j={HOSTNAME}"]
    finally:
        probe.stop(kill=True)  # libmilter takes seconds to stop on SIGTERM
        sendmail.delete_all()


def test_the_lane_header_reaches_the_sink_and_a_forged_one_does_not(
    milter_sendmail: MilterSendmail,  # noqa: F811
    start_milter: Callable[[str], MilterProcess],
) -> None:
    sendmail = milter_sendmail
    start_milter("")
    app = unique_address("app", "app.milter.test")
    other = unique_address("other", "elsewhere.milter.test")
    cases = {  # subject: (sender, headers, the lane header the sink must see)
        "newsletter": (other, {"List-Unsubscribe": "<mailto:unsub@news.milter.test>"}, "bulk"),
        "urgent-app": (app, {"X-Priority": "1 (Highest)"}, "transactional"),
        "urgent-other": (other, {"X-Priority": "1 (Highest)"}, "normal"),
        "forged": (other, {"X-MQ-Lane": "transactional", "X-Mq-Lane": "bulk"}, "normal"),
    }
    # one SMTP session (one milter connection): nothing of a message may stick to the next
    with smtplib.SMTP("127.0.0.1", sendmail.port, timeout=TIMEOUT_S) as conn:
        for subject, (sender, headers, _) in cases.items():
            data = make_message(sender, ["rcpt@dest.milter.test"], subject, headers=headers)
            sent = submit_on(conn, sender, ["rcpt@dest.milter.test"], data)
            assert sent.queued, sent.replies()
    for subject, (_, _, lane) in cases.items():
        message = sendmail.sink.wait_for_subject(subject, TIMEOUT_S)
        assert message.header_values(LANE_HEADER) == [lane], (subject, message.headers)
    traced(sendmail, "X-MQ-Lane: bulk")  # Sendmail relayed the header it was given


def test_a_recipient_over_its_budget_gets_451_with_the_configured_text(
    milter_sendmail: MilterSendmail,  # noqa: F811
    start_milter: Callable[[str], MilterProcess],
) -> None:
    sendmail = milter_sendmail
    start_milter("""\
limits:
  - name: per-recipient
    rate: 1/1h
    key: recipient
    count: messages
    action: defer
    message: "Mailbox {key} at 100%: no more mail this hour"
""")
    sender = unique_address("sender")
    full, first, second = (unique_address(n, "dest.milter.test") for n in ("full", "a", "b"))
    sent = send(sendmail, sender, [full, first], "first")
    assert sent.queued and len(sent.accepted) == 2, sent.replies()

    again = send(sendmail, sender, [full, second], "second")
    replies = dict(again.rcpts)
    assert replies[full].code == 451, again.replies()
    assert replies[full].text == f"4.7.1 Mailbox {full} at 100%: no more mail this hour"
    assert replies[second].ok, again.replies()
    assert again.queued, again.replies()
    traced(sendmail, f"451 4.7.1 Mailbox {full} at 100%: no more mail this hour")

    assert sorted(sendmail.sink.wait_for_subject("first", TIMEOUT_S).rcpt_tos) == sorted([full, first])
    assert sendmail.sink.wait_for_subject("second", TIMEOUT_S).rcpt_tos == (second,)


def test_a_held_message_lands_in_the_quarantine_until_released(
    milter_sendmail: MilterSendmail,  # noqa: F811
    start_milter: Callable[[str], MilterProcess],
) -> None:
    sendmail = milter_sendmail
    start_milter("""\
limits:
  - name: per-sender
    rate: 1/1h
    key: sender
    count: messages
    action: hold
    message: "{key} spent 100% of its hourly budget"
""")
    sender = unique_address("held")
    assert send(sendmail, sender, ["r@dest.milter.test"], "passes").queued
    held = send(sendmail, sender, ["r@dest.milter.test"], "held")
    assert held.queued, held.replies()  # 250: the client never knows
    assert sendmail.sink.wait_for_subject("passes", TIMEOUT_S).header_values(LANE_HEADER) == ["normal"]

    quarantine = sendmail.quarantined()
    assert [(q.sender, q.recipients) for q in quarantine] == [(sender, ("r@dest.milter.test",))]
    (entry,) = quarantine
    assert entry.reason == f"{sender} spent 100% of its hourly budget"  # '%' as written
    assert (sendmail.queue_dir / f"hf{entry.queue_id}").exists()
    assert not sendmail.queued()  # plain -bp: nothing waiting outside the quarantine
    assert [m.header("Subject") for m in sendmail.sink.messages()] == ["passes"]

    sendmail.release(entry.queue_id)
    released = sendmail.sink.wait_for_subject("held", TIMEOUT_S)
    assert released.header_values(LANE_HEADER) == ["normal"]
    assert released.mail_from == sender
    assert sendmail.quarantined() == []
    assert not os.path.exists(sendmail.queue_dir / f"hf{entry.queue_id}")


ONE_AN_HOUR_THEN_HOLD = """\
limits:
  - name: per-sender
    rate: 1/1h
    key: sender
    action: hold
"""


def test_the_quarantine_reason_names_the_lane_or_the_limit_that_held_the_message(
    milter_sendmail: MilterSendmail,  # noqa: F811
    start_milter: Callable[..., MilterProcess],
) -> None:
    sendmail = milter_sendmail
    start_milter(ONE_AN_HOUR_THEN_HOLD, lanes="""\
lanes:
  - name: normal
  - name: overnight
    hold: true
default_lane: normal
classify:
  - name: reports
    when: {sender: "@reports.milter.test"}
    lane: overnight
""")
    by_lane = unique_address("report", "reports.milter.test")
    by_limit = unique_address("limited")
    assert send(sendmail, by_lane, ["r@dest.milter.test"], "report").queued
    for subject in ("passes", "held"):
        assert send(sendmail, by_limit, ["r@dest.milter.test"], subject).queued
    sendmail.sink.wait_for_subject("passes", TIMEOUT_S)
    reasons = {q.sender: q.reason for q in sendmail.quarantined()}
    assert reasons == {by_lane: "held by mqpolicy lane overnight",
                       by_limit: "held by mqpolicy limit per-sender"}


def test_the_schedulers_parser_reads_the_recipients_of_a_real_quarantine_listing(
    milter_sendmail: MilterSendmail,  # noqa: F811
    start_milter: Callable[[str], MilterProcess],
) -> None:
    sendmail = milter_sendmail
    start_milter(ONE_AN_HOUR_THEN_HOLD)
    sender = unique_address("listed")
    rcpts = ["a@dest.milter.test", "b@dest2.milter.test"]
    for subject in ("passes", "held"):
        assert send(sendmail, sender, rcpts, subject).queued
    listing = sendmail.run("-bp", "-qQ")
    assert [q.recipients for q in sendmail.quarantined()] == [tuple(rcpts)], listing
    (entry,) = parse_mailq(listing, "hold").entries
    assert entry.recipients == tuple(rcpts), listing
