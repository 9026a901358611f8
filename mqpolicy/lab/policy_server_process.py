"""``mqpolicy serve`` as a child process of the lab, started and stopped by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mqpolicy.lab.processes import stop_process
from mqpolicy.lab.readiness import READY_TIMEOUT_S, accepts, log_tail, poll
from mqpolicy.policy.endpoints import Endpoint


class PolicyServerProcess:
    """``mqpolicy serve -c FILE`` as a child process, its log in a file.

    Started and stopped by its PID only; readiness is a successful connect.
    """

    def __init__(self, config: Path, endpoint: Endpoint, log_file: Path,
                 command: Sequence[str] = (sys.executable, "-m", "mqpolicy")) -> None:
        self.config = config
        self.endpoint = endpoint
        self.log_file = log_file
        self.command = tuple(command)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("mqpolicy serve is not running")
        return self._proc.pid

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        if self.running:
            raise RuntimeError("mqpolicy serve is already running")
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [*self.command, "serve", "-c", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        proc = self._proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"mqpolicy serve exited {proc.returncode}:\n"
                                   f"{self.log_tail()}")
            return accepts(self.endpoint)

        try:
            poll(ready, timeout_s, f"mqpolicy serve on {self.endpoint}")
        except TimeoutError:
            self.stop()
            raise

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (the server drains), SIGKILL if it does not exit in time. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout_s)

    def _count(self, needle: str) -> int:
        try:
            return self.log_file.read_text("utf-8", "replace").count(needle)
        except FileNotFoundError:
            return 0

    def reload(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """SIGHUP, then wait for "policy reloaded"; raise if the reload was refused."""
        done, refused = self._count("policy reloaded"), self._count("reload refused")
        os.kill(self.pid, signal.SIGHUP)

        def finished() -> bool:
            if self._count("reload refused") > refused:
                raise RuntimeError(f"mqpolicy refused the new policy:\n{self.log_tail()}")
            return self._count("policy reloaded") > done

        poll(finished, timeout_s, "mqpolicy to reload its policy")

    def wait_logged(self, *needles: str, timeout_s: float = 60.0) -> str:
        """The first line of the log holding every needle, once there is one; raises
        TimeoutError when none comes in ``timeout_s``."""
        found: list[str] = []

        def logged() -> bool:
            try:
                text = self.log_file.read_text("utf-8", "replace")
            except FileNotFoundError:
                return False
            found[:] = [line for line in text.splitlines() if all(n in line for n in needles)]
            return bool(found)

        poll(logged, timeout_s, f"a log line with {needles!r}")
        return found[0]

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_file, lines)


