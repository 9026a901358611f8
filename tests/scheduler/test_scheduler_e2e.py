"""The scheduler against the session's real Postfix (tests/support/postfix_fixture.py): holds written
by the policy server and the milter, releases through ``postsuper -H``/``postqueue -i``,
arrivals read from the SMTP sink. Generous tolerances: this is a shared 2-core machine.

The tests that run ``mqpolicy scheduler`` as its own process use a Redis store (a private
redis-server, tests/support/redis_fixture.py); the scheduled-delivery test runs the scheduler inside
``serve`` on the memory store. Each test restores the session's base policy (memory store,
no milter) afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from mqpolicy.lab.mail_stack import MailStack
from mqpolicy.lab.readiness import poll
from mqpolicy.lab.smtp_sink import SinkMessage
from mqpolicy.postfix.programs import POSTSUPER
from tests.support.postfix_fixture import (
    BASE_POLICY,
    ORDER,
    held,
    lanes,
    restart_serve,
    write_postfix,
)
from tests.support.redis_fixture import RedisServer
from tests.support.serve_process import MqpolicyProcess

pytestmark = pytest.mark.e2e

CLASSIFY = """\
classify:
  - name: t
    when: {sender: "@t.sched.test"}
    lane: transactional
  - name: b
    when: {sender: "@b.sched.test"}
    lane: bulk
"""


@pytest.fixture
def scheduler(stack: MailStack) -> Iterator[MqpolicyProcess]:
    process = MqpolicyProcess("scheduler", stack.policy_file, stack.root / "scheduler.log")
    try:
        yield process
    finally:
        process.stop()


def redis_policy(server: RedisServer, body: str, log: str = "format: kv\n  level: info") -> str:
    # a store deadline a loaded machine meets: a hold whose record was not written would
    # never be released (these tests are about releases, not deadlines)
    return (f"store:\n  url: {server.unix_url}\n  timeout_ms: 5000\n  key_prefix: \"e2e:\"\n"
            f"log:\n  {log}\n" + body)


def hold_records(server: RedisServer) -> list[str]:
    with server.client() as client:
        return sorted(k.decode() for k in client.keys("e2e:hold:*:rec:*"))


def subject(message: SinkMessage) -> str:
    return message.header("Subject") or ""


def released_in_order(scheduler_log: str) -> list[tuple[str, str, float]]:
    """(queue id, lane, time logged) of each ``released`` line of the scheduler's JSON log,
    in order."""
    records = (json.loads(line) for line in scheduler_log.splitlines() if line.startswith("{"))
    return [(r["qid"], r["lane"], r["ts"]) for r in records if r.get("msg") == "released"]


def passes_logged(scheduler_log: str) -> int:
    """The scheduler's passes so far (its debug log has a line for each)."""
    return sum(1 for line in scheduler_log.splitlines() if " msg=pass " in line)


# ---------------------------------------------------------------- order and rate


def test_thirty_held_messages_leave_highest_lane_first_fifo_at_the_lane_rate(
    stack: MailStack, scheduler: MqpolicyProcess, redis_clean: RedisServer,
) -> None:
    restart_serve(stack, redis_policy(redis_clean, lanes(ORDER, {"bulk": "2/1s"}) + CLASSIFY + """\
limits:
  - name: dest
    rate: 5/1s
    burst: 1
    key: recipient_domain
    action: hold
scheduler:
  interval: 1s
  lock_ttl: 5s
""" + f"  postfix_config_dir: {stack.postfix.config_dir}\n", log="format: json\n  level: info"))
    senders = {"transactional": "a@t.sched.test", "normal": "a@n.sched.test",
               "bulk": "a@b.sched.test"}
    submitted: dict[str, str] = {}
    for i in range(10):
        for lane in reversed(ORDER):  # lowest lane first: order at the sink is not arrival
            sent = stack.send(senders[lane], ["rcpt@dest.sched.test"], f"{lane}-{i:02d}")
            assert sent.queued, sent.replies()
            submitted[sent.queue_id] = lane
    stack.wait_queue(lambda q: len([m for m in q if m.queue_name == "hold"]) == 30, 60)
    assert len(hold_records(redis_clean)) == 30
    assert stack.sink.messages() == []

    scheduler.start()
    messages = stack.sink.wait_for(lambda m: len(m) >= 30, 60)
    assert len(messages) == 30, scheduler.log_text()[-3000:]
    # The order is the scheduler's: the order it released them in (its log, one line per
    # message, in release order). Once released, Postfix delivers each as fast as it can;
    # on a loaded machine one delivery may overtake the one released 0.2 s before it.
    poll(lambda: len(released_in_order(scheduler.log_text())) >= 30, 30,
         "the scheduler to log its 30 releases")  # its log is written every 50 ms
    released = released_in_order(scheduler.log_text())
    assert [queue_id for queue_id, _, _ in released] == sorted(
        submitted, key=lambda q: (ORDER.index(submitted[q]), list(submitted).index(q)))
    # highest lane first: every message of a lane before any of the next one (the shared
    # destination budget lets one message out at a time, to the highest lane first)
    assert [lane for _, lane, _ in released] == (["transactional"] * 10 + ["normal"] * 10
                                                 + ["bulk"] * 10), released
    arrivals = sorted(messages, key=lambda m: m.received_at)
    for lane in ORDER:
        mine = [m for m in arrivals if subject(m).startswith(lane)]
        assert sorted(subject(m) for m in mine) == [f"{lane}-{i:02d}" for i in range(10)]
    # Paced, as the scheduler released them (not as Postfix then delivered them): the
    # budgets let the releases out no faster than their rate, however fast or slow the
    # machine; each time is logged after that release's Postfix commands, whose duration
    # may shorten a span by up to the 1.5 s allowed. Unpaced, a span would be about 0.
    times = [ts for _, _, ts in released]
    # the bulk lane's own release rate, 2/s with a burst of 1: 9 intervals of 0.5 s
    assert times[29] - times[20] >= 9 * 0.5 - 1.5, times
    # the destination's budget, 5/s with a burst of 1, for the 20 before: 19 of 0.2 s
    assert times[19] - times[0] >= 19 * 0.2 - 1.5, times
    # every delivery left through its lane's transport (the RCPT answer's FILTER)
    for message in (arrivals[0], arrivals[-1]):
        delivery = stack.delivery_of(message)
        lane = subject(message).split("-")[0]
        assert delivery.transport == {"transactional": "mq-transactional", "normal": "smtp",
                                      "bulk": "mq-bulk"}[lane]
    poll(lambda: not hold_records(redis_clean), 30, "the hold records to be deleted")
    assert not held(stack)


def test_mail_held_by_a_limit_leaves_no_faster_than_the_limit_allows(
    stack: MailStack, scheduler: MqpolicyProcess, redis_clean: RedisServer,
) -> None:
    """15/1m (one message every 4 s) with a burst of 2 and action hold: of 5 messages sent
    at once, 2 leave and the others wait in the hold queue. Counting every message of the
    sender, the n-th to arrive does so no earlier than the budget allows (2 at once, then
    one every 4 s): a hold waits for the limit's budget and its release spends it. (Were
    releases free, every held message would leave together at the next pass.)"""
    interval_s = 4.0
    restart_serve(stack, redis_policy(redis_clean, lanes((), {}) + f"""\
limits:
  - name: per-sender
    rate: 15/1m
    burst: 2
    key: sender
    count: messages
    action: hold
scheduler:
  interval: 1s
  lock_ttl: 5s
  postfix_config_dir: {stack.postfix.config_dir}
"""))
    scheduler.start()
    sender = "flood@n.sched.test"
    started = time.time()  # before the first message spends the budget
    for i in range(5):
        assert stack.send(sender, ["r@flood.sched.test"], f"flood-{i}").queued
    sent_s = time.time() - started
    messages = stack.sink.wait_for(lambda m: len(m) >= 5, 60)
    arrivals = sorted(m.received_at - started for m in messages)
    assert sorted(subject(m) for m in messages) == [f"flood-{i}" for i in range(5)]
    for n, arrived in enumerate(arrivals, start=1):
        earliest = max(0.0, (n - 2) * interval_s)
        assert arrived >= earliest, (n, arrivals)
    if sent_s < interval_s:  # the usual case: only the burst left at once, the scheduler
        # released the rest (its log is written every 50 ms: wait for it)
        poll(lambda: len(released_in_order(scheduler.log_text())) >= 3, 10,
             "3 releases in the scheduler's log")
    poll(lambda: not hold_records(redis_clean), 10, "the hold records to be deleted")


# ---------------------------------------------------------------- kill and restart


def test_killed_mid_release_every_message_arrives_exactly_once_and_operator_holds_stay(
    stack: MailStack, scheduler: MqpolicyProcess, redis_clean: RedisServer,
) -> None:
    restart_serve(stack, redis_policy(redis_clean, lanes(("bulk",), {"bulk": "4/1s"})
                                      + CLASSIFY + f"""\
scheduler:
  interval: 500ms
  lock_ttl: 2s
  postfix_config_dir: {stack.postfix.config_dir}
""", log="format: kv\n  level: debug"))
    # an operator's hold: a deferred message put on hold by hand, no record
    stack.sink.set_reply("busy.sched.test", "421 4.7.0 Try again later")
    operator = stack.send("op@n.sched.test", ["x@busy.sched.test"], "operator-held")
    assert operator.queued
    stack.wait_queue(lambda q: any(m.queue_id == operator.queue_id
                                   and m.queue_name == "deferred" for m in q), 60)
    stack.postfix.run(POSTSUPER.path, "-c", str(stack.postfix.config_dir), "-h", operator.queue_id)
    stack.sink.set_reply("busy.sched.test", None)

    for i in range(16):
        assert stack.send("k@b.sched.test", [f"r{i}@kill.sched.test"], f"kill-{i:02d}").queued
    stack.wait_queue(lambda q: len([m for m in q if m.queue_name == "hold"]) == 17, 60)

    scheduler.start()
    stack.sink.wait_for(lambda m: len(m) >= 4, 30)
    scheduler.kill()
    scheduler.start()  # the lease of the killed one runs out (2 s), then it reconciles
    messages = stack.sink.wait_for(lambda m: len(m) >= 16, 60)
    log = scheduler.log_text()
    assert "reconciled" in log and "msg=released" in log, log
    poll(lambda: not hold_records(redis_clean), 30, "the hold records to be deleted")
    # two more passes: nothing else leaves
    passes_before = log.count("reconciled")
    passes = passes_logged(scheduler.log_text())
    poll(lambda: passes_logged(scheduler.log_text()) >= passes + 2, 30,
         "two more scheduler passes")
    subjects = sorted(subject(m) for m in stack.sink.messages())
    assert subjects == [f"kill-{i:02d}" for i in range(16)], subjects  # exactly once each
    assert len(messages) == 16
    assert [m.queue_id for m in held(stack)] == [operator.queue_id]  # never released
    assert scheduler.log_text().count("reconciled") == passes_before


# ---------------------------------------------------------------- scheduled delivery


def test_deliver_after_is_honoured_for_allowed_senders_and_stripped_for_others(
    stack: MailStack,
) -> None:
    socket_path = stack.root / "milter.sock"
    policy = BASE_POLICY + f"""\
milter:
  listen: unix:{socket_path}
  listen_mode: "0666"
scheduler:
  interval: 1s
  lock_ttl: 5s
  postfix_config_dir: {stack.postfix.config_dir}
  schedule:
    allow: {{sender: "@app.sched.test"}}
    max_delay: 1h
"""
    restart_serve(stack, policy)
    generated = subprocess.run(
        [sys.executable, "-m", "mqpolicy", "postfix-config", "-c", str(stack.policy_file),
         "--config-directory", str(stack.postfix.config_dir), "--milter", f"unix:{socket_path}"],
        capture_output=True, text=True, check=True).stdout
    write_postfix(stack, generated)
    stack.postfix_config = generated

    started = time.time()
    later = stack.send("app@app.sched.test", ["r@x.sched.test"], "later",
                       headers={"X-MQ-Deliver-After": "+20s"})
    assert later.queued, later.replies()
    ignored = stack.send("other@else.sched.test", ["r@x.sched.test"], "not allowed",
                         headers={"X-MQ-Deliver-After": "+20s",
                                  "Deferred-Delivery": "Fri, 01 Jan 2100 00:00:00 +0000"})
    assert ignored.queued, ignored.replies()

    (now,) = stack.sink.wait_for(lambda m: len(m) >= 1, 15)
    assert subject(now) == "not allowed"
    assert now.header("X-MQ-Deliver-After") is None  # stripped
    assert now.header("Deferred-Delivery") is None
    assert [m.queue_id for m in held(stack)] == [later.queue_id]

    messages = stack.sink.wait_for(lambda m: len(m) >= 2, 60)
    (scheduled,) = [m for m in messages if subject(m) == "later"]
    assert scheduled.received_at - started >= 20.0  # never before its time
    assert scheduled.received_at - started <= 20.0 + 60  # and released, not kept held
    assert scheduled.header("X-MQ-Deliver-After") is None
    assert scheduled.header("X-MQ-Lane") == "normal"
    assert not held(stack)
    poll(lambda: f"msg=released qid={later.queue_id}" in stack.server.log_tail(400), 30,
         "the release in mqpolicy's log")


def test_queue_command_shows_held_mail_per_lane_and_destination(
    stack: MailStack, redis_clean: RedisServer,
) -> None:
    restart_serve(stack, redis_policy(redis_clean, lanes(("bulk",), {}) + CLASSIFY + f"""\
scheduler:
  postfix_config_dir: {stack.postfix.config_dir}
"""))
    for i in range(3):
        assert stack.send("q@b.sched.test", [f"r{i}@shape.sched.test"], f"shape-{i}").queued
    stack.wait_queue(lambda q: len([m for m in q if m.queue_name == "hold"]) == 3, 60)
    out = subprocess.run([sys.executable, "-m", "mqpolicy", "queue", "-c",
                          str(stack.policy_file)], capture_output=True, text=True, check=True)
    assert "held by mqpolicy: 3" in out.stdout, out.stdout
    assert any(line.split()[:4] == ["bulk", "shape.sched.test", "3", "3"]
               for line in out.stdout.splitlines()), out.stdout
    out = subprocess.run([sys.executable, "-m", "mqpolicy", "queue", "-c",
                          str(stack.policy_file), "--json"],
                         capture_output=True, text=True, check=True)
    shape = json.loads(out.stdout)
    assert [(g["lane"], g["held"], g["due"]) for g in shape["lanes"]] == [("bulk", 3, 3)]
    assert [(g["destination"], g["held"]) for g in shape["destinations"]] == [
        ("shape.sched.test", 3)]
    assert shape["queues"]["hold"] == 3 and shape["foreign"] == [] and shape["broken"] == []
    with redis.Redis(unix_socket_path=redis_clean.unix_path) as client:
        assert len(client.keys("e2e:hold:default:rec:*")) == 3
