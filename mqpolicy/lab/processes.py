"""Stopping a child process of the lab, a test or a benchmark: by its PID, never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

#: How long a process killed with SIGKILL is waited for (the kernel ends it at once).
KILLED_WAIT_S = 5.0


def stop_process(proc: subprocess.Popen[Any], grace_s: float) -> int:
    """Stop ``proc`` and reap it (at once when it has exited already); its exit status.

    SIGTERM (the process drains and exits), SIGKILL when it has not exited within
    ``grace_s``. A process stopped with SIGSTOP (a test pausing a server) is continued
    first: a stopped process acts on no SIGTERM."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=KILLED_WAIT_S)
    return proc.returncode
