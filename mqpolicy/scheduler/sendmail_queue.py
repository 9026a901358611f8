"""Sendmail's quarantine as the scheduler's hold queue.

* list: ``sendmail -C CF -bp -qQ`` (quarantined messages; plain ``-bp`` lists the normal
  queue, read for the load counts);
* release: ``sendmail -C CF -qI<id> -qQ -Q`` (takes the message out of quarantine);
* deliver now: ``sendmail -C CF -qI<id> -qf`` (else it waits for the next queue run).

The listing is parsed by :func:`parse_mailq` (pure). A mailq entry::

    -----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------
    5ARLf1a4012345      312 Fri Nov 27 21:00 <alice@example.com>
         QUARANTINE: held by mqpolicy limit per-sender
                                             <bob@example.org>

Queued messages show as ``queue_name`` ``deferred`` (what the load thresholds watch),
quarantined ones as ``hold``. ``Q-Time`` has minutes only and no year: arrival times are
approximate (FIFO within a lane follows the record's time anyway). The binary is
``$MQPOLICY_SENDMAIL`` or ``/usr/sbin/sendmail``.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from collections.abc import Sequence

from mqpolicy.scheduler.mta_queue import (
    HOLD,
    QueueCommandError,
    QueueEntry,
    QueueSnapshot,
    deliver_each,
    run_checked,
)

__all__ = ["SendmailQueue", "parse_mailq"]

SENDMAIL = os.environ.get("MQPOLICY_SENDMAIL", "/usr/sbin/sendmail")

_ENTRY = re.compile(
    r"^(?P<id>[0-9A-Za-z]{8,20})(?P<flag>[*X-]?)\s+(?P<size>\d+)\s+"
    r"(?P<when>\w{3} \w{3} +\d{1,2} \d{2}:\d{2})\s+(?P<sender>\S.*)$"
)
_QUEUE_ID = re.compile(r"^[0-9A-Za-z]{8,20}$")
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


def _arrival(text: str, now: float) -> int:
    """``Fri Nov 27 21:00`` → seconds since the epoch (local time, the year that puts it
    closest before ``now``); 0 when unreadable."""
    try:
        _, month, day, hm = text.split()
        hour, minute = (int(x) for x in hm.split(":"))
        year = time.localtime(now).tm_year
        for candidate in (year, year - 1):
            stamp = time.mktime((candidate, _MONTHS[month], int(day), hour, minute, 0, 0, 0,
                                 -1))
            if stamp <= now + 86_400:
                return int(stamp)
    except (ValueError, KeyError, OverflowError):
        return 0
    return 0


def _address(text: str) -> str:
    text = text.strip()
    if text.startswith("<") and ">" in text:
        return text[1:text.index(">")]
    return text.split()[0] if text else ""


def parse_mailq(text: str, queue_name: str, now: float | None = None) -> QueueSnapshot:
    """``sendmail -bp`` (or ``-bp -qQ``) output → entries of ``queue_name``."""
    now = time.time() if now is None else now
    entries: list[QueueEntry] = []
    problems: list[str] = []
    current: dict[str, object] | None = None
    recipients: list[str] = []

    def close() -> None:
        if current is not None:
            entries.append(QueueEntry(
                queue_id=str(current["id"]), queue_name=queue_name,
                arrival_time=int(str(current["arrival"])), size=int(str(current["size"])),
                sender=str(current["sender"]), recipients=tuple(recipients)))

    for line in text.splitlines():
        # recipient lines are indented with tabs, like the queue directory's heading:
        # the heading is told apart by its text, not by its indentation
        if not line.strip() or line.startswith("-----Q-ID") or \
                line.lstrip().startswith(("Total requests", "/", "MSP Queue", "Mail queue")):
            continue
        match = _ENTRY.match(line)
        if match:
            close()
            current = {"id": match["id"], "size": match["size"],
                       "arrival": _arrival(match["when"], now),
                       "sender": _address(match["sender"])}
            recipients = []
            continue
        stripped = line.strip()
        if current is None:
            if "is empty" not in stripped and "requests" not in stripped:
                problems.append(f"unexpected line: {line[:200]!r}")
            continue
        if stripped.startswith(("(", "QUARANTINE:")):
            continue  # status text, quarantine reason
        if stripped.startswith("<") or "@" in stripped:
            recipients.append(_address(stripped))
    close()
    counts = Counter(e.queue_name for e in entries)
    return QueueSnapshot(entries, dict(counts), problems)


class SendmailQueue:
    """One Sendmail instance's queue and quarantine (``-C sendmail.cf`` on every command)."""

    def __init__(self, sendmail_cf: str, *, sendmail: str = SENDMAIL, timeout_s: float = 60.0,
                 deliver_concurrency: int = 4) -> None:
        self.sendmail_cf = sendmail_cf
        self._sendmail = sendmail
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max(1, deliver_concurrency))

    @property
    def instance(self) -> str:
        return f"sendmail:{self.sendmail_cf}"

    async def _run(self, *args: str) -> str:
        argv = [self._sendmail, "-C", self.sendmail_cf, *args]
        return (await run_checked(argv, timeout_s=self._timeout_s)).decode("utf-8", "replace")

    async def snapshot(self) -> QueueSnapshot:
        held = parse_mailq(await self._run("-bp", "-qQ"), HOLD)
        queued = parse_mailq(await self._run("-bp"), "deferred")
        counts = dict(held.counts)
        counts.update(queued.counts)
        return QueueSnapshot(held.entries + queued.entries, counts,
                             held.problems + queued.problems)

    async def release(self, queue_ids: Sequence[str]) -> set[str]:
        released: set[str] = set()
        for queue_id in queue_ids:
            if not _QUEUE_ID.match(queue_id):
                continue
            try:
                await self._run(f"-qI{queue_id}", "-qQ", "-Q")
            except QueueCommandError as exc:
                raise QueueCommandError(str(exc), released) from exc
            released.add(queue_id)
        return released

    async def deliver_now(self, queue_ids: Sequence[str]) -> None:
        async def one(queue_id: str) -> None:
            await self._run(f"-qI{queue_id}", "-qf")

        ids = [q for q in queue_ids if _QUEUE_ID.match(q)]
        await deliver_each(ids, one, self._slots, "sendmail -qI -qf")
