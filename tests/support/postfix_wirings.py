"""A real Postfix wired to mqpolicy in each of the counting contract's wirings, running the
cells' policy (tests/support/wiring_cells.py):

* **P**: the policy server only: the policy has no ``milter:`` section and Postfix gets
  what ``mqpolicy postfix-config`` prints for it (the milter lines commented out);
* **M**: the milter only: ``milter: {rcpt_limits: milter}`` and the output of
  ``mqpolicy postfix-config --milter unix:SOCKET`` without its two ``check_policy_service``
  entries (smtpd_recipient_restrictions, smtpd_end_of_data_restrictions);
* **B**: both hooks and the milter: ``milter: {rcpt_limits: policy_server}`` and the
  output of ``mqpolicy postfix-config --milter unix:SOCKET`` as printed;
* **B2**: B as two processes on a Redis store of their own (``serve`` for the policy
  hooks, ``mqpolicy milter`` for the milter), as ``contrib/systemd`` can run them: what
  one front-end spends or gives back, the other sees only through the store.

``postfix_wiring`` (session, one parameter per wiring): one
:class:`~mqpolicy.lab.mail_stack.MailStack` per wiring (a private Postfix, its SMTP sink
and ``mqpolicy serve`` with an admin socket), shared by every test of that wiring; pytest
runs the tests of one wiring together and removes its stack before the
next one starts. Budgets are read through serve's admin socket (``counters.show``), hold
records through its ``queue`` operation; the lane a message left in is the transport
Postfix's delivery log names (and, with a milter, the ``X-MQ-Lane`` header the sink got).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from mqpolicy.admin.codec import decode_answer, encode_request
from mqpolicy.lab.mail_stack import MailStack
from mqpolicy.lab.readiness import poll
from mqpolicy.lab.smtp_client import Submission
from mqpolicy.postfix.settings import (
    HEADER_CHECKS_FILE,
    LANE_HEADER,
    SECTION_HEADER_CHECKS,
    SECTION_MAIN,
    SECTION_MASTER,
    split_sections,
)
from tests.support.postfix_fixture import (
    BASE_POLICY,
    LANES,
    milter_postfix_config,
    milter_socket,
    new_stack,
)
from tests.support.redis_fixture import REDIS_SERVER_BIN, RedisServer, running_in_tmpdir
from tests.support.serve_process import MqpolicyProcess
from tests.support.wiring_cells import BURSTS, CELLS, send_with_helo

TIMEOUT_S = 60.0  # generous: a loaded machine; each wait ends when it is met
WIRINGS = ("P", "M", "B", "B2")
TRANSPORT_LANES = {"smtp": "normal", "mq-bulk": "bulk", "mq-transactional": "transactional"}
POLICY_HOOKS = ("smtpd_recipient_restrictions", "smtpd_end_of_data_restrictions")


def admin_ask(path: Path, op: str, args: Mapping[str, Any] | None = None) -> Any:
    """One request on serve's admin socket; its result (AssertionError on an error)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.connect(str(path))
        sock.sendall(encode_request(op, args))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"the admin socket closed before answering {op}")
            data += chunk
    answer = decode_answer(data.rstrip(b"\n"))
    assert answer.ok, f"admin {op}: {answer.error}: {answer.message}"
    return answer.result


def without_policy_hooks(main_cf: str) -> str:
    """main.cf lines without the settings that call the policy server (a setting's
    indented continuation lines go with it)."""
    out: list[str] = []
    skipping = False
    for line in main_cf.splitlines():
        if line[:1].isspace() and skipping:
            continue
        skipping = any(line.startswith(f"{name} =") for name in POLICY_HOOKS)
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def active_settings(main_cf: str) -> dict[str, str]:
    """The settings a main.cf block sets (comments skipped, continuation lines joined)."""
    settings: dict[str, str] = {}
    last = ""
    for line in main_cf.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[:1].isspace() and last:
            settings[last] = f"{settings[last]} {line.strip()}".strip()
            continue
        name, _, value = line.partition("=")
        last = name.strip()
        settings[last] = value.strip()
    return settings


class PostfixWiring:
    """One wiring: its stack, its policy and what the cells ask of it."""

    def __init__(self, name: str, stack: MailStack, admin: Path, logs: Sequence[Path]) -> None:
        self.name = name
        self.stack = stack
        self.admin = admin
        self.logs = tuple(logs)  # where mqpolicy logs its decisions

    @property
    def sees_headers(self) -> bool:
        return self.name != "P"

    @property
    def main_cf(self) -> str:
        return split_sections(self.stack.postfix_config)[SECTION_MAIN]

    def send(self, helo: str, sender: str, recipients: Sequence[str], subject: str,
             headers: Mapping[str, str] | None = None, body: str = "") -> Submission:
        return send_with_helo(self.stack.smtp_port, helo, sender, recipients, subject,
                              headers, body)

    def lane_left_in(self, subject: str) -> str:
        message = self.stack.sink.wait_for_subject(subject, TIMEOUT_S)
        delivery = self.stack.delivery_of(message, TIMEOUT_S)
        lane = TRANSPORT_LANES.get(delivery.transport, f"transport {delivery.transport}")
        # with a milter, its header is what Postfix turned into the transport
        header = message.header_values(LANE_HEADER)
        assert header == ([lane] if self.sees_headers else []), (
            f"wiring {self.name}: {subject!r} left through {delivery.transport} "
            f"(lane {lane}) with {LANE_HEADER} {header}")
        return lane

    def wait_held(self, sent: Submission, subject: str) -> None:
        assert sent.queue_id, sent.replies()
        sink = self.stack.sink

        def held() -> bool:
            if any(m.header("Subject") == subject for m in sink.messages()):
                raise AssertionError(f"wiring {self.name}: {subject!r} was delivered, in "
                                     f"lane {self.lane_left_in(subject)}, not held")
            return any(m.queue_id == sent.queue_id and m.queue_name == "hold"
                       for m in self.stack.postfix.queue())

        poll(held, TIMEOUT_S, f"{sent.queue_id} in the hold queue", interval_s=0.1)

    def recipients_of(self, subject: str) -> tuple[str, ...]:
        return self.stack.sink.wait_for_subject(subject, TIMEOUT_S).rcpt_tos

    def queue_id(self, sent: Submission) -> str:
        assert sent.queue_id, sent.replies()
        return sent.queue_id

    def held_records(self, destination: str) -> list[tuple[str, int]]:
        summary = admin_ask(self.admin, "queue")
        return [(group["lane"], group["held"]) for group in summary["destinations"]
                if group.get("destination") == destination]

    def remaining(self, limit: str, key: str) -> int:
        result = admin_ask(self.admin, "counters.show", {"limit": limit, "key": key})
        rows = [row for row in result["rows"] if row["key"] == key]
        if not rows:  # never spent (or full again and forgotten)
            return BURSTS[limit]
        (row,) = rows
        return int(row["remaining"])

    def check(self) -> subprocess.CompletedProcess[str]:
        """``mqpolicy check`` on this wiring's policy file."""
        return subprocess.run([*self.stack.command, "check", "-c", str(self.stack.policy_file)],
                              capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
                              stdin=subprocess.DEVNULL)

    def serve_log(self) -> str:
        return "".join(path.read_text("utf-8", "replace") for path in self.logs
                       if path.exists())


def wiring_policy(name: str, stack: MailStack, admin: Path, *, store: str = "memory://",
                  milter_at: Path | None = None) -> str:
    """The cells' policy for a wiring: its store, an admin socket, the scheduler's view of
    this Postfix (its passes an hour apart: nothing is released during the tests), and in
    M and B the milter (on ``milter_at``, else the socket Postfix is given)."""
    text = LANES + f"""\
store: {{url: "{store}", timeout_ms: 2000, key_prefix: "cells:"}}
log: {{format: kv, level: info}}
admin: {{listen: "unix:{admin}", mode: "0600"}}
scheduler:
  interval: 1h
  lock_ttl: 2h
  postfix_config_dir: {stack.postfix.config_dir}
"""
    if name != "P":
        rcpt_limits = "milter" if name == "M" else "policy_server"
        text += f"""\
milter:
  listen: unix:{milter_at or milter_socket(stack)}
  listen_mode: "0666"
  rcpt_limits: {rcpt_limits}
"""
    return text + CELLS


@contextlib.contextmanager
def wired_stack(name: str) -> Iterator[PostfixWiring]:
    """A stack of its own in wiring ``name``, removed with all it started at the end.

    ``B2`` is B as two processes sharing a Redis store of their own: ``serve`` answers the
    policy hooks (its own milter listens where Postfix never connects) and ``mqpolicy
    milter`` answers Postfix's milter connections, from the same policy."""
    with contextlib.ExitStack() as resources:
        stack = resources.enter_context(new_stack(f"mqwire{name}-"))
        stack.start(BASE_POLICY)  # Postfix exists from here on: its directories are known
        admin = stack.root / "admin.sock"
        logs = [stack.server.log_file]
        stack.server.stop()  # admin, scheduler and milter are read at start
        if name == "B2":
            if not os.access(REDIS_SERVER_BIN, os.X_OK):
                pytest.skip(f"{REDIS_SERVER_BIN} not available")
            redis = resources.enter_context(running_in_tmpdir("mqredis-", RedisServer))
            stack.apply_policy(wiring_policy(name, stack, admin, store=redis.unix_url,
                                             milter_at=stack.root / "unused-milter.sock"))
            milter_file = stack.root / "milter-policy.yaml"
            milter_file.write_text(wiring_policy(name, stack, admin, store=redis.unix_url))
            milter = MqpolicyProcess("milter", milter_file, stack.root / "milter.log")
            resources.callback(milter.stop)
            milter.start(str(milter_socket(stack)), timeout=TIMEOUT_S)
            logs.append(milter.log_path)
        else:  # P: postfix-config as printed for a policy without a milter
            stack.apply_policy(wiring_policy(name, stack, admin))
        if name != "P":
            text = milter_postfix_config(stack)
            sections = split_sections(text)
            main = sections[SECTION_MAIN]
            if name == "M":
                main = without_policy_hooks(main)
                text = text.replace(sections[SECTION_MAIN], main)
            stack.postfix.write_config(main, sections[SECTION_MASTER],
                                       {HEADER_CHECKS_FILE: sections[SECTION_HEADER_CHECKS]})
            stack.postfix.reload()
            stack.postfix_config = text
        yield PostfixWiring(name, stack, admin, logs)


@pytest.fixture(scope="session", params=WIRINGS)
def postfix_wiring(request: pytest.FixtureRequest) -> Iterator[PostfixWiring]:
    with wired_stack(str(request.param)) as wiring:
        yield wiring
