"""Backoff from delivery results through a real Postfix: a destination whose receiver
answers 421 gets a smaller budget at SMTP time, others keep theirs, and it recovers."""

from __future__ import annotations

import uuid

import pytest

from mqpolicy.lab.mail_stack import MailStack
from tests.support.postfix_fixture import policy, unique_address

pytestmark = pytest.mark.e2e

def accepted(stack: MailStack, recipients: list[str]) -> list[bool]:
    sent = stack.send(unique_address("fb"), recipients, "feedback")
    return [r in sent.accepted for r in recipients]


def test_421_backs_the_destination_off_and_success_brings_it_back(
        mail_stack: MailStack) -> None:
    tag = uuid.uuid4().hex[:8]
    busy, calm = f"busy-{tag}.example", f"calm-{tag}.example"
    maillog = mail_stack.root / "postfix" / "log" / "maillog"
    mail_stack.apply_policy(policy(f"""\
destinations:
  - {{name: busy, domains: [{busy}], rate: 6/1h}}
  - {{name: calm, domains: [{calm}], rate: 6/1h}}
feedback:
  log: {maillog}
  poll_interval: 100ms
  backoff: {{decrease: 0.5, cooldown: 0s, recover_after: 1, recover_interval: 0s,
            recover_step: 0.5}}
"""))
    mail_stack.server.wait_logged("following the delivery log", str(maillog))
    mail_stack.sink.set_reply(busy, "421 4.7.0 Try again later")

    # one recipient of six: Postfix tries, the receiver answers 421, the log says so
    assert accepted(mail_stack, [f"first@{busy}"]) == [True]
    line = mail_stack.server.wait_logged("destination backed off", "destination=busy")
    assert "new_factor=0.5" in line
    assert "421 4.7.0 Try again later" in line  # the evidence

    # half the budget now (burst 3, one slot taken by the first at the normal rate):
    # two more get through, then the client is told to come back later
    assert accepted(mail_stack, [f"r{i}@{busy}" for i in range(3)]) == [True, True, False]
    # another destination keeps its whole budget
    assert accepted(mail_stack, [f"r{i}@{calm}" for i in range(6)]) == [True] * 6

    # the receiver recovers: the deferred mail goes out and, one success at a time
    # (recover_step 0.5), the budget comes back whole
    mail_stack.sink.set_reply(busy, None)
    mail_stack.postfix.flush()
    line = mail_stack.server.wait_logged("destination recovering", "destination=busy",
                       "new_factor=1.0")
    assert "status=sent" in line
    assert accepted(mail_stack, [f"again@{busy}"]) == [True]
