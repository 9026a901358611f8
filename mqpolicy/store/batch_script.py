"""The Redis batch script's protocol, pure: what ``lua/gcra_batch.lua`` and
``lua/gcra_give_back.lua`` are sent and answer, and the Redis clock their deadlines are in.

:func:`encode_batch` turns queued decisions (:class:`PendingDecision`) into the script's KEYS
and ARGV (see the script's header), :func:`split_reply` and :func:`decode_batch` read its
answer back (a decision the script could not run, or ran past its deadline, fails alone),
:func:`encode_give_back` sends a message's ledger back. :class:`RedisClock` places this
loop's deadlines on one server's clock. No I/O here: :mod:`mqpolicy.store.redis`,
:mod:`mqpolicy.store.sentinel` and :mod:`mqpolicy.store.cluster` send and receive.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from mqpolicy.store.budget import (
    CLOCK_STEP_ALLOWANCE_MS,
    BudgetCheck,
    BudgetResult,
    Evaluation,
    StoreError,
    StoreTimeout,
)

SCRIPT_NAME: Final = "gcra_batch.lua"
GIVE_BACK_SCRIPT_NAME: Final = "gcra_give_back.lua"
_CONSUME: Final = 1
_BLOCKING: Final = 2
DEADLINE_MARGIN: Final = 0.1
"""The part of ``timeout_ms`` before a decision's deadline after which Redis no longer
runs it: its answer has that long to come back (the window in which a decision can be
answered per ``on_store_error`` and counted all the same is a reply slower than this)."""
CLOCK_KEEP_S: Final = 10.0
"""How long the best estimate of Redis' clock is kept before a newer one replaces it."""
TOO_LATE: Final = "redis ran the batch after the decision's deadline: nothing counted"


class RedisClock:
    """Where one Redis server's clock (``TIME``, ms) stands against this loop's clock, for
    the decisions' deadlines in the batch script (``gcra_batch.lua`` skips a decision past
    its deadline by Redis' clock).

    Every reply carries Redis' time ``R`` when the script ran, which was before the reply
    was read at loop time ``t``: ``R - t`` is at most the true offset (short of it by the
    reply's way back), so a deadline converted with it falls no later than the real one.
    The highest such estimate of the last :data:`CLOCK_KEEP_S` s is kept (a Redis clock
    stepped back by ``X`` makes deadlines up to ``X`` late until then); the first batch to
    a server asks ``TIME`` first."""

    __slots__ = ("_at", "client", "offset_ms")

    def __init__(self, client: object) -> None:
        self.client = client
        self.offset_ms: float | None = None
        self._at = -math.inf

    def observe(self, redis_ms: int, loop_now_s: float) -> None:
        estimate = redis_ms - loop_now_s * 1000
        best = self.offset_ms
        if best is None or estimate >= best or loop_now_s - self._at > CLOCK_KEEP_S:
            self.offset_ms = estimate
            self._at = loop_now_s

    def deadline_ms(self, deadline_s: float) -> int:
        """A loop-time deadline in Redis' clock (ms, rounded down); 0 (none) while the
        offset is unknown."""
        offset = self.offset_ms
        if offset is None or deadline_s == math.inf:
            return 0
        return max(1, math.floor(deadline_s * 1000 + offset))


@dataclass(slots=True)
class PendingDecision:
    checks: Sequence[BudgetCheck]
    now_ms: int
    once_key: str | None
    once_ttl_ms: int
    future: asyncio.Future[Evaluation]
    deadline: float = math.inf  # loop time by which the decision is answered or failed
    ledger_key: str | None = None  # where a committed decision's spends are added



class StoreKeyError(StoreError, ValueError):
    """A key Redis cannot be sent: a StoreError (the decision's limits follow their
    ``on_store_error``) and a ValueError (the caller's mistake)."""


def validate_key_text(checks: Sequence[BudgetCheck], once_key: str | None) -> None:
    """:class:`StoreKeyError` for a key that is not text Redis can be sent (not a str, or
    a lone surrogate, which hiredis cannot encode to UTF-8): raised to the one caller
    before its decision joins a batch. The engine's keys never are
    (:mod:`mqpolicy.policy.keys` escapes them)."""
    for check in checks:
        key = check.key
        if type(key) is not str or not key.isascii():
            _encodable(key)
    if once_key is not None and (type(once_key) is not str or not once_key.isascii()):
        _encodable(once_key)


def _encodable(key: object) -> None:
    if not isinstance(key, str):
        raise StoreKeyError(f"store key {key!r} is not text")
    try:
        key.encode()
    except UnicodeEncodeError:
        raise StoreKeyError(f"store key {key!r} is not valid text (escape it first: "
                            "mqpolicy.policy.keys.escape_key_part)") from None


def encode_batch(
    prefix: str, batch: Sequence[PendingDecision], deadlines: Sequence[int] = ()
) -> tuple[list[str], list[int]]:
    """KEYS and ARGV of ``gcra_batch.lua`` (see its header); each key listed once; the
    decisions' ``deadlines`` in Redis' clock (ms; none: 0 each, not checked)."""
    index: dict[str, int] = {}  # key -> its 1-based position in KEYS (insertion order)
    args: list[int] = [len(batch), CLOCK_STEP_ALLOWANCE_MS]
    extend = args.extend
    for p in batch:
        once = 0
        if p.once_key is not None:
            key = prefix + p.once_key
            once = index.get(key) or index.setdefault(key, len(index) + 1)
        if p.ledger_key is None:
            extend((p.now_ms, len(p.checks), once, p.once_ttl_ms))
        else:  # -n: the ledger's KEYS index follows
            key = prefix + p.ledger_key
            ledger = index.get(key) or index.setdefault(key, len(index) + 1)
            extend((p.now_ms, -len(p.checks), once, p.once_ttl_ms, ledger))
        for c in p.checks:
            key = prefix + c.key
            flags = (_CONSUME if c.consume else 0) | (_BLOCKING if c.blocking else 0)
            if c.after:  # 4 * cond (gcra_batch.lua): 2 * j + 1 if check j failed, 2 * j passed
                flags += 4 * (2 * c.after + 1 if c.after > 0 else -2 * c.after)
            slot = index.get(key) or index.setdefault(key, len(index) + 1)
            extend((slot, c.refill, c.unit, c.burst, c.cost, flags))
    extend(deadlines or [0] * len(batch))
    return list(index), args


def encode_give_back(entries: Sequence[bytes], now_ms: int) -> tuple[list[str], list[int]]:
    """KEYS and ARGV of ``gcra_give_back.lua`` for a ledger as ``gcra_batch.lua`` writes it
    (five items per spend: bucket key, amount, backlog, time, refill)."""
    index: dict[str, int] = {}
    args: list[int] = [now_ms, CLOCK_STEP_ALLOWANCE_MS]
    for i in range(0, len(entries) - 4, 5):
        key = entries[i].decode("utf-8", "surrogateescape")
        slot = index.get(key) or index.setdefault(key, len(index) + 1)
        args += (slot, *(int(entries[i + j]) for j in range(1, 5)))
    return list(index), args


def split_reply(reply: Any, count: int) -> tuple[list[Any], int]:
    """The rows of ``gcra_batch.lua``'s reply for ``count`` decisions, and the Redis clock
    (ms) when it ran."""
    if not isinstance(reply, list) or len(reply) != count + 1 or not isinstance(
            reply[-1], int):
        raise ValueError(f"unexpected reply from {SCRIPT_NAME}: {reply!r:.200}")
    return reply[:-1], reply[-1]


def decode_batch(check_counts: Sequence[int], reply: Any) -> list[Evaluation | StoreError]:
    """The reply of ``gcra_batch.lua`` for decisions of ``check_counts`` checks each: an
    evaluation per decision, or the StoreError of a decision that raised in the script
    (which wrote nothing of it)."""
    if not isinstance(reply, list) or len(reply) != len(check_counts):
        raise ValueError(f"unexpected reply from {SCRIPT_NAME}: {reply!r:.200}")
    evaluations: list[Evaluation | StoreError] = []
    result = BudgetResult._make
    for n, row in zip(check_counts, reply, strict=True):
        if isinstance(row, list) and row and row[0] == -1:
            why = row[1].decode(errors="replace") if len(row) > 1 and isinstance(
                row[1], bytes) else str(row[1:])
            evaluations.append(StoreError(f"redis: {SCRIPT_NAME} failed this decision: {why}"))
            continue
        if isinstance(row, list) and row == [-2]:
            evaluations.append(StoreTimeout(TOO_LATE))
            continue
        end = 2 + 3 * n
        if not isinstance(row, list) or len(row) != end:
            raise ValueError(f"unexpected row from {SCRIPT_NAME}: {row!r:.200}")
        results = tuple([result((row[i] == 1, int(row[i + 1]), int(row[i + 2])))
                         for i in range(2, end, 3)])
        evaluations.append(Evaluation(results, row[0] == 1, row[1] == 1))
    return evaluations
