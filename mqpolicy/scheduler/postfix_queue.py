"""Postfix's queue for the scheduler: ``postqueue -j`` to list, ``postsuper -H`` to release
from hold, ``postqueue -i`` to deliver at once. Every command gets ``-c <config dir>``.

The parsing is pure (:func:`parse_postqueue_json`, :func:`parse_released`); the I/O lives in
:class:`PostfixQueue`.

Seen with Postfix 3.7: ``postqueue -j`` prints one JSON object per message (``queue_name``,
``queue_id``, ``arrival_time`` in seconds, ``message_size``, ``sender``, ``recipients``
with ``address`` and, once tried, ``delay_reason``); ``postsuper -H -`` reads queue ids on
standard input and reports ``postsuper: <id>: released from hold`` on standard error for
each one it moved (to the deferred queue; ids not on hold are skipped silently);
``postqueue -i`` takes one queue id per call and exits 0 even for an unknown id.

The programs are ``$MQPOLICY_POSTQUEUE`` and ``$MQPOLICY_POSTSUPER``, else those in
``/usr/sbin`` (:mod:`mqpolicy.postfix.programs`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from mqpolicy.postfix.programs import POSTQUEUE, POSTSUPER
from mqpolicy.scheduler.mta_queue import (
    QueueCommandError,
    QueueEntry,
    QueueSnapshot,
    deliver_each,
    run_checked,
    run_command,
    stderr_tail,
)

__all__ = ["PostfixQueue", "parse_postqueue_json", "parse_released"]

_QUEUE_ID = re.compile(r"^[0-9A-Za-z]{5,32}$")
_RELEASED = re.compile(r"^postsuper: ([0-9A-Za-z]+): released from hold\s*$", re.MULTILINE)
_MAX_PROBLEMS = 20


# The C scanner json.loads uses, called directly: its Python wrappers cost as much as the
# scan itself at 10,000 lines.
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _entry(data: object, tried: bool) -> QueueEntry:
    """One message; ``tried``: its line has a ``delay_reason`` (most held messages have
    none: their recipients are not scanned for one)."""
    if type(data) is not dict:
        raise ValueError("not a JSON object")
    try:
        queue_id = data["queue_id"]
        queue_name = data["queue_name"]
        rcpts = data.get("recipients") or ()
        recipients = tuple([r["address"] for r in rcpts])
        reasons = tuple([r.get("delay_reason", "") for r in rcpts]) if tried else ()
        sender = data.get("sender") or ""
        entry = QueueEntry(queue_id, queue_name, int(data.get("arrival_time", 0)),
                           int(data.get("message_size", 0)), sender, recipients, reasons)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"unexpected layout: {exc!r}") from None
    if type(queue_id) is not str or not _QUEUE_ID.match(queue_id):
        raise ValueError(f"bad queue_id {queue_id!r}")
    if type(queue_name) is not str or not queue_name:
        raise ValueError(f"bad queue_name {queue_name!r}")
    if type(sender) is not str or not all(type(r) is str for r in recipients):
        raise ValueError("addresses are not strings")
    if reasons and not all(type(r) is str for r in reasons):
        raise ValueError("delay reasons are not strings")
    return entry


def parse_postqueue_json(data: bytes | str) -> QueueSnapshot:
    """``postqueue -j`` output → entries, counts per queue and unreadable lines (reported,
    never guessed at)."""
    text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
    entries: list[QueueEntry] = []
    problems: list[str] = []
    append = entries.append
    scan = _scan
    for number, line in enumerate(text.splitlines(), 1):
        try:
            parsed, end = scan(line, 0)
            if end != len(line) and line[end:].strip():
                raise ValueError("trailing data")
            append(_entry(parsed, "delay_reason" in line))
        except StopIteration:
            if line.strip() and len(problems) < _MAX_PROBLEMS:
                problems.append(f"line {number}: not JSON: {line[:200]!r}")
        except (ValueError, TypeError, RecursionError) as exc:
            if len(problems) < _MAX_PROBLEMS:
                problems.append(f"line {number}: {exc}: {line[:200]!r}")
    counts = Counter(e.queue_name for e in entries)
    return QueueSnapshot(entries, dict(counts), problems)


def parse_released(output: bytes | str) -> set[str]:
    """Queue ids that ``postsuper -H`` reports as released from hold."""
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
    return set(_RELEASED.findall(text))


class PostfixQueue:
    """One Postfix instance's queue (``-c config_dir`` on every command)."""

    def __init__(self, config_dir: str, *, postqueue: str | None = None,
                 postsuper: str | None = None, timeout_s: float = 60.0,
                 deliver_concurrency: int = 4) -> None:
        """``postqueue``, ``postsuper``: the programs' paths (default: as
        :mod:`mqpolicy.postfix.programs` finds them)."""
        self.config_dir = config_dir
        self._postqueue = postqueue or POSTQUEUE.path
        self._postsuper = postsuper or POSTSUPER.path
        self._timeout_s = timeout_s
        self._deliver_slots = asyncio.Semaphore(max(1, deliver_concurrency))

    @property
    def instance(self) -> str:
        return f"postfix:{self.config_dir}"

    async def snapshot(self) -> QueueSnapshot:
        argv = [self._postqueue, "-c", self.config_dir, "-j"]
        return parse_postqueue_json(await run_checked(argv, timeout_s=self._timeout_s))

    async def release(self, queue_ids: Sequence[str]) -> set[str]:
        ids = [q for q in queue_ids if _QUEUE_ID.match(q)]
        if not ids:
            return set()
        argv = [self._postsuper, "-c", self.config_dir, "-H", "-"]
        stdin = ("\n".join(ids) + "\n").encode()
        rc, out, err = await run_command(argv, stdin=stdin, timeout_s=self._timeout_s)
        released = parse_released(err) | parse_released(out)
        if rc != 0:
            raise QueueCommandError(f"{' '.join(argv[:-1])} exited {rc}: {stderr_tail(err)}",
                                    released)
        return released & set(ids)

    async def deliver_now(self, queue_ids: Sequence[str]) -> None:
        async def one(queue_id: str) -> None:
            argv = [self._postqueue, "-c", self.config_dir, "-i", queue_id]
            await run_checked(argv, timeout_s=self._timeout_s)

        ids = [q for q in queue_ids if _QUEUE_ID.match(q)]
        await deliver_each(ids, one, self._deliver_slots, "postqueue -i")
