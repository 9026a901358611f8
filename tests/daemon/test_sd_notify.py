"""``Type=notify``: what each command tells systemd, read from a real notify socket (an
AF_UNIX datagram socket the test binds, named in the child's NOTIFY_SOCKET), as systemd
would: ``READY=1`` once it is ready (its socket accepts by then), ``RELOADING=1`` (with
``MONOTONIC_USEC``, which ``Type=notify-reload`` wants) and ``READY=1`` around a SIGHUP
reload, ``STOPPING=1`` at SIGTERM. Feedback has no reload (its unit sends no SIGHUP)."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqpolicy.lab.readiness import accepts, free_port
from mqpolicy.policy.endpoints import Endpoint
from tests.support.redis_fixture import RedisServer
from tests.support.serve_process import MqpolicyProcess

pytestmark = pytest.mark.e2e

TIMEOUT_S = 20.0


class NotifySocket:
    """systemd's end: an abstract-namespace datagram socket, the messages it got."""

    def __init__(self) -> None:
        self.name = f"@mqpolicy-notify-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])

    def next(self, timeout_s: float = TIMEOUT_S) -> dict[str, str]:
        """The next message, as its ``KEY=value`` lines."""
        self.sock.settimeout(timeout_s)
        data = self.sock.recv(65536).decode()
        return dict(line.partition("=")[::2] for line in data.splitlines() if line)

    def nothing_within(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(65536)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    listener = NotifySocket()
    try:
        yield listener
    finally:
        listener.close()


def run(command: str, policy: Path, notify: NotifySocket, *, listens_on: Endpoint | None,
        reloads: bool, reload_signal: signal.Signals = signal.SIGHUP) -> None:
    """Start ``mqpolicy COMMAND``; check READY (and that ``listens_on`` accepts then),
    the reload's RELOADING/READY when ``reloads`` (at ``reload_signal``), STOPPING at
    SIGTERM, exit 0."""
    process = MqpolicyProcess(command, policy, policy.parent / f"{command}.log",
                              env={**os.environ, "NOTIFY_SOCKET": notify.name})
    try:
        process.start()
        ready = notify.next()
        assert ready.get("READY") == "1", (ready, process.log_text())
        assert ready.get("STATUS"), ready
        if listens_on is not None:
            assert accepts(listens_on), f"READY before {listens_on} accepts"
        if reloads:
            before = time.monotonic_ns() // 1000
            process.signal(reload_signal)
            reloading = notify.next()
            if reloading.get("RELOADING") != "1":  # say why, with the whole log
                process.stop()
                pytest.fail(f"{reload_signal.name} gave {reloading}, not RELOADING: "
                            f"{process.log_text()}")
            assert before <= int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
            assert notify.next() == {"READY": "1"}
            process.wait_logged("policy reloaded")
        assert notify.nothing_within(0.2)
        process.signal(signal.SIGTERM)
        assert notify.next() == {"STOPPING": "1"}
        assert process.proc is not None
        assert process.proc.wait(TIMEOUT_S) == 0, process.log_text()
    finally:
        process.stop()


LOG = "log:\n  format: kv\n  level: info\n"


def test_serve(notify: NotifySocket, sock_dir: Path) -> None:
    port = free_port()
    policy = sock_dir / "policy.yaml"
    policy.write_text(f"listen: 127.0.0.1:{port}\nstore:\n  url: memory://\n{LOG}")
    run("serve", policy, notify, listens_on=Endpoint(host="127.0.0.1", port=port),
        reloads=True)


def test_milter(notify: NotifySocket, sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    policy = sock_dir / "policy.yaml"
    policy.write_text(f"store:\n  url: memory://\nmilter:\n  listen: unix:{path}\n{LOG}")
    # SIGUSR1, as its unit reloads it: libmilter's signal thread may take a SIGHUP
    run("milter", policy, notify, listens_on=Endpoint(path=str(path)), reloads=True,
        reload_signal=signal.SIGUSR1)


def test_release_agent(notify: NotifySocket, sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    policy = sock_dir / "policy.yaml"
    policy.write_text(f"scheduler:\n  postfix_config_dir: {sock_dir}\n"
                      f"  release_agent: unix:{path}\n{LOG}")
    run("release-agent", policy, notify, listens_on=Endpoint(path=str(path)), reloads=True)


def test_scheduler(notify: NotifySocket, sock_dir: Path, redis_clean: RedisServer) -> None:
    policy = sock_dir / "policy.yaml"
    policy.write_text(f"store:\n  url: {redis_clean.unix_url}\n  key_prefix: \"notify:\"\n"
                      f"scheduler:\n  postfix_config_dir: {sock_dir}\n  interval: 1s\n{LOG}")
    run("scheduler", policy, notify, listens_on=None, reloads=True)


def test_feedback(notify: NotifySocket, sock_dir: Path, redis_clean: RedisServer) -> None:
    log_file = sock_dir / "mail.log"
    log_file.write_text("")
    policy = sock_dir / "policy.yaml"
    policy.write_text(f"store:\n  url: {redis_clean.unix_url}\n  key_prefix: \"notify:\"\n"
                      "destinations:\n  - {name: busy, domains: [busy.example], "
                      f"rate: 10/1m}}\nfeedback:\n  log: {log_file}\n{LOG}")
    run("feedback", policy, notify, listens_on=None, reloads=False)
