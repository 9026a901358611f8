"""Pauses through the session's real Postfix (tests/support/postfix_fixture.py) with a
Redis store and ``mqpolicy scheduler`` as its own process: mail to a paused destination is
accepted and held, the rest flows; a restart of ``serve`` keeps the pause; resume releases
the held mail highest lane first; ``--for`` ends by itself. Each test restores the
session's base policy afterwards (the ``stack`` fixture)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import pytest

from mqpolicy.lab.mail_stack import MailStack
from mqpolicy.lab.readiness import poll
from mqpolicy.policy.pauses import Pause
from mqpolicy.store.backoff_states import RedisBackoffStore
from tests.support.mqpolicy_command import mq
from tests.support.postfix_fixture import ORDER, held, lanes, restart_serve
from tests.support.redis_fixture import RedisServer
from tests.support.serve_process import MqpolicyProcess

pytestmark = pytest.mark.e2e

BODY = """\
classify:
  - {name: t, when: {sender: "@t.pause.test"}, lane: transactional}
  - {name: b, when: {sender: "@b.pause.test"}, lane: bulk}
destinations:
  - {name: slow, domains: [slow.pause.test], rate: 100/1m}
scheduler:
  interval: 1s
  lock_ttl: 5s
"""
SENDERS = {"transactional": "a@t.pause.test", "normal": "a@n.pause.test",
           "bulk": "a@b.pause.test"}


def policy(stack: MailStack, server: RedisServer, body: str = BODY) -> str:
    # a store deadline a loaded machine meets: these tests are about pauses, not deadlines
    return (f"store:\n  url: {server.unix_url}\n  timeout_ms: 5000\n  key_prefix: \"pe2e:\"\n"
            "log:\n  format: json\n  level: info\n" + lanes((), {}) + body
            + f"  postfix_config_dir: {stack.postfix.config_dir}\n")


@pytest.fixture
def scheduler(stack: MailStack) -> Iterator[MqpolicyProcess]:
    # a log of its own (the stack's root lives all session, other tests log there too)
    log = stack.root / f"pause-scheduler-{uuid.uuid4().hex[:8]}.log"
    process = MqpolicyProcess("scheduler", stack.policy_file, log)
    try:
        yield process
    finally:
        process.stop()


def operator(stack: MailStack, *args: str) -> str:
    done = mq(*args[:1], "-c", str(stack.policy_file), *args[1:])
    assert done.returncode == 0, done.stderr
    return done.stdout


def logged(text: str, message: str) -> list[dict[str, object]]:
    """The records of a JSON log with ``msg`` ``message``, in order."""
    records = (json.loads(line) for line in text.splitlines() if line.startswith("{"))
    return [r for r in records if r.get("msg") == message]


def serve_log(stack: MailStack, message: str) -> list[dict[str, object]]:
    """serve's records of ``message`` (its log file is the session's: earlier tests too)."""
    return logged(stack.server.log_file.read_text("utf-8", "replace"), message)


def serve_sees(stack: MailStack, message: str, before: int) -> None:
    """Until serve has logged ``message`` more than ``before`` times (it reads pauses
    every second)."""
    poll(lambda: len(serve_log(stack, message)) > before, 30, f"serve to log {message!r}")


async def stored_pauses(server: RedisServer) -> list[Pause]:
    store = RedisBackoffStore(server.unix_url, key_prefix="pe2e:")
    try:
        return await store.pauses()
    finally:
        await store.close()


def released(scheduler_log: str) -> list[object]:
    """The lanes of the scheduler's ``released`` lines, in order."""
    return [r["lane"] for r in logged(scheduler_log, "released")]


def test_a_paused_destination_holds_its_mail_others_flow_resume_releases_in_lane_order(
    stack: MailStack, scheduler: MqpolicyProcess, redis_clean: RedisServer,
) -> None:
    restart_serve(stack, policy(stack, redis_clean))
    before = len(serve_log(stack, "paused"))
    assert "paused destination slow until resumed" in operator(
        stack, "pause", "destination", "slow", "--reason", "421 4.7.28")
    serve_sees(stack, "paused", before)
    scheduler.start()
    for lane in reversed(ORDER):  # lowest lane first: the release order is not arrival
        sent = stack.send(SENDERS[lane], ["u@slow.pause.test"], f"slow-{lane}")
        assert sent.queued, sent.replies()  # accepted, never refused
    sent = stack.send(SENDERS["normal"], ["u@fast.pause.test"], "fast")
    assert sent.queued, sent.replies()
    arrived = stack.sink.wait_for(lambda m: len(m) >= 1, 60)
    assert [m.header("Subject") for m in arrived] == ["fast"]
    stack.wait_queue(lambda q: len([m for m in q if m.queue_name == "hold"]) == 3, 60)

    # a restart of serve while paused: its first decisions already see the pause
    restart_serve(stack, policy(stack, redis_clean))
    sent = stack.send(SENDERS["transactional"], ["v@slow.pause.test"], "slow-after-restart")
    assert sent.queued, sent.replies()
    stack.wait_queue(lambda q: len([m for m in q if m.queue_name == "hold"]) == 4, 60)
    # the scheduler passes every second and releases none of it while paused
    poll(lambda: bool(logged(scheduler.log_text(), "reconciled")), 30,
         "the scheduler's first pass")
    assert len(stack.sink.messages()) == 1
    assert len(held(stack)) == 4
    queue = json.loads(operator(stack, "queue", "--json"))
    assert queue["paused"] == ["destination slow (421 4.7.28)"]
    assert {g["lane"]: (g["held"], g["paused"], g["due"]) for g in queue["lanes"]} == {
        "transactional": (2, 2, 0), "normal": (1, 1, 0), "bulk": (1, 1, 0)}
    assert "paused (held, not released): destination slow (421 4.7.28)" in operator(
        stack, "queue")

    assert "resumed destination slow (paused by operator: 421 4.7.28)" in operator(
        stack, "resume", "destination", "slow")
    messages = stack.sink.wait_for(lambda m: len(m) >= 5, 60)
    assert len(messages) == 5
    poll(lambda: len(released(scheduler.log_text())) >= 4, 30, "four releases logged")
    assert released(scheduler.log_text()) == ["transactional", "transactional", "normal",
                                              "bulk"]
    assert held(stack) == []


def test_a_pause_for_a_while_ends_by_itself(
    stack: MailStack, scheduler: MqpolicyProcess, redis_clean: RedisServer,
) -> None:
    # no destinations at all: the scheduler still reads the pauses
    no_destinations = BODY.replace(BODY[BODY.index("destinations:"):BODY.index("scheduler:")], "")
    restart_serve(stack, policy(stack, redis_clean, no_destinations))
    scheduler.start()
    paused, ended = len(serve_log(stack, "paused")), len(serve_log(stack, "pause ended"))
    operator(stack, "pause", "lane", "normal", "--for", "4s")
    (pause,) = asyncio.run(stored_pauses(redis_clean))
    assert pause.until_ms is not None
    serve_sees(stack, "paused", paused)
    sent = stack.send(SENDERS["normal"], ["u@any.pause.test"], "later")
    assert sent.queued, sent.replies()
    # held while the pause lasts (unless the machine took longer than the pause to get here)
    # and delivered once it has run out, with no command
    messages = stack.sink.wait_for(lambda m: len(m) >= 1, 60)
    assert [m.header("Subject") for m in messages] == ["later"]
    serve_sees(stack, "pause ended", ended)
    holds = [h["reason"] for h in serve_log(stack, "held") if h["qid"] == sent.queue_id]
    assert holds == ["paused: lane normal"]
    # released by the scheduler once the pause was over, not before
    poll(lambda: any(r["qid"] == sent.queue_id for r in logged(scheduler.log_text(), "released")),
         30, "the release logged")
    (release,) = [r for r in logged(scheduler.log_text(), "released") if r["qid"] == sent.queue_id]
    assert float(release["ts"]) * 1000 >= pause.until_ms
