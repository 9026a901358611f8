"""A private redis-server for tests: never the machine's own Redis.

``redis_server`` (session): one server on a temporary unix socket and a free loopback port.
``redis_clean`` (function): the same server, FLUSHALLed first.
``private_redis`` (function): a server of its own, for tests that stop, restart or pause it.

Servers are started with ``--save '' --appendonly no``, waited for by polling a connect, and
stopped by their PID (SIGCONT first in case a test paused them), even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import pytest
import redis

from mqpolicy.lab.processes import stop_process
from mqpolicy.lab.readiness import READY_TIMEOUT_S, accepts, free_port
from mqpolicy.policy.endpoints import Endpoint

REDIS_SERVER_BIN = os.environ.get("MQPOLICY_TEST_REDIS_SERVER", "/usr/bin/redis-server")


def _launcher() -> list[str]:
    """``setpriv --pdeathsig TERM`` (util-linux) where available: the server also goes when
    the test process is killed outright, before any ``finally`` could run. It execs the
    server, so the PID is the server's."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


def _answers_ping(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(path)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class RedisServer:
    """One redis-server process we own, reachable by TCP and by unix socket."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.unix_path = str(workdir / "redis.sock")
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("redis-server is not running")
        return self._proc.pid

    @property
    def tcp_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_path}?db=0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start (or restart on the same port and socket) and wait until it answers."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        attempts = 1 if self.port else 5
        for _ in range(attempts):
            if not self.port or attempts > 1:
                self.port = free_port()
            if self._spawn():
                return
        log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")

    def _spawn(self) -> bool:
        proc = subprocess.Popen(
            [
                *_launcher(),
                REDIS_SERVER_BIN,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--unixsocket", self.unix_path,
                "--unixsocketperm", "700",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log"),
                "--daemonize", "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._proc = proc
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:  # exited: port taken, bad option...
                self._proc = None
                return False
            if _answers_ping(self.unix_path) and accepts(Endpoint(host="127.0.0.1", port=self.port)):
                return True
            time.sleep(0.002)  # between connect polls
        self.stop()
        return False

    def stop(self) -> None:
        """Stop the server by its PID and wait for it (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, 5)
        self._paused = False

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        if self._paused and self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP for the duration of the block; SIGCONT afterwards whatever happens."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def client(self) -> redis.Redis:
        """A synchronous client on this server's unix socket (for test set-up and checks)."""
        return redis.Redis(unix_socket_path=self.unix_path, socket_timeout=5)

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()


class _Startable(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


H = TypeVar("H", bound=_Startable)


@contextlib.contextmanager
def running_in_tmpdir(prefix: str, make: Callable[[Path], H]) -> Iterator[H]:
    """``make(workdir)`` in a fresh directory under /tmp (short: unix socket paths are
    limited to ~107 bytes), started; stopped and the directory removed at the end."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    harness = make(workdir)
    try:
        harness.start()
        yield harness
    finally:
        harness.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _redis_server() -> contextlib.AbstractContextManager[RedisServer]:
    if not os.access(REDIS_SERVER_BIN, os.X_OK):
        pytest.skip(f"{REDIS_SERVER_BIN} not available")
    return running_in_tmpdir("mqredis-", RedisServer)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with _redis_server() as server:
        yield server


@pytest.fixture
def redis_clean(redis_server: RedisServer) -> RedisServer:
    """The session server, resumed if a test left it paused, with no keys."""
    redis_server.resume()
    redis_server.flushall()
    return redis_server


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A server of this test's own, free to stop, restart and pause."""
    with _redis_server() as server:
        yield server
