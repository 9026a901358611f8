"""The ``mqpolicy`` command as an operator runs it: this venv's interpreter, ``-m mqpolicy``."""

from __future__ import annotations

import subprocess
import sys


def mq(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``mqpolicy ARGS`` with ``stdin``; its exit code, stdout and stderr (text)."""
    return subprocess.run([sys.executable, "-m", "mqpolicy", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)
