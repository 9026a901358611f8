"""A private real Postfix for end-to-end tests: one per test session, never the system one.

``mail_stack_session`` (session): a :class:`~mqpolicy.postfix_instance.MailStack`: a
private Postfix (own config, queue, data and log directories, fresh loopback ports), an
SMTP sink behind it, and ``mqpolicy serve`` beside it. Postfix's mqpolicy settings are the
output of the ``mqpolicy postfix-config`` command for the current policy file: no
hand-written copy.

``mail_stack`` (function): the same stack, handed over clean: the policy server running,
an empty queue and sink, normal sink replies. Afterwards it is cleaned again and the base
policy restored (a test may swap the policy with ``apply_policy``, a SIGHUP reload, and
stop the policy server). Counters live in the policy server's memory store for the whole
session: tests use their own addresses (:func:`unique_address`).

Everything is stopped by PID at the end of the session, even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

from mqpolicy.postfix_instance import POSTFIX, MailStack

# The lanes every end-to-end test uses: keeping them fixed means a policy swap never
# changes Postfix's configuration (no Postfix reload between tests).
LANES = """\
lanes:
  - name: transactional
    transport: mq-transactional
    concurrency: 10
  - name: normal
    transport: smtp
  - name: bulk
    transport: mq-bulk
    concurrency: 2
    initial_concurrency: 2
default_lane: normal
"""

BASE_POLICY = LANES + """\
store:
  url: memory://
  timeout_ms: 200
log:
  format: kv
  level: info
"""


def policy(body: str) -> str:
    """A full policy: the base (lanes, store, log) plus ``body`` (classify, limits...)."""
    return BASE_POLICY + body


def unique_address(local: str, domain: str = "example.com") -> str:
    """An address no other test uses (budgets are keyed on it and live all session)."""
    return f"{local}-{uuid.uuid4().hex[:10]}@{domain}"


def _skip_reason() -> str | None:
    if not os.access(POSTFIX, os.X_OK):
        return f"{POSTFIX} not installed"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    if shutil.which("postconf") is None and not os.access("/usr/sbin/postconf", os.X_OK):
        return "postconf not installed"
    return None


@pytest.fixture(scope="session")
def mail_stack_session() -> Iterator[MailStack]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    stack = MailStack.create(prefix="mqe2e-")
    try:
        stack.start(BASE_POLICY)
        yield stack
    finally:
        stack.remove()


@pytest.fixture
def mail_stack(mail_stack_session: MailStack) -> Iterator[MailStack]:
    stack = mail_stack_session
    if not stack.server.running:
        stack.server.start()
    stack.reset()
    try:
        yield stack
    finally:
        if not stack.server.running:
            stack.server.start()
        stack.apply_policy(BASE_POLICY)
        stack.reset()
