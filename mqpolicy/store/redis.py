"""The shared counter store: budgets in Redis, one Lua call per batch of decisions.

:meth:`RedisStore.evaluate` does not send one command per decision. Decisions are queued and
coalesced: the first one schedules a flush on the next loop iteration, so every decision
made in the same iteration rides in the same ``EVALSHA`` of ``lua/gcra_batch.lua``; while
``max_in_flight`` batches are out, new decisions queue and leave together when one returns.
Each decision is still all-or-nothing and independent of the others in its batch.

Failure: every decision has a deadline of ``timeout_ms`` from the call, kept by the store
without a timer per decision: a batch may run until the deadline of its youngest decision
(one ``asyncio.timeout_at`` per batch, around the connect too), an older one in it fails
at its own deadline (one more timer for a batch of decisions with different deadlines, set
at the start and moved from deadline to deadline), and a decision still queued
at its deadline fails without being sent. So :meth:`CoalescingStore.evaluate` answers or
raises within the deadline (``keeps_deadline``) and callers need no timer of their own.

A decision that fails after its batch left is not counted afterwards: the batch carries
each decision's deadline in Redis' own clock (:mod:`mqpolicy.store.batch_script`'s
``RedisClock``: the loop's deadline less ``DEADLINE_MARGIN`` of ``timeout_ms``, converted
with an offset that is never above the true one), and the script skips a decision past it,
so a Redis resumed from a pause (or reading a batch late) runs none of the decisions
already answered per ``on_store_error``. What remains: a decision Redis ran before that
point whose answer then took longer than the margin to be read (Redis stopped between
running the script and writing its reply, the loop busy that long) is answered per
``on_store_error`` and counted; and for up to ``CLOCK_KEEP_S`` after Redis' clock steps
back by ``X``, deadlines are up to ``X`` late.
One decision that cannot be sent or that the script raises on (a key of another type)
fails alone; the others of its batch are answered.
redis-py's own retries are off (a dead Redis must fail fast, the caller's
``on_store_error`` decides), and every Redis, socket or timeout error becomes
:class:`~mqpolicy.store.budget.StoreError` (:class:`~mqpolicy.store.budget.StoreTimeout` for
a missed deadline). The pool reconnects by itself on the next call once Redis is back; a
script cache lost on restart is reloaded (NOSCRIPT).

Measured with ``bench/store_bench.py --repeat 3 --in-flight 1,2 --protocols 2,3``
(redis-server 7.0 on a unix socket, redis-py 8.1 + hiredis 3.5, Python 3.11, a 2-core VM
shared with other jobs: wall figures vary up to 2x between runs, CPU figures less):

* client CPU per sequential call, RESP2 / RESP3: PING 141 / 187 us, EVALSHA of 1 decision
  154 / 172, of 64 666 / 580, of 256 1694 / 1900 us. No consistent gain from RESP3, which
  adds a HELLO round trip per connect: RESP2 (``protocol=2``) it is.
* the store's own call (``_evalsha``: a pooled connection, past redis-py's per-command
  layers; ``RESP2 store`` column of a later run): 60 us of client CPU for one decision
  against 81 through redis-py's ``Script``, 116 against 140 for 16.
* batch size, client CPU per decision: 1 -> 154 us, 16 -> 21, 64 -> 10, 256 -> 6.6;
  redis-server CPU per decision (2 checks + a once key) ~13-16 us in batches of 8+.
  With redis-py's own asyncio packer a 256-decision call costs 7.3 ms of client CPU instead
  of 1.7 ms, hence ``redis_connection.HiredisPacking``.
* evaluate, concurrency 1 / 8 / 64: ~2.5-3k / 8-15k / 15-26k decisions/s.
* open loop (decisions arriving independently) at 4,000/s offered: one batch in flight fell
  behind (3.7k/s done, p50 106 ms), two kept up (4.0k/s, p50 5.6 ms). That was before
  ``redis_connection.HiredisPacking``, when a batch cost the client ~30 us per decision; since then
  (``--in-flight 1,2 --open 5000,10000,20000``) both keep up with 20,000/s offered (p99
  7.0 / 1.3 ms at 20,000/s, 1.4 / 0.9 ms at 10,000/s).
* behind the policy server (``bench/policy_bench.py --stores redis-tcp --concurrency 8,64``,
  Postfix-like closed loop), one or two batches in flight: no throughput difference beyond
  this machine's noise (6,900-9,600 decisions/s at 8 connections, 8,200-11,900 at 64),
  but two keep the tail shorter at 64 connections (p99 10 ms against 23-26 ms with one):
  ``max_in_flight=2``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl

from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from mqpolicy.policy.rates import DEFAULT_ONCE_TTL_MS
from mqpolicy.store.batch_script import (
    DEADLINE_MARGIN,
    GIVE_BACK_SCRIPT_NAME,
    SCRIPT_NAME,
    PendingDecision,
    RedisClock,
    decode_batch,
    encode_batch,
    encode_give_back,
    split_reply,
    validate_key_text,
)
from mqpolicy.store.budget import (
    BucketState,
    BudgetCheck,
    Evaluation,
    StoreError,
    StoreTimeout,
    parse_bucket,
    validate_decision,
)
from mqpolicy.store.redis_connection import (
    NO_ANSWER,
    LuaScript,
    describe_error,
    glob_escape,
    pack,
    split_store_url,
    unprefixed,
    with_hiredis_packing,
)

REDIS_SCHEMES: Final = frozenset({"redis", "rediss", "unix"})
DEFAULT_REDIS_PORT: Final = 6379
REDIS_URL_FORMS: Final = (
    "redis://[user:password@]host[:port][/db], rediss://... (TLS), "
    "unix://[user:password@]/path/to/redis.sock[?db=N]"
)
_TLS_OPTIONS: Final = frozenset(
    {"ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
     "ssl_check_hostname"}
)
_CERT_REQS: Final = frozenset({"none", "optional", "required"})
_ERRORS: Final = (RedisError, OSError, TimeoutError)
_UNSENDABLE: Final = (TypeError, ValueError, OverflowError)
"""What packing a command raises for an argument it cannot send (hiredis)."""



@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a ``redis://``, ``rediss://`` or ``unix://`` URL says; ``url`` is what the
    clients are built from (``Redis.from_url``)."""

    url: str
    host: str | None
    port: int | None
    path: str | None
    db: int = 0
    tls: bool = False


def parse_redis_url(url: str) -> RedisTarget:
    """One Redis, as :class:`RedisStore` and the stores beside it (backoff states, hold
    records) open it: ``redis://[user:password@]host[:port][/db]``, ``rediss://`` for TLS
    (options ``ssl_ca_certs``, ``ssl_ca_path``, ``ssl_certfile``, ``ssl_keyfile``,
    ``ssl_cert_reqs``, ``ssl_check_hostname``), ``unix://[user:password@]/path/to/redis.sock``;
    the database in the path or as ``?db=N``. redis-py's own parser runs on it too; where that
    one guesses, this refuses (ValueError saying what to write): a database that is not a
    number (redis-py would take 0), a host in a ``unix://`` URL (redis-py would drop it),
    ``unix:/path`` (refused by redis-py since 8.2), other options (redis-py would pass them to
    the connection, failing at the first call, or override the store's own timeouts and
    protocol)."""
    parts = split_store_url(url, REDIS_SCHEMES, REDIS_URL_FORMS)
    scheme = parts.scheme.lower()
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        known = name == "db" or (scheme == "rediss" and name in _TLS_OPTIONS)
        if not known:
            allowed = ["db", *sorted(_TLS_OPTIONS)] if scheme == "rediss" else ["db"]
            why = (" (a TLS option: rediss:// only)" if name in _TLS_OPTIONS
                   else " (credentials go before the host: user:password@host)"
                   if name in ("username", "password") else "")
            raise ValueError(f"store {url!r}: unknown option {name!r}{why}; "
                             f"known: {', '.join(allowed)}")
        if name in options:
            raise ValueError(f"store {url!r}: option {name!r} given twice")
        if not value:
            raise ValueError(f"store {url!r}: option {name!r} needs a value")
        options[name] = value
    if options.get("ssl_cert_reqs", "required") not in _CERT_REQS:
        raise ValueError(f"store {url!r}: ssl_cert_reqs is one of {', '.join(sorted(_CERT_REQS))}")
    try:
        hostname, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError(f"store {url!r}: bad host or port in {parts.netloc!r} "
                         "(host:port, [IPv6]:port)") from None
    host = path = None
    segments = [s for s in parts.path.split("/") if s]
    db_text = options.get("db")
    if scheme == "unix":
        if hostname:
            path_given = f"/{hostname}{parts.path}" if hostname != "localhost" else parts.path
            raise ValueError(f"store {url!r}: a unix:// URL names no host, the socket path "
                             f"comes after the third slash: write unix://{path_given}")
        if not segments:
            raise ValueError(f"store {url!r}: no socket path (unix:///path/to/redis.sock)")
        path = parts.path
    else:
        if not hostname:
            raise ValueError(f"store {url!r}: no host ({scheme}://host[:port][/db], "
                             f"{scheme}://localhost:6379/0 for this machine)")
        if port == 0:
            raise ValueError(f"store {url!r}: bad port 0")
        host = hostname
        if len(segments) > 1:
            raise ValueError(f"store {url!r}: expected /db after the host, got {parts.path!r}")
        if segments:
            if db_text is not None:
                raise ValueError(f"store {url!r}: the database given twice (path and ?db=)")
            db_text = segments[0]
    if db_text is not None and not db_text.isdigit():
        raise ValueError(f"store {url!r}: the database must be a number, got {db_text!r}")
    text = url.strip()
    try:
        parse_url(text)  # what Redis.from_url will do with it
    except ValueError as exc:
        raise ValueError(f"store {url!r}: {exc}") from None
    if host is not None and port is None:
        port = DEFAULT_REDIS_PORT
    return RedisTarget(url=text, host=host, port=port, path=path,
                       db=int(db_text) if db_text is not None else 0, tls=scheme == "rediss")


class _BatchExpiry:
    """Fails each decision of a batch in flight at its own deadline (a StoreTimeout; the
    batch goes on for the others): one timer, at the oldest deadline still due, none when
    all of the batch's decisions share one deadline (the batch's own timeout covers it);
    the batch cancels it when it answers."""

    __slots__ = ("_batch", "_handle", "_index", "_loop")

    def __init__(self, batch: list[PendingDecision], loop: asyncio.AbstractEventLoop) -> None:
        self._batch = batch
        self._loop = loop
        self._index = 0
        self._handle: asyncio.TimerHandle | None = None
        if batch[0].deadline < batch[-1].deadline:
            self._handle = loop.call_at(batch[0].deadline, self._expire)

    def _expire(self) -> None:
        batch, now = self._batch, self._loop.time()
        index = self._index
        while index < len(batch) and batch[index].deadline <= now:
            future = batch[index].future
            if not future.done():
                future.set_exception(StoreTimeout(NO_ANSWER))
            index += 1
        self._index = index
        self._handle = (self._loop.call_at(batch[index].deadline, self._expire)
                        if index < len(batch) else None)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class CoalescingStore:
    """The queue every Redis-backed store shares: decisions made in one loop iteration leave
    together, at most ``max_batch`` per batch and ``max_in_flight`` batches at once, and
    each decision has the deadline ``timeout_ms`` from its call, in the queue and in its
    batch alike. Subclasses say how a batch is answered
    (:meth:`_run`) and close their clients after :meth:`_close_queue`."""

    keeps_deadline = True
    """:meth:`evaluate` answers or raises within ``timeout_ms``: callers need no timer."""

    def __init__(self, *, timeout_ms: int, max_batch: int, max_in_flight: int) -> None:
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive: {timeout_ms}")
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._timeout_s = timeout_ms / 1000
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: deque[PendingDecision] = deque()
        self._in_flight = 0
        self._flush_scheduled = False
        self._batches: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches_sent = 0
        """Batches sent so far (one EVALSHA each on one Redis, NOSCRIPT reloads aside)."""
        self.decisions_sent = 0

    async def evaluate(
        self,
        checks: Sequence[BudgetCheck],
        now_ms: int,
        once_key: str | None = None,
        once_ttl_ms: int = DEFAULT_ONCE_TTL_MS,
        ledger_key: str | None = None,
    ) -> Evaluation:
        validate_decision(checks, now_ms, once_ttl_ms)
        validate_key_text(checks, once_key)
        if ledger_key is not None:
            validate_key_text((), ledger_key)
        if self._closed:
            raise StoreError("redis store is closed")
        if not checks and once_key is None:
            return Evaluation((), committed=True)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Evaluation] = loop.create_future()
        self._queue.append(PendingDecision(checks, now_ms, once_key, once_ttl_ms, future,
                                           loop.time() + self._timeout_s, ledger_key))
        if not self._flush_scheduled and self._in_flight < self._max_in_flight:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        """Start batches from the queue while fewer than ``max_in_flight`` are out."""
        self._flush_scheduled = False
        queue = self._queue
        loop = asyncio.get_running_loop()
        now = loop.time()
        while queue and self._in_flight < self._max_in_flight:
            batch: list[PendingDecision] = []
            while queue and len(batch) < self._max_batch:
                pending = queue.popleft()
                if pending.future.done():  # a caller that gave up spends nothing
                    continue
                if pending.deadline <= now:  # waited its whole deadline in the queue
                    pending.future.set_exception(StoreTimeout(NO_ANSWER))
                    continue
                batch.append(pending)
            if not batch:
                return
            self._in_flight += 1
            task = loop.create_task(self._send(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run(self, batch: list[PendingDecision]) -> Sequence[Evaluation | StoreError]:
        """Answer every decision of ``batch``, in order (called under the deadline); a
        :class:`StoreError` in place of an evaluation fails that decision alone."""
        raise NotImplementedError

    async def _send(self, batch: list[PendingDecision]) -> None:
        # The queue is in call order: deadlines rise along the batch. The batch may run
        # until its last decision's deadline; each earlier one fails at its own.
        expiry = _BatchExpiry(batch, asyncio.get_running_loop())
        try:
            self.batches_sent += 1
            self.decisions_sent += len(batch)
            async with asyncio.timeout_at(batch[-1].deadline):
                evaluations = await self._run(batch)
        except asyncio.CancelledError:
            self._fail(batch, StoreError("redis store closed while a batch was in flight"))
            raise
        except (*_ERRORS, StoreError, ValueError, TypeError, IndexError) as exc:
            self._fail(batch, exc)
        else:
            for pending, evaluation in zip(batch, evaluations, strict=True):
                if pending.future.done():
                    continue
                if isinstance(evaluation, StoreError):
                    pending.future.set_exception(evaluation)
                else:
                    pending.future.set_result(evaluation)
        finally:
            expiry.cancel()
            self._in_flight -= 1
            self._fail(batch, StoreError("redis store: batch ended without an answer"))
            if self._queue and not self._closed:
                self._flush()

    @staticmethod
    def _fail(batch: list[PendingDecision], exc: BaseException) -> None:
        message = exc.args[0] if isinstance(exc, StoreError) and exc.args else None
        kind = StoreTimeout if isinstance(exc, TimeoutError | StoreTimeout) else StoreError
        for pending in batch:
            if not pending.future.done():
                error = kind(message or describe_error(exc))
                error.__cause__ = exc
                pending.future.set_exception(error)

    async def _close_queue(self) -> bool:
        """Fail queued decisions and let in-flight batches end (each has its deadline).
        False when already closed."""
        if self._closed:
            return False
        self._closed = True
        self._fail(list(self._queue), StoreError("redis store is closed"))
        self._queue.clear()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        return True


class RedisStore(CoalescingStore):
    """Budgets in Redis, shared by every process and host that uses the same keys.

    ``url``: ``redis://[user:pass@]host:port/db``, ``rediss://...`` (TLS) or
    ``unix:///path/to/redis.sock?db=0``; or an already-built ``redis.asyncio.Redis`` client
    (e.g. a Sentinel master client: :mod:`mqpolicy.store.sentinel`), which the store then
    owns (closes) and should have ``decode_responses=False`` and no retries of its own.
    ``timeout_ms`` bounds every call. ``max_batch`` caps the decisions in one EVALSHA,
    ``max_in_flight`` the batches sent and not yet answered. Use it from one event loop
    (other threads: ``run_coroutine_threadsafe``).
    """

    def __init__(
        self,
        url: str | Redis,
        *,
        timeout_ms: int = 50,
        key_prefix: str = "mqpolicy:",
        max_batch: int = 256,
        max_in_flight: int = 2,
        protocol: int = 2,
    ) -> None:
        super().__init__(timeout_ms=timeout_ms, max_batch=max_batch,
                         max_in_flight=max_in_flight)
        self._prefix = key_prefix
        if isinstance(url, Redis):
            self._client = url
        else:
            self._client = Redis.from_url(
                parse_redis_url(url).url,
                # No socket timeout (redis-py's default is 5 s): every call here runs under
                # an asyncio deadline of its own, and redis-py would add a timer per read
                # and a task per send.
                socket_timeout=None,
                socket_connect_timeout=self._timeout_s,
                retry=Retry(NoBackoff(), 0),
                protocol=protocol,
                decode_responses=False,
            )
        pool = self._client.connection_pool
        pool.connection_class = with_hiredis_packing(pool.connection_class)
        self._script = LuaScript.load(SCRIPT_NAME)
        self._clock = RedisClock(self._client)
        self._margin_s = self._timeout_s * DEADLINE_MARGIN
        self._give_back_script = LuaScript.load(GIVE_BACK_SCRIPT_NAME)

    async def _run(self, batch: list[PendingDecision]) -> list[Evaluation | StoreError]:
        clock = self._clock
        if clock.client is not self._client:  # a new server (Sentinel): its own clock
            clock = self._clock = RedisClock(self._client)
        loop = asyncio.get_running_loop()
        if clock.offset_ms is None:
            await self._read_clock(clock)
        margin = self._margin_s
        deadlines = [clock.deadline_ms(p.deadline - margin) for p in batch]
        try:
            command = self._command(batch, deadlines)
        except _UNSENDABLE:
            return await self._run_sendable(batch)
        rows, redis_ms = split_reply(await self._call(command), len(batch))
        clock.observe(redis_ms, loop.time())
        return decode_batch([len(p.checks) for p in batch], rows)

    def _command(self, batch: list[PendingDecision], deadlines: Sequence[int] = ()) -> bytes:
        """The batch's ``EVALSHA``, packed (TypeError, ValueError: something in it cannot
        be sent)."""
        keys, args = self._encode(batch, deadlines)
        return pack("EVALSHA", self._script.sha, len(keys), *keys, *args)

    async def _read_clock(self, clock: RedisClock) -> None:
        """Ask Redis its clock (``TIME``), before the first batch to a server."""
        pool: Any = self._client.connection_pool  # redis-py's pool is untyped
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(pack("TIME"), check_health=False)
            seconds, micros = await conn.read_response()
        finally:
            await pool.release(conn)
        clock.observe(int(seconds) * 1000 + int(micros) // 1000,
                      asyncio.get_running_loop().time())

    async def _run_sendable(
        self, batch: list[PendingDecision]
    ) -> list[Evaluation | StoreError]:
        """A batch that cannot be packed whole: each decision that cannot be packed alone
        fails (a StoreError: its limits follow ``on_store_error``), the others are sent
        together."""
        answers: list[Evaluation | StoreError | None] = []
        sendable: list[PendingDecision] = []
        for pending in batch:
            try:
                self._command([pending])
            except _UNSENDABLE as exc:
                answers.append(StoreError(f"redis store: a decision that cannot be sent "
                                          f"({type(exc).__name__}: {exc})"))
            else:
                answers.append(None)
                sendable.append(pending)
        if len(sendable) == len(batch):
            raise StoreError("redis store: the batch cannot be sent")
        sent = iter(await self._run(sendable) if sendable else ())
        return [answer if answer is not None else next(sent) for answer in answers]

    async def _evalsha(self, keys: list[str], args: list[int]) -> Any:
        """``EVALSHA`` of the batch script with these KEYS and ARGV (:meth:`_call`)."""
        return await self._call(pack("EVALSHA", self._script.sha, len(keys), *keys, *args))

    async def _call(self, command: bytes) -> Any:
        """A packed ``EVALSHA`` of the batch script on a pooled connection, past the
        client's per-command layers (retries, which are off, and observability hooks: a
        third of the client's CPU per call). A script cache lost on restart is reloaded
        once. A connection left in doubt (an error, a cancelled read) is dropped by
        redis-py."""
        pool: Any = self._client.connection_pool  # redis-py's pool is untyped
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(command, check_health=False)
            try:
                return await conn.read_response()
            except NoScriptError:
                load = pack("SCRIPT", "LOAD", self._script.source)
                await conn.send_packed_command(load, check_health=False)
                await conn.read_response()
                await conn.send_packed_command(command, check_health=False)
                return await conn.read_response()
        finally:
            await pool.release(conn)

    def _encode(self, batch: list[PendingDecision],
                deadlines: Sequence[int] = ()) -> tuple[list[str], list[int]]:
        """KEYS and ARGV of ``gcra_batch.lua`` (see its header); each key listed once."""
        return encode_batch(self._prefix, batch, deadlines)

    # -- the rest of CounterStore ----------------------------------------------------------

    async def inspect(self, keys: Sequence[str], now_ms: int) -> list[BucketState | None]:
        return await inspect_buckets(self._client.pipeline, self._prefix, self._timeout_s, keys)

    async def scan(self, pattern: str, count: int = 1000) -> list[str]:
        """Keys matching ``pattern`` (Redis glob syntax), sorted; which ones when more than
        ``count`` match is unspecified. Each SCAN step has the store's deadline."""
        match = glob_escape(self._prefix) + pattern
        strip = len(self._prefix.encode())
        found: set[str] = set()
        cursor = 0
        try:
            while len(found) < count:
                async with asyncio.timeout(self._timeout_s):
                    cursor, batch = await self._client.scan(
                        cursor, match=match, count=max(100, min(count, 1000))
                    )
                found.update(unprefixed(key, strip) for key in batch)
                if cursor == 0:
                    break
        except _ERRORS as exc:
            raise StoreError(describe_error(exc)) from exc
        return sorted(found)[: max(0, count)]

    async def reset(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        try:
            async with asyncio.timeout(self._timeout_s):
                return int(await self._client.delete(*(self._prefix + key for key in keys)))
        except _ERRORS as exc:
            raise StoreError(describe_error(exc)) from exc

    async def give_back(self, ledger_key: str, now_ms: int) -> int:
        """Read and delete the ledger in one transaction (two callers never both get it),
        then give its spends back in one call of ``lua/gcra_give_back.lua``."""
        ledger = self._prefix + ledger_key
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.lrange(ledger, 0, -1)
                    pipe.delete(ledger)
                    entries, _ = await pipe.execute()
                if not entries:
                    return 0
                keys, args = encode_give_back(entries, now_ms)
                await self._give_back_script.run(self._client, keys, args)
        except _ERRORS as exc:
            raise StoreError(describe_error(exc)) from exc
        return len(entries) // 5

    async def move_ledger(self, ledger_key: str, to_key: str) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.rename(self._prefix + ledger_key, self._prefix + to_key)
        except ResponseError as exc:
            if "no such key" not in str(exc).lower():
                raise StoreError(describe_error(exc)) from exc
        except _ERRORS as exc:
            raise StoreError(describe_error(exc)) from exc

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.ping()
        except _ERRORS as exc:
            raise StoreError(describe_error(exc)) from exc

    async def close(self) -> None:
        """Fail queued decisions, let in-flight batches end (each has its deadline), close."""
        if await self._close_queue():
            with contextlib.suppress(*_ERRORS):
                await self._client.aclose()


async def inspect_buckets(
    pipeline: Callable[..., Any], prefix: str, timeout_s: float, keys: Sequence[str], *,
    errors: tuple[type[BaseException], ...] = _ERRORS,
    describe: Callable[[BaseException], str] = describe_error,
) -> list[BucketState | None]:
    """GET + PTTL of every bucket in one pipeline (one Redis or a cluster's own); the
    client's ``errors`` become a StoreError with ``describe``'s text."""
    if not keys:
        return []
    caught: tuple[type[BaseException], ...] = (*errors, ValueError)
    try:
        async with asyncio.timeout(timeout_s):
            pipe = pipeline(transaction=False)
            for key in keys:
                pipe.get(prefix + key)
                pipe.pttl(prefix + key)
            replies = await pipe.execute()
        states: list[BucketState | None] = []
        for i, key in enumerate(keys):
            value, ttl = replies[2 * i], int(replies[2 * i + 1])
            if value is None or ttl == -2:
                states.append(None)
            else:
                states.append(BucketState(key, *parse_bucket(value), ttl))
    except caught as exc:
        raise StoreError(describe(exc)) from exc
    return states
