"""Pause by rule through a real Postfix: a receiver answering a configured code pauses its
destination; the next mail to it is accepted and held, other destinations flow."""

from __future__ import annotations

import uuid

import pytest

from mqpolicy.lab.mail_stack import MailStack
from tests.support.postfix_fixture import held, policy, unique_address

pytestmark = pytest.mark.e2e

TIMEOUT_S = 60.0  # generous: a loaded machine; each wait ends when it is met


def test_a_sink_answering_4_7_28_pauses_its_destination_by_rule(stack: MailStack) -> None:
    tag = uuid.uuid4().hex[:8]
    hit, calm = f"rulehit-{tag}.example", f"ruleok-{tag}.example"
    # the mail log through a path of its own: the session's serve log is shared, and a
    # later test waiting for "following the delivery log" with the real path must not
    # find this test's line
    maillog = stack.root / f"maillog-{tag}"
    maillog.symlink_to(stack.root / "postfix" / "log" / "maillog")
    stack.apply_policy(policy(f"""\
destinations:
  - {{name: rulehit{tag}, domains: [{hit}], rate: 100/1m}}
  - {{name: ruleok{tag}, domains: [{calm}], rate: 100/1m}}
feedback:
  log: {maillog}
  poll_interval: 100ms
  rules:
    - {{match: "4\\\\.7\\\\.28", action: pause, for: 1h}}
"""))
    stack.server.wait_logged("following the delivery log", str(maillog))
    stack.sink.set_reply(hit, "421 4.7.28 Our system has detected an unusual rate")
    try:
        first = stack.send(unique_address("rule"), [f"first@{hit}"], "first")
        assert first.queued, first.replies()
        line = stack.server.wait_logged("destination paused by rule",
                                        f"destination=rulehit{tag}")
        assert "421 4.7.28 Our system has detected an unusual rate" in line  # the evidence
        assert f"to=<first@{hit}>" in line
        # the pause is in force: accepted, never refused, and held
        then = stack.send(unique_address("rule"), [f"then@{hit}"], "then")
        assert then.queued, then.replies()
        stack.wait_queue(lambda q: any(m.queue_id == then.queue_id and m.queue_name == "hold"
                                       for m in q), TIMEOUT_S)
        other = stack.send(unique_address("rule"), [f"other@{calm}"], "other")
        assert other.queued, other.replies()
        arrived = stack.sink.wait_for(
            lambda m: any(x.header("Subject") == "other" for x in m), TIMEOUT_S)
        assert "then" not in [m.header("Subject") for m in arrived]
        assert [m.queue_id for m in held(stack)] == [then.queue_id]
    finally:
        stack.sink.set_reply(hit, None)
