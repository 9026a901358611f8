"""What the scheduler needs from an MTA's queue, whichever MTA it is.

:class:`MtaQueue` is implemented by :class:`~mqpolicy.scheduler.postfix_queue.PostfixQueue`
(``postqueue``/``postsuper``), :class:`~mqpolicy.scheduler.sendmail_queue.SendmailQueue`
(``sendmail -bp -qQ`` / ``-qI<id> -qQ -Q``) and
:class:`~mqpolicy.scheduler.agent_queue.AgentQueue` (releases asked of ``mqpolicy
release-agent``). Commands run with
``asyncio.create_subprocess_exec`` (never a shell), each with a deadline; a command that
overruns it is killed by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, Protocol

__all__ = ["HOLD", "MtaQueue", "QueueCommandError", "QueueEntry", "QueueSnapshot",
           "run_command"]

HOLD = "hold"
"""``queue_name`` of held mail (Postfix's hold queue, Sendmail's quarantine)."""


class QueueEntry(NamedTuple):
    """One message in the MTA's queue."""

    queue_id: str
    queue_name: str  # hold, deferred, active, incoming, maildrop (Sendmail: hold, queue)
    arrival_time: int  # seconds since the epoch
    size: int
    sender: str
    recipients: tuple[str, ...]
    # why each recipient waits, in the order of ``recipients`` (Postfix's delay_reason, ''
    # for a recipient not tried yet); () when no recipient was tried or the listing does
    # not say (Sendmail's)
    delay_reasons: tuple[str, ...] = ()


class QueueSnapshot(NamedTuple):
    """The queue as one listing saw it."""

    entries: list[QueueEntry]
    counts: dict[str, int]  # messages per queue_name
    problems: list[str]  # listing lines that could not be read


class QueueCommandError(Exception):
    """An MTA queue command failed (exit status, deadline, not executable). ``released``:
    messages the command did release before failing (the caller must not forget them)."""

    def __init__(self, message: str, released: set[str] | None = None) -> None:
        super().__init__(message)
        self.released = released or set()


class MtaQueue(Protocol):
    """The scheduler's view of one MTA instance."""

    @property
    def instance(self) -> str:
        """Names the instance in logs and in the lease (e.g. the config directory)."""
        ...

    async def snapshot(self) -> QueueSnapshot:
        """Every queued message (held ones with ``queue_name`` :data:`HOLD`)."""
        ...

    async def release(self, queue_ids: Sequence[str]) -> set[str]:
        """Take messages out of the hold queue; returns those the MTA says it released
        (a message no longer on hold is simply not in the answer)."""
        ...

    async def deliver_now(self, queue_ids: Sequence[str]) -> None:
        """Ask for immediate delivery of released messages (else they wait for the next
        queue run)."""
        ...


async def run_command(argv: Sequence[str], *, stdin: bytes | None = None,
                      timeout_s: float = 30.0) -> tuple[int, bytes, bytes]:
    """Run ``argv`` (no shell); return (exit status, stdout, stderr). The process is killed
    by its PID when it overruns ``timeout_s`` (:class:`QueueCommandError`)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise QueueCommandError(f"{argv[0]}: {exc.strerror or exc}") from exc
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise QueueCommandError(f"{' '.join(argv)}: no answer within {timeout_s:g}s") from None
    except BaseException:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        raise
    return proc.returncode if proc.returncode is not None else -1, out, err


def stderr_tail(err: bytes) -> str:
    """The end of a command's error output, for a QueueCommandError."""
    return err.decode("utf-8", "replace").strip()[-500:]


async def run_checked(argv: Sequence[str], *, timeout_s: float = 30.0) -> bytes:
    """:func:`run_command` that must succeed: its stdout, else a QueueCommandError with
    the exit status and the end of stderr."""
    rc, out, err = await run_command(argv, timeout_s=timeout_s)
    if rc != 0:
        raise QueueCommandError(f"{' '.join(argv)} exited {rc}: {stderr_tail(err)}")
    return out


async def deliver_each(queue_ids: Sequence[str], one: Callable[[str], Awaitable[None]],
                       slots: asyncio.Semaphore, what: str) -> None:
    """``one(queue_id)`` for every id, at most ``slots`` at a time; every id is tried, then
    one QueueCommandError tells how many of ``what`` failed (a BaseException that is not an
    Exception, e.g. a cancellation, is raised as it is)."""

    async def limited(queue_id: str) -> None:
        async with slots:
            await one(queue_id)

    results = await asyncio.gather(*(limited(q) for q in queue_ids), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    for failure in failures:
        if not isinstance(failure, Exception):
            raise failure
    if failures:
        raise QueueCommandError(f"{len(failures)} of {len(queue_ids)} {what} failed: "
                                f"{failures[0]}") from failures[0]
