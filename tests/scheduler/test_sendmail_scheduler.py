"""The scheduler driving a real Sendmail's quarantine (tests/support/sendmail_fixture.py): the milter
quarantines held mail and records it, the scheduler inside ``mqpolicy milter`` (memory store)
lists the quarantine with ``-bp -qQ`` and releases with ``-qI<id> -qQ -Q`` / ``-qI<id> -qf``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqpolicy.lab.processes import stop_process
from mqpolicy.lab.readiness import accepts, free_port, poll
from mqpolicy.lab.smtp_client import make_message, submit
from mqpolicy.lab.smtp_sink import ThreadedSmtpSink
from mqpolicy.policy.endpoints import Endpoint
from mqpolicy.scheduler.sendmail_queue import parse_mailq
from tests.support.sendmail_fixture import SendmailInstance, SendmailUnavailable, sendmail_instance
from tests.support.serve_process import MqpolicyProcess

pytestmark = pytest.mark.e2e


@pytest.fixture
def sink() -> Iterator[ThreadedSmtpSink]:
    with ThreadedSmtpSink(hostname="sink.mqpolicy.test") as running:
        yield running


@pytest.fixture
def milter_port() -> int:
    return free_port()


@pytest.fixture
def sendmail(sink: ThreadedSmtpSink, milter_port: int) -> Iterator[SendmailInstance]:
    if os.geteuid() != 0:
        pytest.skip("a private Sendmail needs root (unshare -u)")
    try:
        with sendmail_instance(sink_port=sink.port, milter_port=milter_port) as instance:
            yield instance
    except SendmailUnavailable as exc:
        pytest.skip(str(exc))


def test_quarantined_mail_is_released_by_the_scheduler(
    sendmail: SendmailInstance, sink: ThreadedSmtpSink, milter_port: int, tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""\
store:
  url: memory://
milter:
  listen: inet:{milter_port}@127.0.0.1
lanes:
  - name: normal
  - name: bulk
    hold: true
    release_rate: 5/1s
    release_burst: 1
default_lane: normal
classify:
  - name: held
    when: {{sender: "@held.sm.test"}}
    lane: bulk
scheduler:
  mta: sendmail
  sendmail_cf: {sendmail.cf}
  interval: 500ms
  lock_ttl: 5s
log:
  format: kv
  level: info
""")
    log_file = tmp_path / "milter.log"
    env = {**os.environ, "MQPOLICY_SENDMAIL": str(sendmail.command)}
    with log_file.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mqpolicy", "milter", "-c", str(policy)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    try:
        poll(lambda: proc.poll() is None and accepts(Endpoint(host="127.0.0.1", port=milter_port)), 20, "the milter")
        for i in range(3):
            sent = submit("127.0.0.1", sendmail.port, "a@held.sm.test", ["r@dest.sm.test"],
                          make_message("a@held.sm.test", ["r@dest.sm.test"], f"held-{i}"))
            assert sent.queued, sent.replies()
        plain = submit("127.0.0.1", sendmail.port, "b@plain.sm.test", ["r@dest.sm.test"],
                       make_message("b@plain.sm.test", ["r@dest.sm.test"], "plain"))
        assert plain.queued, plain.replies()

        messages = sink.wait_for(lambda m: len(m) >= 4, 60)
        subjects = sorted(m.header("Subject") or "" for m in messages)
        assert subjects == ["held-0", "held-1", "held-2", "plain"]
        held = [m for m in messages if (m.header("Subject") or "").startswith("held")]
        assert all(m.header("X-MQ-Lane") == "bulk" for m in held)

        def released() -> list[str]:
            text = log_file.read_text(errors="replace")
            return [line for line in text.splitlines() if "msg=released" in line]

        poll(lambda: len(released()) >= 3, 10, "three releases in the milter's log")
        assert len(released()) == 3
        poll(lambda: not parse_mailq(sendmail.run("-bp", "-qQ"), "hold").entries, 10,
             "an empty quarantine")
    finally:
        stop_process(proc, 20)


def test_with_a_release_agent_the_quarantine_is_listed_and_released_by_it(
    sendmail: SendmailInstance, sink: ThreadedSmtpSink, milter_port: int, tmp_path: Path,
) -> None:
    """The milter's scheduler runs no Sendmail command itself (its MQPOLICY_SENDMAIL points
    nowhere): the release agent lists the quarantine and releases from it."""
    agent_socket = tmp_path / "agent.sock"
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""\
store:
  url: memory://
milter:
  listen: inet:{milter_port}@127.0.0.1
lanes:
  - name: normal
  - name: bulk
    hold: true
default_lane: normal
classify:
  - name: held
    when: {{sender: "@held.sm.test"}}
    lane: bulk
scheduler:
  mta: sendmail
  sendmail_cf: {sendmail.cf}
  interval: 500ms
  lock_ttl: 5s
  release_agent: unix:{agent_socket}
log:
  format: kv
  level: info
""")
    agent = MqpolicyProcess("release-agent", policy, tmp_path / "agent.log",
                            env={**os.environ, "MQPOLICY_SENDMAIL": str(sendmail.command)})
    milter = MqpolicyProcess("milter", policy, tmp_path / "milter.log",
                             env={**os.environ, "MQPOLICY_SENDMAIL": "/nonexistent/sendmail"})
    try:
        agent.start(str(agent_socket), timeout=20)
        milter.start(("127.0.0.1", milter_port), timeout=20)
        sent = submit("127.0.0.1", sendmail.port, "a@held.sm.test", ["r@dest.sm.test"],
                      make_message("a@held.sm.test", ["r@dest.sm.test"], "held-via-agent"))
        assert sent.queued, sent.replies()
        arrived = sink.wait_for_subject("held-via-agent", 60)
        assert arrived.header("X-MQ-Lane") == "bulk"
        milter.wait_logged("msg=released")
        agent.wait_logged("msg=list")  # its log is written by a thread of its own: waited for
        agent.wait_logged("released=1")
        assert "/nonexistent/sendmail" not in milter.log_text()
    finally:
        milter.stop(timeout=20)
        agent.stop()
