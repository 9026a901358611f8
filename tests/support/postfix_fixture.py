"""A private real Postfix for end-to-end tests: one per test session, never the system one.

``mail_stack_session`` (session): a :class:`~mqpolicy.lab.mail_stack.MailStack`: a
private Postfix (own config, queue, data and log directories, fresh loopback ports), an
SMTP sink behind it, and ``mqpolicy serve`` beside it. Postfix's mqpolicy settings are the
output of the ``mqpolicy postfix-config`` command for the current policy file: no
hand-written copy.

``mail_stack`` (function): the same stack, handed over clean: the policy server running,
an empty queue and sink, normal sink replies. Afterwards it is cleaned again and the base
policy restored (a test may swap the policy with ``apply_policy``, a SIGHUP reload, and
stop the policy server). Counters live in the policy server's memory store for the whole
session: tests use their own addresses (:func:`unique_address`).

``milter_stack`` (function): ``mail_stack`` with the mqpolicy milter wired in for one test
(see "The milter, opt-in" below); the other tests run without it.

Everything is stopped by PID at the end of the session, even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mqpolicy.lab.mail_stack import MailStack
from mqpolicy.postfix.programs import POSTCONF, POSTFIX
from mqpolicy.postfix.settings import (
    HEADER_CHECKS_FILE,
    SECTION_HEADER_CHECKS,
    SECTION_MAIN,
    SECTION_MASTER,
    split_sections,
)
from mqpolicy.scheduler.mta_queue import QueueEntry

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
    if not os.access(POSTFIX.path, os.X_OK):
        return f"{POSTFIX.path} not installed"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    if not os.access(POSTCONF.path, os.X_OK):
        return f"{POSTCONF.path} not installed"
    return None


@contextlib.contextmanager
def new_stack(prefix: str, **kwargs: Any) -> Iterator[MailStack]:
    """A MailStack of its own (skipped where a private Postfix cannot run), removed with
    everything it started at the end, whatever happened."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    stack = MailStack.create(prefix=prefix, **kwargs)
    try:
        yield stack
    finally:
        stack.remove()


@pytest.fixture(scope="session")
def mail_stack_session() -> Iterator[MailStack]:
    with new_stack("mqe2e-") as stack:
        stack.start(BASE_POLICY)
        yield stack


@pytest.fixture
def unix_socket_stack() -> Iterator[MailStack]:
    """A stack of its own (not started) whose policy server listens on a unix socket inside
    Postfix's queue directory: the set-up the README recommends for a Postfix on the same
    host. The test starts it with its policy."""
    with new_stack("mqe2e-unix-", policy_socket="unix") as stack:
        yield stack


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


# ---------------------------------------------------------------- the milter, opt-in
# ``milter_stack`` wires the milter into the session stack for one test: ``mqpolicy serve``
# is restarted on a policy with a ``milter:`` section (a unix socket inside Postfix's queue
# directory, as recommended: postfix-config names it relative to it, so every milter test
# also proves Postfix resolves that name), and Postfix gets the output of ``mqpolicy
# postfix-config --milter unix:PATH`` (smtpd_milters, non_smtpd_milters,
# milter_default_action, the header-checks map) and a reload. Afterwards Postfix gets its
# previous configuration back and serve runs the base policy again. A test switches
# policies with ``stack.apply_policy(milter_policy(stack, body))``: the lanes stay those of
# LANES, so Postfix's configuration does not change and the milter wiring stays.

MILTER_SOCKET = "mqpolicy/milter.sock"  # inside the queue directory


def milter_socket(stack: MailStack) -> Path:
    path = stack.postfix.queue_dir / MILTER_SOCKET
    path.parent.mkdir(exist_ok=True)
    return path


def milter_policy(stack: MailStack, body: str = "") -> str:
    """The base policy with the milter on the stack's socket, plus ``body``.

    ``rcpt_limits: policy_server``: this Postfix asks the policy server at RCPT too, so the
    milter decides RCPT only for locally submitted mail (which never meets smtpd)."""
    return BASE_POLICY + f"""\
milter:
  listen: unix:{milter_socket(stack)}
  listen_mode: "0666"
  rcpt_limits: policy_server
""" + body


def write_postfix_config(stack: MailStack, text: str) -> None:
    """Configure the stack's Postfix from ``mqpolicy postfix-config`` output; reload."""
    sections = split_sections(text)
    stack.postfix.write_config(sections[SECTION_MAIN], sections[SECTION_MASTER],
                               {HEADER_CHECKS_FILE: sections[SECTION_HEADER_CHECKS]})
    stack.postfix.reload()
    stack.postfix_config = text


def milter_postfix_config(stack: MailStack) -> str:
    """``mqpolicy postfix-config --milter unix:SOCKET`` for the stack's policy file."""
    return subprocess.run(
        [*stack.command, "postfix-config", "-c", str(stack.policy_file),
         "--config-directory", str(stack.postfix.config_dir),
         "--milter", f"unix:{milter_socket(stack)}"],
        capture_output=True, text=True, timeout=60, check=True, stdin=subprocess.DEVNULL,
    ).stdout


@pytest.fixture
def milter_stack(mail_stack: MailStack) -> Iterator[MailStack]:
    stack = mail_stack
    written = stack.postfix_config
    try:
        stack.server.stop()  # a milter: section takes effect at start, not on SIGHUP
        stack.apply_policy(milter_policy(stack))
        write_postfix_config(stack, milter_postfix_config(stack))
        yield stack
    finally:
        stack.server.stop()
        if stack.postfix_config != written:
            write_postfix_config(stack, written)
        stack.postfix.delete("ALL", "maildrop")  # local submissions the milter deferred
        stack.apply_policy(BASE_POLICY)  # starts serve again, without the milter


# Shared by the scheduler and admin-socket tests.

ORDER = ("transactional", "normal", "bulk")


def lanes(hold: tuple[str, ...], rates: dict[str, str]) -> str:
    """The fixture's lanes (same transports: Postfix's configuration does not change) with
    holds and release rates."""
    out = ["lanes:"]
    transports = {"transactional": "mq-transactional\n    concurrency: 10",
                  "normal": "smtp",
                  "bulk": "mq-bulk\n    concurrency: 2\n    initial_concurrency: 2"}
    for lane in ORDER:
        out.append(f"  - name: {lane}\n    transport: {transports[lane]}")
        if lane in hold:
            out.append("    hold: true")
        if lane in rates:
            out.append(f"    release_rate: {rates[lane]}\n    release_burst: 1")
    out.append("default_lane: normal")
    return "\n".join(out) + "\n"


@pytest.fixture
def stack(mail_stack: MailStack) -> Iterator[MailStack]:
    """The session stack; afterwards the base policy (memory store, no milter) again."""
    written = mail_stack.postfix_config
    try:
        yield mail_stack
    finally:
        mail_stack.server.stop()
        if mail_stack.postfix_config != written:  # a test added the milter
            write_postfix(mail_stack, written)
            mail_stack.postfix_config = written
        with contextlib.suppress(Exception):
            mail_stack.postfix.delete("ALL")
        mail_stack.apply_policy(BASE_POLICY)  # restarts mqpolicy serve on the memory store


def write_postfix(stack: MailStack, text: str) -> None:
    sections = split_sections(text)
    stack.postfix.write_config(sections[SECTION_MAIN], sections[SECTION_MASTER],
                               {HEADER_CHECKS_FILE: sections[SECTION_HEADER_CHECKS]})
    stack.postfix.reload()


def restart_serve(stack: MailStack, policy_text: str) -> None:
    """mqpolicy serve with a new store or milter needs a restart, not a reload."""
    stack.server.stop()
    stack.apply_policy(policy_text)


def held(stack: MailStack) -> list[QueueEntry]:
    return [m for m in stack.postfix.queue() if m.queue_name == "hold"]
