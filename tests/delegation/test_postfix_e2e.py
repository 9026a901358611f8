"""End to end through a real Postfix: SMTP in, the policy server on both hooks, lanes as
transports, the hold queue, an SMTP sink out. See tests/support/postfix_fixture.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from mqpolicy.lab.mail_stack import MailStack
from mqpolicy.lab.postfix_instance import backdate
from mqpolicy.lab.readiness import poll
from mqpolicy.lab.smtp_sink import SinkMessage
from mqpolicy.policy.loader import parse_policy
from mqpolicy.postfix.config_generator import PostfixConfigOptions, generate
from mqpolicy.postfix.settings import (
    HEADER_CHECKS_FILE,
    SECTION_HEADER_CHECKS,
    SECTION_MAIN,
    SECTION_MASTER,
    SECTION_TRANSPORT,
    TRANSPORT_MAP_FILE,
    split_sections,
)
from mqpolicy.scheduler.mta_queue import QueueEntry
from tests.support.postfix_fixture import LANES, policy, unique_address

pytestmark = pytest.mark.e2e

DELIVERY_TIMEOUT_S = 60.0  # generous: a loaded machine; the wait ends when they arrive


def from_sender(sender: str) -> Callable[[list[SinkMessage]], list[SinkMessage]]:
    def mine(messages: list[SinkMessage]) -> list[SinkMessage]:
        return [m for m in messages if m.mail_from == sender]

    return mine


def arrived(stack: MailStack, sender: str, count: int) -> list[SinkMessage]:
    """Wait until ``count`` messages from ``sender`` reached the sink; return them."""
    mine = from_sender(sender)
    messages = stack.sink.wait_for(lambda msgs: len(mine(msgs)) >= count, DELIVERY_TIMEOUT_S)
    return mine(messages)


def settle(stack: MailStack) -> None:
    """Wait until Postfix has nothing left to deliver (hold and deferred do not count)."""
    stack.wait_queue(
        lambda q: not [m for m in q if m.queue_name in ("incoming", "active", "maildrop")],
        DELIVERY_TIMEOUT_S,
    )


def test_sender_over_its_limit_gets_450_with_the_configured_text(mail_stack: MailStack) -> None:
    mail_stack.apply_policy(policy("""
limits:
  - name: per-sender
    rate: 3/1h
    key: sender
    count: messages
    action: defer
    message: "Slow down {key}: {limit} allows {rate}"
"""))
    flooder = unique_address("flooder")
    other = unique_address("other")
    for i in range(3):
        sent = mail_stack.send(flooder, ["rcpt@example.org"], f"flood {i}")
        assert sent.queued, sent.replies()

    over = mail_stack.send(flooder, ["rcpt@example.org"], "one too many")
    assert not over.queued
    (_, reply), = over.rcpts
    assert reply.code == 450
    assert reply.text.startswith("4.7.1 <rcpt@example.org>: Recipient address rejected:")
    assert reply.text.endswith(f"Slow down {flooder}: per-sender allows 3/1h")

    fine = mail_stack.send(other, ["rcpt@example.org"], "not flooding")
    assert fine.queued, fine.replies()
    assert len(arrived(mail_stack, other, 1)) == 1
    arrived(mail_stack, flooder, 3)
    settle(mail_stack)
    delivered = from_sender(flooder)(mail_stack.sink.messages())
    assert sorted(m.header("Subject") or "" for m in delivered) == \
        ["flood 0", "flood 1", "flood 2"]
    assert not mail_stack.postfix.queue()


def test_the_policy_server_on_a_unix_socket_in_the_queue_directory(
    unix_socket_stack: MailStack,
) -> None:
    """postfix-config names a socket inside Postfix's queue directory relative to it (what
    a chrooted smtpd reaches too); Postfix asks the policy server through it on both
    hooks: the budget spent at END-OF-MESSAGE refuses the next message at RCPT."""
    stack = unix_socket_stack
    stack.start(policy("""
limits:
  - name: per-sender
    rate: 1/1h
    key: sender
    count: messages
    action: defer
    message: "One an hour for {key}"
"""))
    main_cf = split_sections(stack.postfix_config)[SECTION_MAIN]
    assert "check_policy_service unix:mqpolicy/policy.sock" in main_cf
    assert "unix:/" not in main_cf

    sender = unique_address("unix")
    first = stack.send(sender, ["rcpt@example.org"], "first")
    assert first.queued, first.replies()
    over = stack.send(sender, ["rcpt@example.org"], "second")
    assert not over.queued
    (_, reply), = over.rcpts
    assert reply.code == 450
    assert reply.text.endswith(f"One an hour for {sender}")
    (delivered,) = arrived(stack, sender, 1)
    assert delivered.header("Subject") == "first"


def test_a_hard_quota_rejects_with_550(mail_stack: MailStack) -> None:
    mail_stack.apply_policy(policy("""
limits:
  - name: quota
    rate: 1/1d
    key: sender
    action: reject
    message: "Daily quota of {key} used up"
"""))
    sender = unique_address("quota")
    assert mail_stack.send(sender, ["a@example.org"]).queued
    refused = mail_stack.send(sender, ["a@example.org"])
    (_, reply), = refused.rcpts
    assert reply.code == 550
    assert reply.text == \
        f"5.7.1 <a@example.org>: Recipient address rejected: Daily quota of {sender} used up"


def test_ten_recipients_count_ten_against_recipients_and_one_against_messages(
    mail_stack: MailStack,
) -> None:
    mail_stack.apply_policy(policy("""
limits:
  - name: recipients-budget
    rate: 13/1h
    key: sender
    count: recipients
    message: "recipients budget spent"
  - name: messages-budget
    rate: 2/1h
    key: sender
    count: messages
    message: "messages budget spent"
"""))
    sender = unique_address("counted")
    ten = [f"r{i}@example.org" for i in range(10)]

    first = mail_stack.send(sender, ten, "ten recipients")
    assert first.queued and len(first.accepted) == 10, first.replies()

    # 3 recipients left: each RCPT passes (checked), the message (4) does not at END-OF-
    # MESSAGE. Had the first message counted 1 recipient, 12 would be left.
    second = mail_stack.send(sender, [f"s{i}@example.org" for i in range(4)], "four")
    assert len(second.accepted) == 4
    assert second.data is not None
    assert second.data.code == 450
    assert second.data.text == \
        "4.7.1 <END-OF-MESSAGE>: End-of-data rejected: recipients budget spent"

    # Nothing was spent by the deferred message (all-or-nothing): 1 message and 3
    # recipients are left, so 2 recipients pass...
    third = mail_stack.send(sender, ["t1@example.org", "t2@example.org"], "two")
    assert third.queued, third.replies()

    # ...and now the messages budget (2) is spent after two messages: the first counted 1.
    fourth = mail_stack.send(sender, ["u1@example.org"], "one")
    (_, reply), = fourth.rcpts
    assert reply.code == 450
    assert reply.text.endswith("messages budget spent")

    messages = arrived(mail_stack, sender, 2)
    assert sorted(len(m.rcpt_tos) for m in messages) == [2, 10]


def test_lanes_leave_through_their_own_transports(mail_stack: MailStack) -> None:
    mail_stack.apply_policy(policy("""
classify:
  - name: password-resets
    when: {sender: "@auth.example.com"}
    lane: transactional
  - name: newsletters
    when:
      any:
        - sender: "@news.example.com"
        - recipient_count: {min: 5}
    lane: bulk
"""))
    reset = unique_address("reset", "auth.example.com")
    news = unique_address("weekly", "news.example.com")
    plain = unique_address("person")
    many = unique_address("many")
    for sender, rcpts in ((reset, ["user@example.org"]), (news, ["reader@example.net"]),
                          (plain, ["friend@example.org"]),
                          (many, [f"m{i}@example.org" for i in range(6)])):
        sent = mail_stack.send(sender, rcpts, f"from {sender}")
        assert sent.queued, sent.replies()

    transports = {}
    for sender in (reset, news, plain, many):
        (message,) = arrived(mail_stack, sender, 1)
        transports[sender] = mail_stack.delivery_of(message).transport
    assert transports == {
        reset: "mq-transactional",
        news: "mq-bulk",
        plain: "smtp",
        many: "mq-bulk",  # known only at END-OF-MESSAGE: FILTER works there too
    }
    log = mail_stack.postfix.log_file.read_text()
    assert "End-of-data triggers FILTER mq-bulk:" in log
    assert "Recipient address triggers FILTER mq-transactional:" in log


def _held(queue: list[QueueEntry], sender: str) -> list[QueueEntry]:
    return [m for m in queue if m.sender == sender and m.queue_name == "hold"]


def test_hold_puts_the_message_in_the_hold_queue_and_loses_nothing(
    mail_stack: MailStack,
) -> None:
    mail_stack.apply_policy(policy("""
limits:
  - name: hold-messages
    rate: 1/1h
    key: sender
    count: messages
    action: hold
    when: {sender: "@messages.hold.test"}
  - name: hold-recipients
    rate: 3/1h
    key: sender
    count: recipients
    action: hold
    when: {sender: "@recipients.hold.test"}
"""))
    # Decided at RCPT: the messages budget is spent by the first message.
    at_rcpt = unique_address("h", "messages.hold.test")
    assert mail_stack.send(at_rcpt, ["a@example.org"], "first").queued
    held_rcpt = mail_stack.send(at_rcpt, ["a@example.org"], "second")
    assert held_rcpt.queued, held_rcpt.replies()  # the client sees 250: Postfix holds it
    # Held at END-OF-MESSAGE: 1 recipient left, each RCPT passes, 2 recipients do not.
    at_eom = unique_address("h", "recipients.hold.test")
    assert mail_stack.send(at_eom, ["b@example.org", "c@example.org"], "first").queued
    held_eom = mail_stack.send(at_eom, ["b@example.org", "c@example.org"], "second")
    assert held_eom.queued, held_eom.replies()

    queue = mail_stack.wait_queue(
        lambda q: bool(_held(q, at_rcpt)) and bool(_held(q, at_eom)), DELIVERY_TIMEOUT_S)
    assert [m.queue_id for m in _held(queue, at_rcpt)] == [held_rcpt.queue_id]
    assert [m.queue_id for m in _held(queue, at_eom)] == [held_eom.queue_id]
    assert _held(queue, at_eom)[0].recipients == ("b@example.org", "c@example.org")
    log = mail_stack.postfix.log_file.read_text().splitlines()
    # A hold decided at RCPT is applied at END-OF-MESSAGE, where the queue id is known and
    # the scheduler's record is written first (mqpolicy/delegation/handler.py).
    assert any(f"{held_rcpt.queue_id}: hold: END-OF-MESSAGE from" in line for line in log)
    assert any(f"{held_eom.queue_id}: hold: END-OF-MESSAGE from" in line for line in log)
    assert len(arrived(mail_stack, at_rcpt, 1)) == 1  # only the first one so far
    assert len(arrived(mail_stack, at_eom, 1)) == 1

    for queued in (held_rcpt, held_eom):
        mail_stack.postfix.release(queued.queue_id)
    assert sorted(m.header("Subject") or "" for m in arrived(mail_stack, at_rcpt, 2)) == \
        ["first", "second"]
    assert sorted(m.header("Subject") or "" for m in arrived(mail_stack, at_eom, 2)) == \
        ["first", "second"]
    settle(mail_stack)
    assert not mail_stack.postfix.queue()


def test_a_hold_lane_names_itself_in_postfixs_log(mail_stack: MailStack) -> None:
    """Postfix logs the HOLD answer's text: a hold lane's says which lane held the mail."""
    mail_stack.apply_policy(policy("""
classify:
  - name: reports
    when: {sender: "@overnight.hold.test"}
    lane: overnight
""").replace("default_lane: normal\n", "  - name: overnight\n    hold: true\n"
                                         "default_lane: normal\n"))
    sender = unique_address("report", "overnight.hold.test")
    sent = mail_stack.send(sender, ["a@example.org"], "report")
    assert sent.queued, sent.replies()
    mail_stack.wait_queue(lambda q: bool(_held(q, sender)), DELIVERY_TIMEOUT_S)
    lines = [line for line in mail_stack.postfix.log_file.read_text().splitlines()
             if f"{sent.queue_id}: hold: END-OF-MESSAGE from" in line]
    assert len(lines) == 1, lines
    assert "End-of-data held by mqpolicy lane overnight;" in lines[0], lines[0]
    mail_stack.postfix.delete(sent.queue_id)


def test_policy_server_down_then_back(mail_stack: MailStack) -> None:
    sender = unique_address("patient")
    assert mail_stack.send(sender, ["a@example.org"], "before").queued

    mail_stack.server.stop()
    down = mail_stack.send(sender, ["a@example.org"], "while down")
    (_, reply), = down.rcpts
    assert not down.queued
    # smtpd_policy_service_default_action from postfix-config
    assert (reply.code, reply.text) == (
        451, "4.3.5 <a@example.org>: Recipient address rejected: "
             "Policy service unavailable, try again later")

    mail_stack.server.start()
    after = mail_stack.send(sender, ["a@example.org"], "after")
    assert after.queued, after.replies()
    subjects = sorted(m.header("Subject") or "" for m in arrived(mail_stack, sender, 2))
    assert subjects == ["after", "before"]


def test_a_destination_answering_421_leaves_mail_deferred(mail_stack: MailStack) -> None:
    mail_stack.sink.set_reply("busy.example", "421 4.7.0 Try again later")
    sender = unique_address("to-busy")
    sent = mail_stack.send(sender, ["x@busy.example"], "busy")
    assert sent.queued
    queue = mail_stack.wait_queue(
        lambda q: any(m.sender == sender and m.queue_name == "deferred" for m in q),
        DELIVERY_TIMEOUT_S)
    (deferred,) = [m for m in queue if m.sender == sender]
    assert "421 4.7.0 Try again later" in deferred.delay_reasons[0]
    mail_stack.sink.set_reply("busy.example", None)
    mail_stack.postfix.flush()
    assert len(arrived(mail_stack, sender, 1)) == 1


def test_the_instance_runs_on_the_postfix_config_output(mail_stack: MailStack) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mqpolicy", "postfix-config", "-c", str(mail_stack.policy_file),
         "--config-directory", str(mail_stack.postfix.config_dir)],
        capture_output=True, text=True, check=True,
    )
    assert proc.stdout == mail_stack.postfix_config
    sections = split_sections(proc.stdout)
    config_dir = mail_stack.postfix.config_dir
    assert (config_dir / "main.cf").read_text().endswith(sections[SECTION_MAIN])
    assert (config_dir / "master.cf").read_text().endswith(sections[SECTION_MASTER])
    assert (config_dir / HEADER_CHECKS_FILE).read_text() == sections[SECTION_HEADER_CHECKS]
    # What Postfix itself makes of it:
    values = mail_stack.postfix.postconf(
        "-h", "mq-bulk_destination_concurrency_limit", "smtpd_end_of_data_restrictions",
        "default_filter_nexthop").splitlines()
    assert values == ["2", f"check_policy_service inet:127.0.0.1:{mail_stack.policy_port}",
                      "$relayhost"]

    check = subprocess.run(
        [sys.executable, "-m", "mqpolicy", "postfix-config", "-c", str(mail_stack.policy_file),
         "--check", str(config_dir)],
        capture_output=True, text=True, check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "has what the policy needs" in check.stdout
    assert not [line for line in check.stdout.splitlines()
                if line.startswith(("missing", "different"))]

    # A policy with one more lane: --check names what Postfix lacks.
    bigger = mail_stack.root / "bigger.yaml"
    bigger.write_text(
        mail_stack.policy_file.read_text().replace(
            LANES.splitlines()[1],
            "  - name: scheduled\n    transport: mq-scheduled\n    concurrency: 3\n"
            + LANES.splitlines()[1]),
    )
    check = subprocess.run(
        [sys.executable, "-m", "mqpolicy", "postfix-config", "-c", str(bigger),
         "--check", str(config_dir)],
        capture_output=True, text=True, check=False,
    )
    assert check.returncode == 1, check.stdout + check.stderr
    assert "missing   master.cf: service mq-scheduled (unix, smtp)" in check.stdout
    assert "missing   main.cf: mq-scheduled_destination_concurrency_limit = 3" in check.stdout
    assert "FILTER mq-scheduled:" in check.stdout
    assert "needs changes" in check.stdout


def test_sink_and_log_agree_on_every_delivery(mail_stack: MailStack) -> None:
    """The fixture's own tool: each sink message maps to exactly one 'sent' log line."""
    sender = unique_address("count")
    for i in range(3):
        assert mail_stack.send(sender, [f"a{i}@example.org", f"b{i}@example.net"]).queued
    messages = arrived(mail_stack, sender, 3)
    for message in messages:
        delivery = mail_stack.delivery_of(message)
        assert delivery.recipient in message.rcpt_tos
        assert delivery.transport == "smtp"
    poll(lambda: len([d for d in mail_stack.deliveries()
                      if d.remote_queue_id in {m.sink_id for m in messages}]) == 6,
         DELIVERY_TIMEOUT_S, "both recipients of each message in the log")


DESTINATION_TRANSPORT = """
classify:
  - name: newsletters
    when: {sender: "@news.example.com"}
    lane: bulk
destinations:
  - name: partner
    domains: [partner.example, "*.partner.example"]
    rate: 1000/1m
    concurrency: 3
    recipient_limit: 20
"""


def test_a_destination_with_delivery_settings_leaves_through_its_own_transport(
    mail_stack: MailStack,
) -> None:
    text = policy(DESTINATION_TRANSPORT)
    config_dir = mail_stack.postfix.config_dir
    relayhost = mail_stack.postfix.relayhost  # [127.0.0.1]:<sink port>
    # The operator's step: the transport block goes to the file transport_maps names,
    # before Postfix reloads onto the new main.cf.
    wanted = generate(parse_policy(text), PostfixConfigOptions(
        config_directory=str(config_dir), relayhost=relayhost)).transport_map()
    map_file = config_dir / TRANSPORT_MAP_FILE
    map_file.write_text(wanted)
    backdate([map_file])
    mail_stack.apply_policy(text)
    # The command read relayhost from this instance and printed the same map.
    assert split_sections(mail_stack.postfix_config)[SECTION_TRANSPORT] == wanted
    assert f"/@partner\\.example$/ mq-dest-partner:{relayhost}" in wanted.splitlines()
    values = mail_stack.postfix.postconf(
        "-h", "transport_maps", "mq-dest-partner_destination_concurrency_limit",
        "mq-dest-partner_destination_recipient_limit").splitlines()
    assert values == [f"regexp:{map_file}", "3", "20"]

    plain = unique_address("partner-plain")
    sub = unique_address("partner-sub")
    news = unique_address("partner-news", "news.example.com")
    other = unique_address("partner-other")
    for sender, rcpt in ((plain, "x@partner.example"), (sub, "y@Mail.Partner.Example"),
                         (news, "z@partner.example"), (other, "w@example.org")):
        sent = mail_stack.send(sender, [rcpt], f"to {rcpt}")
        assert sent.queued, sent.replies()

    sink_relay = "relay=127.0.0.1[127.0.0.1]:" + relayhost.rsplit(":", 1)[1]
    transports = {}
    for sender in (plain, sub, news, other):
        (message,) = arrived(mail_stack, sender, 1)  # the sink is the relay host
        delivery = mail_stack.delivery_of(message)
        transports[sender] = delivery.transport
        assert sink_relay in delivery.line, delivery.line
    assert transports == {
        plain: "mq-dest-partner",
        sub: "mq-dest-partner",
        news: "mq-bulk",  # the lane's FILTER wins over transport_maps
        other: "smtp",
    }
    log = mail_stack.postfix.log_file.read_text()
    assert "postfix/mq-dest-partner/smtp[" in log

    check = subprocess.run(
        [sys.executable, "-m", "mqpolicy", "postfix-config", "-c", str(mail_stack.policy_file),
         "--check", str(config_dir)],
        capture_output=True, text=True, check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"ok        {map_file}: /@partner\\.example$/ mq-dest-partner:{relayhost}" \
        in check.stdout

    # One more destination in the policy: --check names its service and map line.
    bigger = mail_stack.root / "bigger-destinations.yaml"
    bigger.write_text(mail_stack.policy_file.read_text() + """\
  - name: other
    domains: [other.example]
    rate: 10/1m
    rate_delay: 1s
""")
    check = subprocess.run(
        [sys.executable, "-m", "mqpolicy", "postfix-config", "-c", str(bigger),
         "--check", str(config_dir)],
        capture_output=True, text=True, check=False,
    )
    assert check.returncode == 1, check.stdout + check.stderr
    assert "missing   master.cf: service mq-dest-other (unix, smtp)" in check.stdout
    assert f"missing   {map_file}: /@other\\.example$/ mq-dest-other:{relayhost}" \
        in check.stdout
