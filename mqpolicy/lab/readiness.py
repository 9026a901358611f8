"""Waiting for the lab's processes: a loopback port to give one, whether something accepts
connections or greets there, a poll with a deadline, a log's last lines for an error
message. Readiness is waited for by polling a connect, never by sleeping.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

from mqpolicy.policy.endpoints import Endpoint

#: How long to wait for something to get ready (a greeting, a reload, a queue state, a log
#: line): a bound only a broken system reaches, on a machine however loaded; every wait
#: ends as soon as what it waits for is there.
READY_TIMEOUT_S = 60.0


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text("utf-8", "replace")
    except FileNotFoundError:
        return f"(no log {path})"
    return "\n".join(text.splitlines()[-lines:])



def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def smtp_banner(host: str, port: int, timeout_s: float = 1.0) -> str | None:
    """The server's greeting line, or None when nothing answers (then QUIT)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(512)
                if not chunk:
                    return None
                data += chunk
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
                sock.recv(512)
            return data.decode("utf-8", "replace").strip()
    except OSError:
        return None


def poll(
    condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.02
) -> None:
    """Call ``condition`` until true; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)  # between polls of an external condition



def accepts(endpoint: Endpoint) -> bool:
    """Whether something accepts connections on ``endpoint`` (connect, then close)."""
    family = socket.AF_UNIX if endpoint.is_unix else socket.AF_INET6 \
        if ":" in endpoint.host else socket.AF_INET
    address: str | tuple[str, int] = endpoint.path or (endpoint.host, endpoint.port)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(address)
        except OSError:
            return False
        return True


