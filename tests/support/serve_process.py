"""Run ``mqpolicy`` commands as real processes for tests: readiness by connect, stop by PID."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mqpolicy.delegation.codec import encode_request
from mqpolicy.lab.processes import stop_process
from mqpolicy.lab.readiness import READY_TIMEOUT_S, accepts, free_port, poll
from mqpolicy.policy.endpoints import Endpoint

__all__ = ["MqpolicyProcess", "ServeProcess", "ask_policy", "free_port"]


Address = str | tuple[str, int]  # a unix socket path, or (host, port)


def _endpoint(address: Address) -> Endpoint:
    if isinstance(address, str):
        return Endpoint(path=address)
    return Endpoint(host=address[0], port=address[1])


class MqpolicyProcess:
    """``mqpolicy COMMAND -c FILE [ARGS]``, ready when every address given to start()
    accepts a connection; stop() ends it by its PID."""

    def __init__(self, command: str, config: Path, log_path: Path,
                 extra_args: list[str] | None = None, *, launcher: Sequence[str] = (),
                 env: Mapping[str, str] | None = None) -> None:
        """``launcher``: what runs the interpreter (e.g. setpriv with a unit's credentials);
        ``env``: the environment (default: this process's)."""
        self.command = command
        self.config = config
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.launcher = tuple(launcher)
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *addresses: Address, timeout: float = READY_TIMEOUT_S) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.launcher, sys.executable, "-m", "mqpolicy", self.command,
                 "-c", str(self.config), *self.extra_args],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env,
            )
        deadline = time.monotonic() + timeout
        pending = list(addresses)
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mqpolicy {self.command} exited: {self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mqpolicy {self.command} not ready: {self.log_text()}")
            if accepts(_endpoint(pending[0])):
                pending.pop(0)
            else:
                time.sleep(0.01)  # between connect polls

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait_logged(self, text: str, count: int = 1, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the process has logged ``text`` ``count`` times; it must stay alive."""
        try:
            poll(lambda: not self.alive or self.log_text().count(text) >= count, timeout,
                 f"{text!r} logged {count} times", interval_s=0.05)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}:\n{self.log_text()}") from None
        assert self.alive, self.log_text()

    def kill(self) -> None:
        """SIGKILL, as a crash would end it, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = READY_TIMEOUT_S) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc, timeout)


class ServeProcess(MqpolicyProcess):
    """``mqpolicy serve`` listening on 127.0.0.1:``port``."""

    def __init__(self, config: Path, port: int, log_path: Path,
                 extra_args: list[str] | None = None) -> None:
        super().__init__("serve", config, log_path, extra_args)
        self.port = port

    def start(self, *addresses: Address, timeout: float = READY_TIMEOUT_S) -> None:
        super().start(("127.0.0.1", self.port), *addresses, timeout=timeout)

    def ask(self, attrs: dict[str, str], timeout: float = 5.0) -> str:
        """One request on a fresh connection; the action text."""
        return ask_policy(self.port, attrs, timeout)


def ask_policy(port: int, attrs: dict[str, str], timeout: float = 5.0) -> str:
    """One request to the policy server on 127.0.0.1:``port``, on a fresh connection; the
    action text."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(encode_request(attrs))
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed before a reply")
            data += chunk
    return data.decode()[len("action="):-2]
