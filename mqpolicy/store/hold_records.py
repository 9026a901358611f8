"""Hold records: what mqpolicy knows about each message it put in the MTA's hold queue.

Whoever holds a message (the policy server at END-OF-MESSAGE, the milter at end of
message) writes a :class:`HoldRecord` *before* answering HOLD / quarantining; the scheduler
joins the hold queue with these records and releases what is due. A held message without a
record was held by someone else (an operator, another filter) and is left alone.

Two implementations of :class:`HoldRecordStore`:

* :class:`MemoryHoldRecords`: a dict in this process. Only ``serve`` can use it, with the
  scheduler running inside the same process (``policy.scheduler`` set): a separate
  ``mqpolicy scheduler`` process would see none of its records.
* :class:`RedisHoldRecords`: its own redis-py asyncio client on ``store.url``. A record is a
  JSON object (string fields) at ``<prefix>hold:<instance>:rec:<queue id>`` with a TTL
  safety net (30 days by default, or the schedule's maximum delay plus a week), listed in a
  sorted set ``<prefix>hold:<instance>:index`` (score: when the record was written). A
  string rather than a hash: 10,000 records load with a few MGETs instead of 10,000
  HGETALLs (measured ~10x faster, see bench/scheduler_bench.py). Every write is atomic:
  ``put`` and ``delete`` are MULTI/EXEC transactions, state changes go through
  ``lua/hold_mark.lua`` (never recreating a deleted record), the lease through
  ``lua/hold_lease.lua`` (SET NX PX semantics with compare-and-extend/delete).

The lease: one scheduler per MTA instance is active. It holds the key
``<prefix>hold:<instance>:lease`` for ``lock_ttl`` and extends it every pass; another
scheduler waits until the lease is free (the holder stopped, or died and its lease expired).

Load: the scheduler publishes the lanes that wait because the MTA's queues are swollen
under ``<prefix>load:<instance>:waiting_lanes`` (a few intervals of TTL, so a dead scheduler
does not pause lanes forever); :func:`waiting_lanes` reads them for the decision path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, NamedTuple, Protocol

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from mqpolicy.policy.model import Policy
from mqpolicy.store.budget import StoreError
from mqpolicy.store.redis import parse_redis_url
from mqpolicy.store.redis_connection import describe_error, load_script

__all__ = [
    "DEFAULT_RECORD_TTL_MS",
    "BrokenRecord",
    "HeldSpend",
    "HoldRecord",
    "HoldRecordStore",
    "MemoryHoldRecords",
    "RecordError",
    "RecordSet",
    "RecordState",
    "RedisHoldRecords",
    "lease_owner_token",
    "record_ttl_ms",
    "waiting_lanes",
]

DEFAULT_RECORD_TTL_MS: Final = 30 * 86_400_000
_WEEK_MS: Final = 7 * 86_400_000
MAX_DESTINATIONS: Final = 50  # destinations kept in one record (the queue has them all)


def hold_destinations(domains: Iterable[str]) -> tuple[str, ...]:
    """The recipient domains a record keeps: distinct, in order, at most MAX_DESTINATIONS."""
    return tuple(itertools.islice(dict.fromkeys(d for d in domains if d), MAX_DESTINATIONS))


MAX_FIELD: Final = 1000  # characters of one text field kept
_FORMAT: Final = "1"
_ERRORS: Final = (RedisError, OSError, TimeoutError)


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def record_ttl_ms(max_delay_ms: int) -> int:
    """How long a record lives at most: 30 days, or the longest schedule plus a week."""
    return max(DEFAULT_RECORD_TTL_MS, max_delay_ms + _WEEK_MS)


def lease_owner_token() -> str:
    """Who holds a lease: host, process and a random part (two schedulers never match)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class HeldSpend(NamedTuple):
    """A budget a held message has not spent: the scheduler spends it when it releases the
    message. The limit's name and the key value of the held request are kept, since the
    facts behind the key (SASL user, client address, HELO, headers) are gone by then."""

    limit: str
    key: str  # the key value, e.g. "alice@example.com" (the limit's bucket is built anew)
    cost: int


def _spends_text(spends: Sequence[HeldSpend]) -> str:
    return json.dumps([list(spend) for spend in spends], separators=(",", ":"))


def _spends_of(text: str) -> tuple[HeldSpend, ...]:
    if not text:
        return ()
    items = json.loads(text)
    if not isinstance(items, list) or not all(
            isinstance(i, list) and len(i) == 3 and isinstance(i[0], str)
            and isinstance(i[1], str) and isinstance(i[2], int) and i[2] > 0 for i in items):
        raise RecordError(f"unreadable spends {text[:100]!r}")
    return tuple(HeldSpend(*item) for item in items)


class RecordState(Enum):
    HELD = "held"
    RELEASING = "releasing"  # a release started; reconciled if the scheduler died meanwhile


class RecordError(ValueError):
    """A stored record that cannot be read back."""


@dataclass(frozen=True, slots=True)
class HoldRecord:
    """One message held by mqpolicy."""

    queue_id: str
    lane: str
    not_before_ms: int  # never released before this time (ms since the epoch)
    created_ms: int  # when it was held: FIFO order within a lane
    reason: str  # the deciding limit, ``lane:<name>`` or ``schedule:<header>``
    destinations: tuple[str, ...] = ()  # recipient domains, as far as the holder knew them
    sender: str = ""
    state: RecordState = RecordState.HELD
    state_ms: int = 0
    spends: tuple[HeldSpend, ...] = ()  # budgets the release spends (decision.hold_terms)

    def to_fields(self) -> dict[str, str]:
        fields = {
            "v": _FORMAT,
            "lane": self.lane,
            "not_before_ms": str(self.not_before_ms),
            "created_ms": str(self.created_ms),
            "reason": self.reason[:MAX_FIELD],
            "destinations": ",".join(self.destinations[:MAX_DESTINATIONS]),
            "sender": self.sender[:MAX_FIELD],
            "state": self.state.value,
            "state_ms": str(self.state_ms),
        }
        if self.spends:  # kept whole: a cut key would spend another bucket
            fields["spends"] = _spends_text(self.spends)
        return fields

    @classmethod
    def from_fields(cls, queue_id: str, fields: Mapping[str, str]) -> HoldRecord:
        """The record stored as ``fields``; :class:`RecordError` names what is wrong."""
        try:
            if fields.get("v") != _FORMAT:
                raise RecordError(f"unknown record format {fields.get('v')!r}")
            lane = fields["lane"]
            if not lane:
                raise RecordError("no lane")
            destinations = fields.get("destinations", "")
            return cls(
                queue_id=queue_id,
                lane=lane,
                not_before_ms=int(fields["not_before_ms"]),
                created_ms=int(fields["created_ms"]),
                reason=fields.get("reason", ""),
                destinations=tuple(d for d in destinations.split(",") if d),
                sender=fields.get("sender", ""),
                state=RecordState(fields.get("state", RecordState.HELD.value)),
                state_ms=int(fields.get("state_ms", "0")),
                spends=_spends_of(fields.get("spends", "")),
            )
        except KeyError as exc:
            raise RecordError(f"missing field {exc.args[0]!r}") from None
        except ValueError as exc:
            if isinstance(exc, RecordError):
                raise
            raise RecordError(str(exc)) from None


class BrokenRecord(NamedTuple):
    """A record that exists but cannot be parsed: reported, never acted upon blindly."""

    queue_id: str
    problem: str
    fields: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RecordSet:
    """Every record of an instance, as one read found them."""

    records: dict[str, HoldRecord] = field(default_factory=dict)
    broken: dict[str, BrokenRecord] = field(default_factory=dict)


class HoldRecordStore(Protocol):
    """Where hold records, the scheduler's lease and the waiting lanes live."""

    in_process: bool
    """True when the records live in this process only (``memory://``)."""

    async def put(self, record: HoldRecord, ttl_ms: int = DEFAULT_RECORD_TTL_MS) -> None:
        """Write (or replace) the record of ``record.queue_id``."""
        ...

    async def get(self, queue_id: str) -> HoldRecord | BrokenRecord | None: ...

    async def load(self) -> RecordSet:
        """Every record of the instance."""
        ...

    async def mark(self, queue_ids: Sequence[str], state: RecordState,
                   now_ms: int) -> list[str]:
        """Set the state of existing records; returns the queue ids that existed."""
        ...

    async def delete(self, queue_ids: Sequence[str]) -> int:
        """Delete records; returns how many existed."""
        ...

    async def acquire_lease(self, owner: str, ttl_ms: int) -> bool:
        """Take or extend the lease for ``ttl_ms``; False when another owner holds it."""
        ...

    async def release_lease(self, owner: str) -> bool:
        """Give the lease up if ``owner`` holds it."""
        ...

    async def lease_holder(self) -> str | None: ...

    async def set_waiting_lanes(self, lanes: frozenset[str], ttl_ms: int) -> None: ...

    async def get_waiting_lanes(self) -> frozenset[str]: ...

    async def close(self) -> None: ...


async def waiting_lanes(store: HoldRecordStore) -> frozenset[str]:
    """The lanes whose new mail should wait because the MTA's queues are swollen (empty when
    nothing waits, when no scheduler published anything lately, or when the store fails:
    load shedding is an optimisation, never a reason to refuse mail)."""
    try:
        return await store.get_waiting_lanes()
    except StoreError:
        return frozenset()


# ---------------------------------------------------------------- memory


class MemoryHoldRecords:
    """Records in this process (``memory://``); the scheduler must run in the same process.

    Every call runs synchronously inside its coroutine: atomic on the event loop."""

    in_process = True

    def __init__(self, clock_ms: Callable[[], int] = _wall_clock_ms) -> None:
        self._clock_ms = clock_ms
        self._records: dict[str, tuple[dict[str, str], int]] = {}  # qid -> (fields, expiry)
        self._parsed: dict[str, HoldRecord | BrokenRecord] = {}  # parsed once per write
        self._lease: tuple[str, int] | None = None
        self._waiting: tuple[frozenset[str], int] = (frozenset(), 0)

    def __len__(self) -> int:
        return len(self._records)

    def _live(self, queue_id: str) -> dict[str, str] | None:
        entry = self._records.get(queue_id)
        if entry is None:
            return None
        if entry[1] <= self._clock_ms():
            del self._records[queue_id]
            self._parsed.pop(queue_id, None)
            return None
        return entry[0]

    def _parse_cached(self, queue_id: str, fields: Mapping[str, str]) -> HoldRecord | BrokenRecord:
        parsed = self._parsed.get(queue_id)
        if parsed is None:
            parsed = self._parsed[queue_id] = _parse(queue_id, fields)
        return parsed

    def put_fields(self, queue_id: str, fields: Mapping[str, str],
                   ttl_ms: int = DEFAULT_RECORD_TTL_MS) -> None:
        """Store raw fields (tests use it to plant records that cannot be parsed)."""
        self._records[queue_id] = (dict(fields), self._clock_ms() + ttl_ms)
        self._parsed.pop(queue_id, None)

    async def put(self, record: HoldRecord, ttl_ms: int = DEFAULT_RECORD_TTL_MS) -> None:
        _check_ttl(ttl_ms)
        self.put_fields(record.queue_id, record.to_fields(), ttl_ms)

    async def get(self, queue_id: str) -> HoldRecord | BrokenRecord | None:
        fields = self._live(queue_id)
        return None if fields is None else self._parse_cached(queue_id, fields)

    async def load(self) -> RecordSet:
        found = RecordSet()
        for queue_id in list(self._records):
            fields = self._live(queue_id)
            if fields is not None:
                _add(found, self._parse_cached(queue_id, fields))
        return found

    async def mark(self, queue_ids: Sequence[str], state: RecordState,
                   now_ms: int) -> list[str]:
        marked = []
        for queue_id in queue_ids:
            fields = self._live(queue_id)
            if fields is not None:
                fields["state"], fields["state_ms"] = state.value, str(now_ms)
                self._parsed.pop(queue_id, None)
                marked.append(queue_id)
        return marked

    async def delete(self, queue_ids: Sequence[str]) -> int:
        existed = 0
        for queue_id in dict.fromkeys(queue_ids):
            if self._live(queue_id) is not None:
                del self._records[queue_id]
                self._parsed.pop(queue_id, None)
                existed += 1
        return existed

    async def acquire_lease(self, owner: str, ttl_ms: int) -> bool:
        _check_ttl(ttl_ms)
        now = self._clock_ms()
        if self._lease is None or self._lease[1] <= now or self._lease[0] == owner:
            self._lease = (owner, now + ttl_ms)
            return True
        return False

    async def release_lease(self, owner: str) -> bool:
        if self._lease is not None and self._lease[0] == owner:
            self._lease = None
            return True
        return False

    async def lease_holder(self) -> str | None:
        if self._lease is None or self._lease[1] <= self._clock_ms():
            return None
        return self._lease[0]

    async def set_waiting_lanes(self, lanes: frozenset[str], ttl_ms: int) -> None:
        _check_ttl(ttl_ms)
        self._waiting = (frozenset(lanes), self._clock_ms() + ttl_ms)

    async def get_waiting_lanes(self) -> frozenset[str]:
        lanes, expiry = self._waiting
        return lanes if expiry > self._clock_ms() else frozenset()

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------- redis


class RedisHoldRecords:
    """Records in Redis, shared by every policy server, milter and scheduler on ``url``.

    ``timeout_ms`` bounds each call (a record write at end of message is on the path of an
    SMTP transaction; the scheduler passes a longer one). Every Redis, socket or timeout
    error becomes :class:`~mqpolicy.store.budget.StoreError`.
    """

    in_process = False

    def __init__(self, url: str | None = None, *, client: Redis | None = None,
                 key_prefix: str = "mqpolicy:", instance: str = "default",
                 timeout_ms: int = 1000, read_chunk: int = 1000,
                 max_connections: int = 32) -> None:
        """``url`` for one Redis; or ``client``, already built (e.g. on a Sentinel master),
        with ``decode_responses=True``."""
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive: {timeout_ms}")
        self._timeout_s = timeout_ms / 1000
        base = f"{key_prefix}hold:{instance}:"
        self._record_prefix = base + "rec:"
        self._index = base + "index"
        self._lease = base + "lease"
        self._waiting = f"{key_prefix}load:{instance}:waiting_lanes"
        self._read_chunk = read_chunk
        if client is not None:
            self._client = client
        elif url is None:
            raise ValueError("a Redis URL or client is needed")
        else:
            self._client = self._connect(url, max_connections)
        self._lease_script = self._client.register_script(load_script("hold_lease.lua"))
        self._mark_script = self._client.register_script(load_script("hold_mark.lua"))

    def _connect(self, url: str, max_connections: int) -> Redis:
        # A blocking pool: a burst of record writes waits for a free connection (within
        # the deadline) instead of failing at the pool's size.
        pool = BlockingConnectionPool.from_url(
            parse_redis_url(url).url,
            max_connections=max_connections,
            timeout=self._timeout_s,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 0),
            protocol=2,
            decode_responses=True,
        )
        return Redis(connection_pool=pool)

    def _key(self, queue_id: str) -> str:
        return self._record_prefix + queue_id

    async def _call(self, make: Callable[[], Any], timeout_s: float | None = None) -> Any:
        try:
            async with asyncio.timeout(timeout_s or self._timeout_s):
                return await make()
        except _ERRORS as exc:
            raise StoreError(describe_error(exc)) from exc
        except UnicodeEncodeError as exc:  # a queue id that is not UTF-8: this one fails
            raise StoreError(f"hold records: a queue id Redis cannot be sent ({exc})") from exc

    async def put(self, record: HoldRecord, ttl_ms: int = DEFAULT_RECORD_TTL_MS) -> None:
        _check_ttl(ttl_ms)
        key = self._key(record.queue_id)

        value = json.dumps(record.to_fields(), separators=(",", ":"))

        async def run() -> Any:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(key, value, px=ttl_ms)
            pipe.zadd(self._index, {record.queue_id: record.created_ms})
            return await pipe.execute()

        await self._call(run)

    async def get(self, queue_id: str) -> HoldRecord | BrokenRecord | None:
        value = await self._call(lambda: self._client.get(self._key(queue_id)))
        return _parse_json(queue_id, value) if value is not None else None

    async def load(self) -> RecordSet:
        """Every record: the index, then MGET in chunks (one flat reply per chunk: 10,000
        records in a few round trips). Index entries whose record expired are removed from
        the index on the way."""
        queue_ids: list[str] = await self._call(lambda: self._client.zrange(self._index, 0, -1))
        found = RecordSet()
        gone: list[str] = []
        step = self._read_chunk
        for start in range(0, len(queue_ids), step):
            chunk = queue_ids[start:start + step]
            keys = [self._key(q) for q in chunk]
            values = await self._call(lambda keys=keys: self._client.mget(keys),  # type: ignore[misc]
                                      max(self._timeout_s, 5.0))
            for queue_id, value in zip(chunk, values, strict=True):
                if value is not None:
                    _add(found, _parse_json(queue_id, value))
                else:
                    gone.append(queue_id)
        if gone:
            await self._call(lambda: self._client.zrem(self._index, *gone))
        return found

    async def mark(self, queue_ids: Sequence[str], state: RecordState,
                   now_ms: int) -> list[str]:
        if not queue_ids:
            return []
        keys = [self._key(q) for q in queue_ids]
        replies = await self._call(lambda: self._mark_script(keys=keys,
                                                             args=[state.value, now_ms]))
        return [q for q, done in zip(queue_ids, replies, strict=True) if int(done) == 1]

    async def delete(self, queue_ids: Sequence[str]) -> int:
        if not queue_ids:
            return 0
        ids = list(dict.fromkeys(queue_ids))

        async def run() -> Any:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(*(self._key(q) for q in ids))
            pipe.zrem(self._index, *ids)
            return await pipe.execute()

        replies = await self._call(run)
        return int(replies[0])

    async def acquire_lease(self, owner: str, ttl_ms: int) -> bool:
        _check_ttl(ttl_ms)
        reply = await self._call(lambda: self._lease_script(
            keys=[self._lease], args=["acquire", owner, ttl_ms]))
        return int(reply) == 1

    async def release_lease(self, owner: str) -> bool:
        reply = await self._call(lambda: self._lease_script(
            keys=[self._lease], args=["release", owner, 1]))
        return int(reply) == 1

    async def lease_holder(self) -> str | None:
        holder: str | None = await self._call(lambda: self._client.get(self._lease))
        return holder

    async def set_waiting_lanes(self, lanes: frozenset[str], ttl_ms: int) -> None:
        _check_ttl(ttl_ms)
        value = ",".join(sorted(lanes))
        await self._call(lambda: self._client.set(self._waiting, value, px=ttl_ms))

    async def get_waiting_lanes(self) -> frozenset[str]:
        value: str | None = await self._call(lambda: self._client.get(self._waiting))
        return frozenset(v for v in (value or "").split(",") if v)

    async def ping(self) -> None:
        await self._call(self._client.ping)

    async def close(self) -> None:
        with contextlib.suppress(*_ERRORS):
            await self._client.aclose()


# ---------------------------------------------------------------- helpers


def _parse_json(queue_id: str, value: str) -> HoldRecord | BrokenRecord:
    try:
        fields = json.loads(value)
    except ValueError:
        return BrokenRecord(queue_id, "not JSON", {"raw": value[:MAX_FIELD]})
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        return BrokenRecord(queue_id, "not a record", {"raw": value[:MAX_FIELD]})
    return _parse(queue_id, fields)


def _parse(queue_id: str, fields: Mapping[str, str]) -> HoldRecord | BrokenRecord:
    try:
        return HoldRecord.from_fields(queue_id, fields)
    except RecordError as exc:
        return BrokenRecord(queue_id, str(exc), dict(fields))


def _add(found: RecordSet, item: HoldRecord | BrokenRecord) -> None:
    if isinstance(item, HoldRecord):
        found.records[item.queue_id] = item
    else:
        found.broken[item.queue_id] = item


def _check_ttl(ttl_ms: int) -> None:
    if ttl_ms <= 0:
        raise ValueError(f"ttl_ms must be positive: {ttl_ms}")


def record_ttl_for(policy: Policy) -> int:
    """How long a hold record may live under this policy: past its longest delay."""
    if policy.scheduler is None:
        return DEFAULT_RECORD_TTL_MS
    return record_ttl_ms(policy.scheduler.schedule.max_delay_ms)
