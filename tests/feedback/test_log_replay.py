"""Replay: messages rebuilt from a Postfix log, and what a policy would have decided over
them in log time, deferred mail retried on Postfix's schedule.

Expected figures come from the policy's promise (a rate ``N/1h`` with ``burst: N`` lets N
through at once, then one every ``1h/N`` after the first spend) and from Postfix's retry
schedule (a deferred client tries again after ``clamp(age, minimal_backoff_time,
maximal_backoff_time)``)."""

from __future__ import annotations

import random

from mqpolicy.decision.service import DecisionService
from mqpolicy.feedback.log_replay import MailLog, ReplayReport, RetrySchedule, _Decider, replay
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.request import STAGE_END_OF_MESSAGE, STAGE_RCPT, Request
from mqpolicy.store.memory import MemoryStore
from tests.support.lanes import LANES
from tests.support.postfix_log_writer import REFERENCE, PostfixLog, stamp

CLASSIFY = """\
classify:
  - name: later
    when: {sasl_username: "scheduler"}
    lane: scheduled
"""


def policy(limits: str = "") -> str:
    return LANES + CLASSIFY + ("limits:\n" + limits if limits else "")


PER_SENDER_3 = """\
  - {name: per-sender, rate: 3/1h, burst: 3, key: sender, action: defer}
"""


def run(text: str, log: PostfixLog, schedule: RetrySchedule | None = None) -> ReplayReport:
    mail_log = MailLog(REFERENCE)
    for line in log.lines:
        mail_log.feed(line)
    schedule = schedule or RetrySchedule()
    return replay(parse_policy(text), mail_log.mails(schedule), name="p", schedule=schedule,
                  summary=mail_log.summary)


def five_from_alice_two_from_bob() -> PostfixLog:
    log = PostfixLog()
    for i in range(5):  # a minute apart
        log.message(i * 60, "alice@a.example", [f"r{i}@b.example"])
    for i in range(2):
        log.message(30 + i * 60, "bob@a.example", [f"s{i}@b.example", f"t{i}@c.example"])
    return log


def test_messages_are_rebuilt_from_smtpd_qmgr_and_delivery_lines() -> None:
    log = PostfixLog()
    log.message(0, "alice@a.example", ["x@b.example", "y@c.example"],
                client="relay.example[198.51.100.7]", sasl_username="alice", size=4321)
    mail_log = MailLog(REFERENCE)
    for line in log.lines:
        mail_log.feed(line)
    [mail] = mail_log.mails(RetrySchedule())
    assert (mail.client_name, mail.client_address, mail.sasl_username) == (
        "relay.example", "198.51.100.7", "alice")
    assert (mail.sender, mail.size, mail.nrcpt) == ("alice@a.example", 4321, 2)
    assert mail.recipients == {"x@b.example": "sent", "y@c.example": "sent"}
    assert mail_log.summary.unparsable == 0
    assert (mail_log.summary.no_intake, mail_log.summary.no_sender) == (0, 0)


def test_mail_seen_only_by_its_deliveries_is_counted_as_incomplete() -> None:
    log = PostfixLog()
    log.message(0, "alice@a.example", ["x@b.example"])
    mail_log = MailLog(REFERENCE)
    for line in log.lines:
        if " postfix/smtp[" in line:  # the log begins after the mail came in
            mail_log.feed(line)
    [mail] = mail_log.mails(RetrySchedule())
    assert (mail.sender, mail.client_address, mail.recipients) == (
        "", "", {"x@b.example": "sent"})
    assert (mail_log.summary.no_intake, mail_log.summary.no_sender) == (1, 1)


def test_a_sender_over_its_rate_waits_as_postfix_would_retry() -> None:
    report = run(policy(PER_SENDER_3), five_from_alice_two_from_bob())
    normal = report.lanes["normal"]
    # all 7 messages (9 recipients) get in; alice's 4th and 5th only after waiting
    assert normal.messages["accepted"] == 7
    assert normal.recipients["accepted"] == 9
    assert normal.recipients["deferred"] == 2
    # 4th (arrives 180 s): tried at 180, 480, 780, 1380; alice's first slot is back at
    # 1200 s (spent at 0). 5th (240 s): 240, 540, 840, 1440 (too early: the 4th took the
    # 1200 s slot, the next is at 2400), 2640.
    assert sorted(normal.waits_s) == [1200.0, 2400.0]
    limit = report.limits["per-sender"]
    assert limit.first_tries == limit.decided == 2  # what a live run would have answered
    assert limit.retries == 2 + 3  # 4th: at 480 and 780; 5th: at 540, 840 and 1440
    assert report.keys.most_common(1) == [(("per-sender", "alice@a.example"), 2)]
    assert report.logged == {"sent": 9}


def test_without_limits_everything_is_accepted_as_logged() -> None:
    report = run(policy(), five_from_alice_two_from_bob())
    assert report.lanes["normal"].recipients["accepted"] == 9
    assert report.lanes["normal"].recipients["deferred"] == 0
    assert report.limits == {}


def test_held_rejected_and_demoted_mail_is_counted_in_its_lane() -> None:
    log = PostfixLog()
    log.message(0, "cron@a.example", ["x@b.example"], sasl_username="scheduler")
    log.message(10, "spam@bad.example", ["y@b.example", "z@b.example"],
                client="bad.example[203.0.113.5]")
    log.message(20, "news@a.example", ["n1@b.example"])
    log.message(30, "news@a.example", ["n2@b.example"])
    text = policy("""\
  - {name: bad-client, rate: 1/1d, burst: 1, key: client_address, action: reject,
     when: {client_address: 203.0.113.0/24}}
  - {name: news-rate, rate: 1/1h, burst: 1, key: sender, action: {demote: bulk},
     when: {sender: "news@a.example"}}
""")
    report = run(text, log)
    assert report.lanes["scheduled"].recipients["held"] == 1
    # the client's one message of the day, and news's first: in the normal lane
    assert report.lanes["normal"].recipients["accepted"] == 2 + 1
    assert report.lanes["bulk"].recipients["demoted"] == 1  # news's second
    assert report.lanes["bulk"].recipients["accepted"] == 1
    # found spent by news's second message at RCPT (a check) and at its end (demoted)
    news = report.limits["news-rate"]
    assert (news.rcpt, news.end_of_message, news.first_tries) == (1, 1, 2)


def test_a_second_message_from_a_rejected_client_is_rejected() -> None:
    log = PostfixLog()
    for i in range(3):
        log.message(i, "spam@bad.example", [f"y{i}@b.example"],
                    client="bad.example[203.0.113.5]")
    report = run(policy("""\
  - {name: bad-client, rate: 1/1d, burst: 1, key: client_address, action: reject}
"""), log)
    normal = report.lanes["normal"]
    assert (normal.recipients["accepted"], normal.recipients["rejected"]) == (1, 2)
    assert normal.recipients["deferred"] == 0  # a rejection is final: no retry


def test_a_refused_attempt_and_its_retry_are_one_mail() -> None:
    log = PostfixLog()
    log.refused(0, "carol@a.example", "x@b.example")
    log.refused(300, "carol@a.example", "x@b.example")
    log.message(900, "carol@a.example", ["x@b.example"])
    report = run(policy(), log)
    assert report.input.retries_merged == 2
    assert report.mails == 1
    normal = report.lanes["normal"]
    assert (normal.recipients["accepted"], normal.recipients["deferred"]) == (1, 0)
    assert report.logged == {"refused": 1}  # the mail as the log first shows it


def test_mail_deferred_past_the_queue_lifetime_expires() -> None:
    log = PostfixLog()
    log.message(0, "alice@a.example", ["r0@b.example"])
    log.message(60, "alice@a.example", ["r1@b.example"])
    schedule = RetrySchedule(minimal_backoff_time=300, maximal_backoff_time=600,
                             maximal_queue_lifetime=3600)
    report = run(policy("""\
  - {name: per-sender, rate: 1/1d, burst: 1, key: sender, action: defer}
"""), log, schedule)
    normal = report.lanes["normal"]
    assert normal.recipients["accepted"] == 1
    assert normal.recipients["expired"] == 1
    assert normal.recipients["deferred"] == 1
    assert normal.waits_s == []  # it never got in


def test_retry_schedule_follows_postfix() -> None:
    schedule = RetrySchedule(300, 4000, 86400)
    assert schedule.next_try_ms(0, 0) == 300_000  # at least minimal_backoff_time
    assert schedule.next_try_ms(0, 1_000_000) == 2_000_000  # the age: doubling
    assert schedule.next_try_ms(0, 10_000_000) == 14_000_000  # at most maximal
    assert schedule.next_try_ms(0, 86_400_000) is None  # too old: expires


def test_tries_skipped_before_the_retry_time_change_nothing_but_the_work() -> None:
    rnd = random.Random(7)
    log = PostfixLog()
    senders = [f"s{i}@a.example" for i in range(4)]
    for n in range(120):
        log.message(n * 20, rnd.choice(senders),
                    [f"r{rnd.randrange(30)}@{rnd.choice(['b', 'c', 'd'])}.example"
                     for _ in range(rnd.choice((1, 1, 2, 3)))],
                    sasl_username=rnd.choice(("", "", "scheduler")))
    text = policy("""\
  - {name: per-sender, rate: 10/1h, burst: 4, key: sender, action: defer}
  - {name: per-domain, rate: 30/1h, burst: 5, key: recipient_domain, action: defer}
  - {name: big, rate: 6/1h, burst: 3, key: sender, count: recipients, action: {demote: bulk}}
""")
    mail_log = MailLog(REFERENCE)
    for line in log.lines:
        mail_log.feed(line)
    mails = mail_log.mails(RetrySchedule())
    made = replay(parse_policy(text), mails, skip_spent_tries=False).as_json()
    skipped = replay(parse_policy(text), mails).as_json()
    assert skipped.pop("retries_skipped") > 0
    assert made.pop("retries_skipped") == 0
    assert made.pop("decisions") > skipped.pop("decisions")
    # what happens to the mail, and what each limit did, is the same
    assert skipped == made


def test_destinations_feedback_would_have_backed_off_or_paused() -> None:
    log = PostfixLog()
    for i in range(3):
        log.message(i * 120, "alice@a.example", [f"x{i}@gmail.com"])
    qid = log.message(400, "alice@a.example", ["y@gmail.com"], status="deferred")
    log.lines.append(
        f"{stamp(400)} mta postfix/smtp[368]: {qid}: to=<y@gmail.com>, relay=gmail-smtp-in."
        "l.google.com[142.250.1.26]:25, delay=0.3, delays=0/0/0.1/0.2, dsn=4.7.28, "
        "status=deferred (host gmail-smtp-in.l.google.com[142.250.1.26] said: 421-4.7.28 "
        "Our system has detected an unusual rate of unsolicited mail (in reply to end of "
        "DATA command))")
    log.message(500, "alice@a.example", ["z@calm.example"], status="deferred")  # refused
    text = policy() + """\
destinations:
  - {name: google, domains: [gmail.com], rate: 100/1m}
  - {name: calm, domains: [calm.example], rate: 100/1m}
feedback:
  backoff: {decrease: 0.5}
  rules:
    - {match: "4\\\\.7\\\\.28", action: pause, for: 2h, destination: google}
"""
    mail_log = MailLog(REFERENCE)
    for line in log.lines:
        mail_log.feed(line)
    report = replay(parse_policy(text), mail_log.mails(RetrySchedule()),
                    results=mail_log.results)
    assert set(report.destinations) == {"google"}  # a refused connection asks nothing
    google = report.destinations["google"]
    assert (google.slow_downs, google.backoffs, google.lowest_factor, google.pauses) == (
        1, 1, 0.5, 1)
    assert google.reason == "rule:4\\.7\\.28"


def test_the_lane_each_recipient_was_delivered_in_is_read_from_its_transport() -> None:
    log = PostfixLog()
    log.message(0, "app@a.example", ["x@b.example"], transport="mq-transactional")
    log.message(1, "news@a.example", ["y@b.example", "z@b.example"], transport="mq-bulk")
    log.message(2, "bob@a.example", ["w@b.example"])
    log.message(3, "bob@a.example", ["v@b.example"], transport="other-relay")
    report = run(policy(), log)
    # bulk and scheduled share mq-bulk: the log cannot tell them apart
    assert report.logged_lanes == {"transactional": 1, "bulk|scheduled": 2, "normal": 1,
                                   "transport other-relay": 1}


def test_the_replay_decides_as_the_decision_service_does() -> None:
    """The replay's own way through the engine and the memory store gives the verdict the
    policy server's service gives, decision after decision, with the same budgets."""
    text = policy("""\
  - {name: per-sender, rate: 40/1h, burst: 6, key: sender, action: defer}
  - {name: per-domain, rate: 20/1h, burst: 2, key: recipient_domain, action: defer}
  - {name: per-rcpt, rate: 2/1d, burst: 2, key: recipient, action: reject}
  - {name: big, rate: 6/1h, burst: 3, key: sender, count: recipients, action: {demote: bulk}}
  - {name: bytes, rate: 50000/1h, key: client_address, count: bytes, action: hold,
     oversize: hold}
""") + """\
destinations:
  - {name: google, domains: [gmail.com, "*.google.com"], rate: 1/1m, burst: 1}
  - {name: calm, domains: [calm.example], rate: 1/1m, action: hold}
"""
    parsed = parse_policy(text)
    clock = [1_800_000_000_000]
    service = DecisionService(parsed, MemoryStore(), clock_ms=lambda: clock[0])
    decider = _Decider(parsed, MemoryStore())
    rnd = random.Random(11)
    domains = ["gmail.com", "mx.google.com", "calm.example", "b.example", "c.example"]
    for n in range(400):
        clock[0] += rnd.randrange(0, 40_000)
        sender = f"s{rnd.randrange(4)}@a.example"
        base = Request(stage=STAGE_RCPT, client_address=f"192.0.2.{rnd.randrange(3)}",
                       sender=sender, size=rnd.choice((500, 4000, 12000)),
                       sasl_username=rnd.choice(("", "scheduler")), instance=f"i{n}")
        rcpts = [f"r{rnd.randrange(12)}@{rnd.choice(domains)}"
                 for _ in range(rnd.choice((1, 2, 3)))]
        for rcpt in rcpts:
            request = base._replace(recipient=rcpt)
            assert decider(request, clock[0]) == service.decide_now(request)
        end = base._replace(stage=STAGE_END_OF_MESSAGE, queue_id=f"Q{n}",
                            recipients=tuple(rcpts), recipient_count=len(rcpts))
        assert decider(end, clock[0]) == service.decide_now(end)
    assert decider.decisions == sum(service.stats.decisions.values())


def test_a_queue_id_given_again_after_its_message_was_removed_is_a_new_message() -> None:
    """Postfix gives a removed queue file's id to a later message (short queue ids): the
    two are two mails, each with its own sender, client and recipients."""
    log = PostfixLog()
    qid = log.message(0, "alice@a.example", ["x@b.example"], client="one.example[192.0.2.1]")
    log.message(600, "bob@a.example", ["y@c.example", "z@c.example"],
                client="two.example[192.0.2.2]", queue_id=qid)
    mail_log = MailLog(REFERENCE)
    for line in log.lines:
        mail_log.feed(line)
    mails = mail_log.mails(RetrySchedule())
    assert [(m.queue_id, m.sender, m.client_address, sorted(m.recipients), m.nrcpt)
            for m in mails] == [
        (qid, "alice@a.example", "192.0.2.1", ["x@b.example"], 1),
        (qid, "bob@a.example", "192.0.2.2", ["y@c.example", "z@c.example"], 2)]
    report = run(policy(PER_SENDER_3), log)
    assert report.mails == 2
    assert report.lanes["normal"].recipients["accepted"] == 3


def test_a_deferred_message_is_one_mail_however_often_qmgr_takes_it() -> None:
    """qmgr logs from= each time a deferred message enters the active queue: still one
    mail (only a removal ends a queue id's message)."""
    log = PostfixLog()
    qid = log.message(0, "alice@a.example", ["x@b.example"], status="deferred")
    again = [line.replace(stamp(0), stamp(300)) for line in log.lines
             if " postfix/qmgr[" in line or " postfix/smtp[" in line]
    log.lines += [*again, f"{stamp(300)} mta postfix/qmgr[328]: {qid}: removed"]
    mail_log = MailLog(REFERENCE)
    for line in log.lines:
        mail_log.feed(line)
    [mail] = mail_log.mails(RetrySchedule())
    assert (mail.sender, mail.recipients) == ("alice@a.example", {"x@b.example": "deferred"})
