"""Each part runs with exactly what its shipped systemd unit gives it, against a private real
Postfix: the user, groups, capability bounding set and no-new-privileges are read from the
unit files (tests/support/unit_credentials.py) and applied with ``setpriv``; the ``mqpolicy`` user
is a throwaway uid/gid with no account, ``postdrop`` and ``adm`` are the real groups.

``mqpolicy serve`` (mqpolicy.service: unprivileged, memory store) runs the policy server,
the milter, the scheduler and feedback; ``mqpolicy release-agent``
(mqpolicy-release-agent.service: root bounded to CAP_SETUID and CAP_SETGID) releases. A
message held by a hold lane leaves the hold queue through them and reaches the sink;
feedback reads a log only group adm may read and writes its state file; the policy server
and the milter answer. The controls show the set-up means something: with serve's
credentials ``postsuper`` is refused, and without group postdrop so is ``postqueue -j``.

Every process is stopped by its PID at the end, whatever happened.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from miltertest import MilterConnection

from mqpolicy.delegation.codec import encode_request
from mqpolicy.lab.mail_stack import MailStack
from mqpolicy.lab.postfix_instance import PostfixInstance
from mqpolicy.lab.readiness import poll
from mqpolicy.postfix.programs import POSTQUEUE, POSTSUPER
from tests.support.postfix_fixture import new_stack
from tests.support.serve_process import MqpolicyProcess
from tests.support.unit_credentials import (
    SETPRIV,
    UNSHARE,
    Accounts,
    launcher,
    read_service,
    setpriv_argv,
    throwaway_id,
)

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None or UNSHARE is None,
    reason="needs root, setpriv and unshare (util-linux)")]

SERVE_UNIT = "mqpolicy.service"
AGENT_UNIT = "mqpolicy-release-agent.service"
TIMEOUT_S = 30.0
SLOW_DOWN = ("Dec  7 07:11:44 mta postfix/smtp[16922]: 3E99120E2D3: to=<r@busy.example>, "
             "relay=127.0.0.1[127.0.0.1]:25, delay=1, delays=1/0/0/0, dsn=4.7.0, "
             "status=deferred (host 127.0.0.1[127.0.0.1] said: 421 4.7.0 Try again later "
             "(in reply to RCPT TO command))\n")


@dataclass
class Deployment:
    stack: MailStack
    agent: MqpolicyProcess
    accounts: Accounts
    uid: int
    dirs: Path
    mail_log: Path
    state_file: Path
    milter_socket: Path

    def serve_launcher(self) -> list[str]:
        return launcher(SERVE_UNIT, self.accounts, self.dirs / "view")


def _directory(path: Path, uid: int, gid: int, mode: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


def _policy(dep_dirs: Path, config_dir: Path, agent_socket: Path, milter_socket: Path,
            mail_log: Path, state_file: Path) -> str:
    return f"""\
store:
  url: memory://
log:
  format: kv
  level: info
lanes:
  - name: normal
    transport: smtp
  - name: later
    transport: smtp
    hold: true
default_lane: normal
classify:
  - name: held
    when: {{sender: "@held.units.test"}}
    lane: later
destinations:
  - {{name: busy, domains: [busy.example], rate: 100/1m}}
scheduler:
  postfix_config_dir: {config_dir}
  interval: 500ms
  lock_ttl: 5s
  release_agent: unix:{agent_socket}
milter:
  listen: unix:{milter_socket}
feedback:
  log: {mail_log}
  state_file: {state_file}
  poll_interval: 100ms
"""


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    assert read_service(SERVE_UNIT).subcommand == "serve"  # what MailStack starts
    uid = throwaway_id()
    accounts = Accounts(users={"mqpolicy": uid}, groups={"mqpolicy": uid})
    dirs = Path(tempfile.mkdtemp(prefix="mqunits-", dir="/tmp"))
    agent: MqpolicyProcess | None = None
    try:
        dirs.chmod(0o755)
        adm = accounts.gid("adm")
        # as systemd makes them: RuntimeDirectory= (User=root, Group=mqpolicy) for the agent,
        # RuntimeDirectory=/StateDirectory= (mqpolicy) for serve; the log is root:adm 0640
        agent_dir = _directory(dirs / "run-agent", 0, uid, 0o750)
        run_dir = _directory(dirs / "run", uid, uid, 0o750)
        state_dir = _directory(dirs / "state", uid, uid, 0o750)
        log_dir = _directory(dirs / "log", 0, 0, 0o755)
        mail_log = log_dir / "mail.log"
        mail_log.write_text("")
        os.chown(mail_log, 0, adm)
        mail_log.chmod(0o640)
        milter_socket = run_dir / "milter.sock"
        serve = launcher(SERVE_UNIT, accounts, dirs / "view")
        with new_stack("mqunits-stack-",
                       command=(*serve, sys.executable, "-m", "mqpolicy")) as stack:
            config_dir = PostfixInstance(stack.root / "postfix", relayhost="").config_dir
            text = _policy(dirs, config_dir, agent_dir / "agent.sock", milter_socket,
                           mail_log, state_dir / "feedback.state")
            stack.start(text)
            agent_service = read_service(AGENT_UNIT)
            agent = MqpolicyProcess(agent_service.subcommand, stack.policy_file,
                                    dirs / "agent.log",
                                    launcher=launcher(AGENT_UNIT, accounts, dirs / "view"))
            agent.start(str(agent_dir / "agent.sock"))
            yield Deployment(stack, agent, accounts, uid, dirs, mail_log,
                             state_dir / "feedback.state", milter_socket)
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(dirs, ignore_errors=True)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _wait_logged(path: Path, *needles: str) -> str:
    found: list[str] = []

    def logged() -> bool:
        found[:] = [line for line in path.read_text("utf-8", "replace").splitlines()
                    if all(n in line for n in needles)]
        return bool(found)

    try:
        poll(logged, TIMEOUT_S, f"{needles} in {path}", interval_s=0.05)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}:\n{path.read_text('utf-8', 'replace')[-3000:]}") from None
    return found[0]


def test_each_process_has_its_units_credentials(deployment: Deployment) -> None:
    adm, postdrop = deployment.accounts.gid("adm"), deployment.accounts.gid("postdrop")
    serve = _status(deployment.stack.server.pid)
    uid = deployment.uid
    assert serve["Uid"].split() == [str(uid)] * 4
    assert serve["Gid"].split() == [str(uid)] * 4
    assert sorted(map(int, serve["Groups"].split())) == sorted([postdrop, adm])
    assert (serve["CapEff"], serve["CapBnd"], serve["NoNewPrivs"]) == (
        "0000000000000000", "0000000000000000", "1")
    assert deployment.agent.proc is not None
    agent = _status(deployment.agent.proc.pid)
    assert agent["Uid"].split() == ["0"] * 4
    assert agent["Gid"].split() == [str(uid)] * 4  # its socket's group
    assert agent["Groups"].split() == [str(postdrop)]
    setuid_setgid = f"{(1 << 6) | (1 << 7):016x}"  # CAP_SETGID, CAP_SETUID
    assert (agent["CapEff"], agent["CapBnd"], agent["NoNewPrivs"]) == (
        setuid_setgid, setuid_setgid, "1")


def test_held_mail_is_released_through_the_agent_by_the_unprivileged_scheduler(
        deployment: Deployment) -> None:
    stack = deployment.stack
    sent = stack.send("app@held.units.test", ["someone@calm.example"], "held by a lane")
    assert sent.queued, sent
    arrived = stack.sink.wait_for_subject("held by a lane", TIMEOUT_S)
    assert arrived.rcpt_tos == ("someone@calm.example",)
    held_log = [line for line in stack.postfix.log_file.read_text().splitlines()
                if sent.queue_id in line]
    assert any("released from hold" in line for line in held_log), held_log
    line = _wait_logged(deployment.dirs / "agent.log", "msg=release",
                        f"peer_uid={deployment.uid}")
    assert "released=1" in line and sent.queue_id in line
    _wait_logged(stack.server.log_file, "msg=released", f"qid={sent.queue_id}")


def test_feedback_reads_a_log_only_adm_may_read_and_keeps_its_state(
        deployment: Deployment) -> None:
    log_file = deployment.stack.server.log_file
    _wait_logged(log_file, "following the delivery log", str(deployment.mail_log))
    with deployment.mail_log.open("a") as out:
        out.write(SLOW_DOWN)
    _wait_logged(log_file, "destination backed off", "destination=busy")
    poll(deployment.state_file.exists, TIMEOUT_S, "the feedback state file")
    assert deployment.state_file.stat().st_uid == deployment.uid
    assert "Permission denied" not in log_file.read_text()


def test_the_policy_server_and_the_milter_answer(deployment: Deployment) -> None:
    with socket.create_connection(("127.0.0.1", deployment.stack.policy_port), 5) as sock:
        sock.sendall(encode_request({"request": "smtpd_access_policy",
                                     "protocol_state": "RCPT", "sender": "a@x.test",
                                     "recipient": "b@calm.example", "instance": "u1"}))
        assert sock.recv(4096).startswith(b"action=")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(deployment.milter_socket))
        actions, _ = MilterConnection(sock).optneg_mta()
        assert actions  # it negotiated: what it may do to messages


def test_without_the_agent_or_group_postdrop_the_unprivileged_user_cannot(
        deployment: Deployment) -> None:
    """The controls: serve's own credentials cannot release, nor list without postdrop."""
    config_dir = str(deployment.stack.postfix.config_dir)
    serve = deployment.serve_launcher()
    refused = subprocess.run([*serve, POSTSUPER.path, "-c", config_dir, "-H", "ALL"],
                             capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode != 0
    assert "reserved for the superuser" in refused.stderr
    service = read_service(SERVE_UNIT)
    view = serve[:serve.index(SETPRIV)] if SETPRIV in serve else []
    without_postdrop = dataclasses.replace(
        service, supplementary_groups=tuple(g for g in service.supplementary_groups
                                            if g != "postdrop"))
    listing = subprocess.run(
        [*view, *setpriv_argv(without_postdrop, deployment.accounts), POSTQUEUE.path,
         "-c", config_dir, "-j"], capture_output=True, text=True, timeout=30, check=False)
    assert listing.returncode != 0
    assert "Permission denied" in listing.stderr
    listed = subprocess.run([*serve, POSTQUEUE.path, "-c", config_dir, "-j"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert listed.returncode == 0, listed.stderr
