"""Run ``mqpolicy serve`` as a real process for tests: free port, readiness by connect."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mqpolicy.policy_codec import encode_request
from mqpolicy.postfix_instance import free_port

__all__ = ["ServeProcess", "free_port"]


class ServeProcess:
    """One ``mqpolicy serve -c FILE`` process; stop() kills it by PID."""

    def __init__(self, config: Path, port: int, log_path: Path,
                 extra_args: list[str] | None = None) -> None:
        self.config = config
        self.port = port
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mqpolicy", "serve", "-c", str(self.config),
             *self.extra_args],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mqpolicy serve exited: {self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.02)
                continue
            return
        raise RuntimeError(f"mqpolicy serve not ready: {self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def ask(self, attrs: dict[str, str], timeout: float = 5.0) -> str:
        """One request on a fresh connection; the action text."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(encode_request(attrs))
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed before a reply")
                data += chunk
        return data.decode()[len("action="):-2]
