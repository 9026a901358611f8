"""The commands' side of ``serve``'s admin socket: ``queue``, ``counters`` and ``explain``
ask the running server when its budgets and hold records live in it (``memory://``).

One request and its answer per call, on a connection of its own; the connect has a short
deadline (a server that is not there is said at once), the answer a long one (``queue``
runs the MTA's queue listing). What cannot be asked is an :class:`AdminError` whose text
says what the operator can do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from mqpolicy.admin.codec import (
    LineDecoder,
    LineTooLong,
    MalformedAnswer,
    decode_answer,
    encode_request,
)
from mqpolicy.policy.model import Policy

__all__ = ["AdminError", "AdminFailed", "AdminUnavailable", "ask_server", "memory_store_hint"]

T = TypeVar("T")

CONNECT_TIMEOUT_S = 2.0
ANSWER_TIMEOUT_S = 100.0  # the server gives up on an operation after 90 s
MAX_ANSWER_BYTES = 64 * 1024 * 1024

EXIT_FAILURE = 1
EXIT_USAGE = 2


class AdminError(Exception):
    """The server could not be asked, or answered with an error; ``exit_code`` for the
    command that asked."""

    exit_code = EXIT_FAILURE


class AdminUnavailable(AdminError):
    """No server answers on the admin socket (or none is configured)."""

    def __init__(self, message: str, *, configured: bool = True) -> None:
        super().__init__(message)
        if not configured:
            self.exit_code = EXIT_USAGE


class AdminFailed(AdminError):
    """The server answered with an error (``kind`` is its ``error`` field)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def memory_store_hint(policy: Policy) -> str:
    """What to do when the budgets and hold records live in a server's memory."""
    return (f"the memory:// store lives inside the running `mqpolicy serve`; set "
            f"admin.listen in {policy.source} (then restart `mqpolicy serve`: it opens the "
            "admin socket at start) to reach it, or use a redis:// store")


async def ask_server(policy: Policy, op: str, args: Mapping[str, Any],
                     parse: Callable[[Any], T], *,
                     connect_timeout_s: float = CONNECT_TIMEOUT_S,
                     answer_timeout_s: float = ANSWER_TIMEOUT_S) -> T:
    """``op`` with ``args`` on the policy's admin socket; ``parse`` of the result."""
    if policy.admin is None:
        raise AdminUnavailable(memory_store_hint(policy), configured=False)
    path = policy.admin.listen.path
    try:
        async with asyncio.timeout(connect_timeout_s):
            reader, writer = await asyncio.open_unix_connection(path)
    except (OSError, TimeoutError) as exc:
        raise AdminUnavailable(_unreachable(policy, path, exc)) from None
    try:
        writer.write(encode_request(op, args))
        async with asyncio.timeout(answer_timeout_s):
            line = await _answer_line(reader)
    except TimeoutError:
        raise AdminFailed("timeout", f"no answer on the admin socket {path} within "
                          f"{answer_timeout_s:g}s") from None
    except OSError as exc:
        raise AdminFailed("connection", f"admin socket {path}: {exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    try:
        answer = decode_answer(line)
    except MalformedAnswer as exc:
        raise AdminFailed("malformed", f"unexpected answer on the admin socket {path}: "
                          f"{exc}") from None
    if not answer.ok:
        raise AdminFailed(answer.error, answer.message)
    try:
        return parse(answer.result)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AdminFailed("malformed", f"unexpected {op} result on the admin socket {path} "
                          f"({type(exc).__name__}: {exc}): is the server another version "
                          "of mqpolicy?") from None


async def _answer_line(reader: asyncio.StreamReader) -> bytes:
    lines = LineDecoder(MAX_ANSWER_BYTES)
    while True:
        chunk = await reader.read(1 << 16)
        if not chunk:
            raise ConnectionResetError("the server closed the connection without an answer")
        found = lines.feed(chunk)
        if found:
            if isinstance(found[0], LineTooLong):
                raise ConnectionError(f"an answer longer than {MAX_ANSWER_BYTES} bytes")
            return found[0]


def _unreachable(policy: Policy, path: str, exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        why = f"no connection within {CONNECT_TIMEOUT_S:g}s"
    else:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, PermissionError):
        todo = ("run this as a user the socket's mode lets in (admin.mode; the group of "
                "the user `mqpolicy serve` runs as)")
    else:
        todo = (f"is `mqpolicy serve -c {policy.source}` running, and was admin.listen "
                "set when it started? (the admin socket opens at start, not on reload)")
    return (f"the memory:// store lives inside the running `mqpolicy serve`, and its admin "
            f"socket unix:{path} cannot be reached ({why}): {todo}; or use a redis:// "
            "store")
