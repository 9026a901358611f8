"""The milter behind the session's real Postfix (tests/support/postfix_fixture.py, ``milter_stack``):
header-based lanes leave through their transports (the Postfix log says which), a forged
lane header gets nothing, and mail submitted with Postfix's ``sendmail -C DIR`` (pickup ->
cleanup -> ``non_smtpd_milters``), which never meets the policy server, is held or deferred
by the milter when over its limit."""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from mqpolicy.feedback.log_follower import LogFollower
from mqpolicy.lab.mail_stack import MailStack
from mqpolicy.lab.readiness import poll
from mqpolicy.lab.smtp_client import make_message, submit_on
from mqpolicy.postfix.programs import POSTFIX
from mqpolicy.postfix.settings import (
    HEADER_CHECKS_FILE,
    LANE_HEADER,
    SECTION_HEADER_CHECKS,
    SECTION_MAIN,
    SECTION_MASTER,
    split_sections,
)
from mqpolicy.scheduler.mta_queue import QueueEntry
from tests.support.lanes import MILTER_LANE_RULES
from tests.support.postfix_fixture import milter_policy, unique_address

pytestmark = pytest.mark.e2e

TIMEOUT_S = 60.0  # generous: a loaded machine; each wait ends when it is met
SENDMAIL = str(Path(POSTFIX.path).with_name("sendmail"))  # Postfix's, not Sendmail's

def log_lines(stack: MailStack, *needles: str) -> list[str]:
    text = stack.postfix.log_file.read_text("utf-8", "replace")
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def test_header_lanes_leave_through_their_transports_and_a_forged_lane_gets_nothing(
    milter_stack: MailStack,
) -> None:
    stack = milter_stack
    # the socket is inside the queue directory: both hooks name it relative to it, and
    # the lanes below prove smtpd (and, further down the file, cleanup) reach it so
    main_cf = split_sections(stack.postfix_config)[SECTION_MAIN]
    assert "\nsmtpd_milters = unix:mqpolicy/milter.sock\n" in main_cf
    assert "\nnon_smtpd_milters = unix:mqpolicy/milter.sock\n" in main_cf
    stack.apply_policy(milter_policy(stack, MILTER_LANE_RULES))
    app = unique_address("app", "app.milter.test")
    other = unique_address("other", "elsewhere.milter.test")
    news = unique_address("news", "news.milter.test")
    cases = {  # subject: (sender, headers, the transport it must leave through)
        "newsletter": (news, {"List-Unsubscribe": "<mailto:unsub@news.milter.test>"},
                       "mq-bulk"),
        "urgent-app": (app, {"X-Priority": "1 (Highest)"}, "mq-transactional"),
        # the same header from another user: no transactional lane for it
        "urgent-other": (other, {"X-Priority": "1 (Highest)"}, "smtp"),
        # a client naming its own lane: its header is deleted, the lane is classified
        "forged": (app, {"X-MQ-Lane": "transactional"}, "smtp"),
        "forged-twice": (other, {"X-MQ-Lane": "transactional", "X-Mq-Lane": "bulk"}, "smtp"),
    }
    queue_ids: dict[str, str] = {}
    # one SMTP session (one milter connection): nothing of a message may stick to the next
    with smtplib.SMTP("127.0.0.1", stack.smtp_port, timeout=TIMEOUT_S) as conn:
        for subject, (sender, headers, _) in cases.items():
            data = make_message(sender, ["rcpt@dest.milter.test"], subject, headers=headers)
            sent = submit_on(conn, sender, ["rcpt@dest.milter.test"], data)
            assert sent.queued, sent.replies()
            queue_ids[subject] = sent.queue_id

    lanes = {"mq-bulk": "bulk", "mq-transactional": "transactional", "smtp": "normal"}
    for subject, (_, _, transport) in cases.items():
        message = stack.sink.wait_for_subject(subject, TIMEOUT_S)
        delivery = stack.delivery_of(message, TIMEOUT_S)
        assert delivery.queue_id == queue_ids[subject]
        assert delivery.transport == transport, (subject, delivery.line)
        # exactly one lane header, the milter's, whatever the client sent
        assert message.header_values(LANE_HEADER) == [lanes[transport]], (subject, message.headers)
        filtered = log_lines(stack, f"{queue_ids[subject]}: milter-header-filter:")
        if transport == "smtp":
            assert not filtered, filtered
        else:
            (line,) = filtered
            assert f"X-MQ-Lane: {lanes[transport]} " in line
            assert line.endswith(f": {transport}:"), line  # Postfix logs FILTER so


def test_the_milters_lane_wins_over_an_envelope_guess_of_the_policy_server(
    milter_stack: MailStack,
) -> None:
    stack = milter_stack
    stack.apply_policy(milter_policy(stack, """\
classify:
  - name: news-unless-urgent
    when: {sender: "@news.milter.test", not: {priority: high}}
    lane: bulk
"""))
    sender = unique_address("news", "news.milter.test")
    sent = stack.send(sender, ["rcpt@dest.milter.test"], "urgent news",
                      headers={"X-Priority": "1"})
    assert sent.queued, sent.replies()
    message = stack.sink.wait_for_subject("urgent news", TIMEOUT_S)
    assert message.header_values(LANE_HEADER) == ["normal"]
    delivery = stack.delivery_of(message, TIMEOUT_S)
    assert delivery.transport == "smtp", log_lines(stack, sent.queue_id)


def test_smtp_mail_both_the_policy_server_and_the_milter_see_is_counted_once(
    milter_stack: MailStack,
) -> None:
    stack = milter_stack
    stack.apply_policy(milter_policy(stack, """\
limits:
  - name: per-sender
    rate: 2/1h
    key: sender
    count: messages
    action: defer
    message: "Sender quota of {key} spent"
"""))
    sender = unique_address("twice-seen", "app.milter.test")
    # Both count at END-OF-MESSAGE, with one once key: counted twice, the second would
    # already be refused.
    for i in range(2):
        sent = stack.send(sender, ["rcpt@dest.milter.test"], f"seen-{i}")
        assert sent.queued, sent.replies()
    over = stack.send(sender, ["rcpt@dest.milter.test"], "seen-2")
    ((_, reply),) = over.rcpts
    assert reply.code == 450, over.replies()
    assert reply.text.endswith(f"Sender quota of {sender} spent")
    for i in range(2):
        assert stack.sink.wait_for_subject(f"seen-{i}", TIMEOUT_S).header_values(LANE_HEADER) == ["normal"]


def only_in(queue_name: str) -> Callable[[list[QueueEntry]], bool]:
    """Something in ``queue_name`` and nothing elsewhere (delivered mail can stay in the
    active queue a moment after its log line)."""

    def check(queue: list[QueueEntry]) -> bool:
        return bool(queue) and all(m.queue_name == queue_name for m in queue)

    return check


def local_submit(stack: MailStack, sender: str, recipients: Sequence[str],
                 subject: str) -> None:
    """Postfix's ``sendmail -C DIR``: maildrop -> pickup -> cleanup (non_smtpd_milters)."""
    message = make_message(sender, recipients, subject)
    proc = subprocess.run(
        [SENDMAIL, "-C", str(stack.postfix.config_dir), "-i", "-f", sender, "--", *recipients],
        input=message, capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


def picked_up(reader: LogFollower, sender: str, seen: list[str], count: int) -> list[str]:
    """The queue ids pickup gave the sender's messages, in order, once there are ``count``
    (log lines read are kept in ``seen``)."""

    def ids() -> list[str]:
        seen.extend(reader.poll())
        return [line.split(": ")[1] for line in seen
                if "/pickup[" in line and f"from=<{sender}>" in line]

    poll(lambda: len(ids()) >= count, TIMEOUT_S, f"pickup of {count} messages from {sender}")
    return ids()


@pytest.mark.parametrize("action", ["hold", "defer"])
def test_a_local_submission_over_its_limit_is_held_or_deferred(
    milter_stack: MailStack, action: str,
) -> None:
    stack = milter_stack
    stack.apply_policy(milter_policy(stack, f"""\
limits:
  - name: local-sender
    rate: 2/1h
    key: sender
    count: messages
    action: {action}
    message: "Local quota of {{key}} spent"
"""))
    sender = unique_address("cron", "app.milter.test")
    lines: list[str] = []
    with stack.postfix.log_reader() as reader:
        for i in range(3):
            local_submit(stack, sender, ["rcpt@dest.milter.test"], f"local-{i}")
            picked_up(reader, sender, lines, i + 1)  # one at a time: the third is over
        first, second, third = picked_up(reader, sender, lines, 3)

    for i, queue_id in enumerate((first, second)):
        message = stack.sink.wait_for_subject(f"local-{i}", TIMEOUT_S)
        assert message.header_values(LANE_HEADER) == ["normal"]
        assert stack.delivery_of(message).queue_id == queue_id
    if action == "hold":
        queue = stack.wait_queue(only_in("hold"), TIMEOUT_S)
        assert [(m.queue_id, m.queue_name, m.sender) for m in queue] == \
            [(third, "hold", sender)]
        assert log_lines(stack, f"{third}: milter-hold: END-OF-MESSAGE from localhost")
        # Postfix logs no reason for a milter's hold: mqpolicy's decision names the limit
        # (its log is written in batches: wait for it)
        decided: list[str] = []

        def logged() -> bool:
            decided[:] = [line for line in stack.server.log_tail(400).splitlines()
                          if f"qid={third} stage=END-OF-MESSAGE action=hold" in line]
            return bool(decided)

        poll(logged, TIMEOUT_S, "mqpolicy's hold decision in its log")
        assert len(decided) == 1 and "by=local-sender" in decided[0], decided
        stack.postfix.release(third)
        assert stack.sink.wait_for_subject("local-2", TIMEOUT_S).header_values(LANE_HEADER) == ["normal"]
    else:
        poll(lambda: bool(log_lines(stack, f"{third}: milter-reject: END-OF-MESSAGE")),
             TIMEOUT_S, "the milter's tempfail in the log")
        (line,) = log_lines(stack, f"{third}: milter-reject: END-OF-MESSAGE")
        assert f"4.7.1 Local quota of {sender} spent;" in line, line
        # the submission stays in the maildrop queue, for pickup to try again later
        maildrop = stack.wait_queue(only_in("maildrop"), TIMEOUT_S)
        assert [(m.queue_name, m.sender) for m in maildrop] == [("maildrop", sender)]
        assert not [m for m in stack.sink.messages() if m.header("Subject") == "local-2"]



def dialogue(stack: MailStack) -> dict[str, tuple[int, str]]:
    """What an SMTP client is answered at each step of one message (first reply line)."""
    seen: dict[str, tuple[int, str]] = {}
    conn = smtplib.SMTP(timeout=TIMEOUT_S)
    try:
        steps: dict[str, Callable[[], tuple[int, bytes]]] = {
            "connect": lambda: conn.connect("127.0.0.1", stack.smtp_port),
            "EHLO": lambda: conn.ehlo("client.milter.test"),
            "MAIL": lambda: conn.mail("a@down.milter.test"),
            "RCPT": lambda: conn.rcpt("r@dest.milter.test"),
        }
        for step, ask in steps.items():
            code, text = ask()
            seen[step] = (code, text.decode().split("\n")[0])
    finally:
        conn.close()
    return seen


def rewire(stack: MailStack, *left_out: str) -> None:
    """The stack's generated configuration without the main.cf settings ``left_out``,
    reloaded. (Left out, not overridden by a later line: every Postfix process would warn
    of the override at start, and a reload then wedged the instance's postlogd here.)"""
    sections = split_sections(stack.postfix_config)
    kept: list[str] = []
    skipping = False
    for line in sections[SECTION_MAIN].splitlines(keepends=True):
        if line[:1].isspace() and skipping:
            continue  # a continuation line of a setting left out
        skipping = line.split("=", 1)[0].strip() in left_out
        if not skipping:
            kept.append(line)
    stack.postfix.write_config("".join(kept), sections[SECTION_MASTER],
                               {HEADER_CHECKS_FILE: sections[SECTION_HEADER_CHECKS]})
    stack.postfix.reload()


def test_what_a_client_sees_while_mqpolicy_is_down_for_each_wiring(
    milter_stack: MailStack,
) -> None:
    """docs/postfix.md "When mqpolicy is down": the policy hooks answer at RCPT with
    smtpd_policy_service_default_action; the milter (milter_default_action = tempfail)
    already at MAIL FROM, so with both the client sees the milter's reply."""
    stack = milter_stack
    stack.server.stop()
    milter_down = {"connect": (220, "mta.mqpolicy.test ESMTP"),
                   "EHLO": (250, "mta.mqpolicy.test"),
                   "MAIL": (451, "4.7.1 Service unavailable - try again later"),
                   "RCPT": (503, "5.5.1 Error: need MAIL command")}
    assert dialogue(stack) == milter_down  # both wirings (what postfix-config writes)
    # mail submitted with the sendmail command waits in the maildrop queue meanwhile
    local_submit(stack, unique_address("cron", "down.milter.test"), ["r@dest.milter.test"],
                 "while down")
    stack.wait_queue(only_in("maildrop"), TIMEOUT_S)

    rewire(stack, "smtpd_recipient_restrictions", "smtpd_end_of_data_restrictions")
    assert "check_policy_service" not in stack.postfix.postconf("-n")
    assert dialogue(stack) == milter_down  # the milter only

    rewire(stack, "smtpd_milters", "non_smtpd_milters")
    assert "milter.sock" not in stack.postfix.postconf("-n")
    policy_only = dialogue(stack)
    assert policy_only["MAIL"][0] == 250
    assert policy_only["RCPT"] == (451, "4.3.5 <r@dest.milter.test>: Recipient address "
                                        "rejected: Policy service unavailable, try again "
                                        "later")
