"""Budgets in a Redis that Sentinel watches: the Redis store, on whichever server is master.

``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?options]``
lists the sentinels (default port 26379), the monitored service name and the database;
``rediss+sentinel://`` uses TLS to the sentinels and to the master. ``user:password`` are
the master's credentials; options: ``sentinel_username``, ``sentinel_password`` (when the
sentinels themselves require AUTH). Example:
``redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/mqpolicy/0``.

Everything a decision does is exactly :class:`~mqpolicy.store.redis.RedisStore`'s (one
atomic Lua call per batch, same keys, same deadline); only the way to the master differs
(:class:`MasterTracker`): the store asks every sentinel, takes the newest configuration
they name and writes there once that server answers ``ROLE`` as master.

What Redis (7.0) does in a switchover, and what the store does about it:

* ``SENTINEL FAILOVER`` (planned: the old master stays up). The sentinel that runs it
  announces ``+try-failover`` on its own pub/sub, chooses a replica two or three of its
  timer ticks later (~100-200 ms) and sends it ``REPLICAOF NO ONE``. Nothing pauses or
  fences the old master: it goes on accepting writes, and with ``min-replicas-to-write``
  too as long as another replica still follows it, until Sentinel tells it to follow the
  new master some 10 s after the switch (``+convert-to-slave``, four publish periods);
  its resync then drops every write it took after the promotion. So the store stops
  writing to the master on ``+try-failover`` (it subscribes to every sentinel: only the
  one running the failover announces it before the promotion), before the replica is
  promoted; batches already sent end on the old master and reach the replica with
  replication. Decisions then fail at once and follow ``on_store_error`` until a
  sentinel has seen the replica answer as master (``+promoted-slave``: from then on the
  switch cannot be undone; about 1 s, the sentinel's INFO period during a failover)
  and the replica answers ``ROLE`` as master. Aborted failovers give the old master back.
* The master dies: batches fail on the refused connection; the store asks the sentinels
  every 50 ms (and at each of their events) until they have promoted a replica
  (``down-after-milliseconds``, election, promotion).
* READONLY (a demoted master), NOREPLICAS (``min-replicas-to-write`` on a master its
  replicas left) or a failed connection: the store stops writing there and asks the
  sentinels again at once; a batch with no answer within its deadline makes it ask
  while writes go on.

The store logs (logger ``mqpolicy.store``) ``store lost its master`` (which one, why) and
``store writes to its master again`` at the first batch the new master answers (which
one, the one before, the time without a writable master, the decisions answered per
``on_store_error`` meanwhile). Measured figures: ``docs/redis_ha.md``.

What it cannot see: a failover announced on a sentinel it cannot reach (it stops writing
at the next ``+promoted-slave``/``+switch-master`` it hears or at READONLY, and writes
in between are lost as before), and a partition that leaves mqpolicy with the old
master but without the sentinels that replace it (split brain; ``min-replicas-to-write``
bounds it on the servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, unquote

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from mqpolicy.store.batch_script import PendingDecision
from mqpolicy.store.budget import BucketState, Evaluation, StoreError
from mqpolicy.store.redis import RedisStore
from mqpolicy.store.redis_connection import (
    parse_host_list,
    split_credentials,
    split_store_url,
    with_hiredis_packing,
)
from mqpolicy.store.sentinel_view import (
    DEFAULT_FAILOVER_TIMEOUT_MS,
    SENTINEL_EVENTS,
    TRY_FAILOVER,
    Address,
    SentinelView,
    address_text,
    choose_master,
    event_address,
    event_service,
    master_unwritable,
    read_view,
    reply_text,
    server_fields,
)

log = logging.getLogger("mqpolicy.store")

SENTINEL_SCHEMES: Final = frozenset({"redis+sentinel", "rediss+sentinel"})
SENTINEL_URL_FORM: Final = (
    "redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?options]"
)
DEFAULT_SENTINEL_PORT: Final = 26379
_SENTINEL_OPTIONS: Final = frozenset({"sentinel_username", "sentinel_password"})
# Sentinel's constructor has no annotations before redis-py 8.2 and has them since: called
# through this name it type-checks the same way under both, with no ignore to go stale.
_new_sentinel: Final[Callable[..., Sentinel]] = Sentinel


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL says."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://`` / ``rediss+sentinel://`` (see the module docstring)."""
    parts = split_store_url(url, SENTINEL_SCHEMES, SENTINEL_URL_FORM)
    scheme = parts.scheme.lower()
    username, password, hosts = split_credentials(parts.netloc)
    if not hosts:
        raise ValueError(f"store {url!r}: no sentinel host")
    sentinels = parse_host_list(hosts, DEFAULT_SENTINEL_PORT, url)
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path:
        raise ValueError(f"store {url!r}: the service name is missing (…/service[/db])")
    if len(path) > 2:
        raise ValueError(f"store {url!r}: expected /service[/db], got {parts.path!r}")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError(f"store {url!r}: the database must be a number, got {path[1]!r}")
        db = int(path[1])
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - _SENTINEL_OPTIONS)
    if unknown:
        raise ValueError(
            f"store {url!r}: unknown option(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(_SENTINEL_OPTIONS))})"
        )
    return SentinelTarget(
        sentinels=sentinels,
        service=path[0],
        db=db,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
        tls=scheme == "rediss+sentinel",
    )


def _connection_options(target: SentinelTarget, timeout_s: float) -> dict[str, Any]:
    """Connect and read deadline, no retries, TLS as the URL says."""
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }
    if target.tls:
        options["ssl"] = True
    return options


def _sentinel_options(target: SentinelTarget, timeout_s: float) -> dict[str, Any]:
    """How to reach the sentinels themselves (their own credentials, if any)."""
    options = _connection_options(target, timeout_s)
    if target.sentinel_username:
        options["username"] = target.sentinel_username
    if target.sentinel_password:
        options["password"] = target.sentinel_password
    return options


def open_sentinel_master(
    url: str, *, timeout_ms: int, decode_responses: bool = False
) -> tuple[Redis, Sentinel]:
    """A ``redis.asyncio`` client on the master a ``redis+sentinel://`` URL names, and the
    :class:`Sentinel` behind it (close both). Connects and reads to sentinels and master
    have the deadline ``timeout_ms``; nothing is retried. For the stores beside the
    counters (hold records, backoff states): a new connection asks the sentinels, an open
    one stays where it is until the server answers READONLY. The counters follow the
    master more closely (:class:`SentinelStore`)."""
    if timeout_ms <= 0:
        raise ValueError(f"timeout_ms must be positive: {timeout_ms}")
    target = parse_sentinel_url(url)
    timeout_s = timeout_ms / 1000
    sentinel = _new_sentinel(list(target.sentinels),
                             sentinel_kwargs=_sentinel_options(target, timeout_s))
    client: Redis = sentinel.master_for(
        target.service,
        redis_class=Redis,
        db=target.db,
        username=target.username,
        password=target.password,
        protocol=2,
        decode_responses=decode_responses,
        **_connection_options(target, timeout_s),
    )
    return client, sentinel


# ------------------------------------------------------------------ following the master

_ROUND_INTERVAL_S: Final = 0.05
"""Between two asks of the sentinels while no master is writable (sooner on an event)."""
_RESUBSCRIBE_S: Final = 0.5
"""Before subscribing again to a sentinel that went away."""
_LISTEN_PING_S: Final = 1.0
"""A quiet subscription is pinged; one that stays silent twice as long is dropped."""
_CLOSE_GRACE_S: Final = 1.0
"""A client left behind is closed this long after its batches' deadlines."""
_ERRORS: Final = (RedisError, OSError, TimeoutError)

class _NoMaster(Connection):
    """Stands for the master until the sentinels have named one: never connects."""

    async def connect(self) -> None:
        raise RedisConnectionError("no master known yet")


@dataclass(slots=True)
class _Outage:
    """A time without a writable master."""

    since: float  # loop time
    previous: Address | None
    failed: int = 0  # decisions answered per on_store_error meanwhile


class MasterTracker:
    """Which server of a Sentinel service the counters are written to, and when none is.

    * Every sentinel is subscribed to (events are published only on the sentinel where
      they happen: the one that runs a failover is the only one to announce it before
      the replica is promoted). ``+try-failover`` stops writes at once; the events that
      follow, a reconnection to a sentinel and a batch that timed out make it ask again.
    * Asking: every sentinel at once (``SENTINEL MASTER`` and ``SENTINEL REPLICAS``, one
      round trip each, the store's deadline),
      :func:`~mqpolicy.store.sentinel_view.choose_master`, then ``ROLE`` on the server
      chosen, which must answer ``master``.
    * READONLY, NOREPLICAS or a failed connection from the master stop writes too; while
      there is none, decisions fail at once (:class:`StoreError`) and the sentinels are
      asked every ``_ROUND_INTERVAL_S`` (and on every event) until one is found.
    * The loss, and the first batch the master answers after it, are logged (logger
      ``mqpolicy.store``), the latter with the time and the decisions failed in between.
    """

    def __init__(self, target: SentinelTarget, timeout_s: float) -> None:
        self.target = target
        self._timeout_s = timeout_s
        options = _sentinel_options(target, timeout_s)
        self._sentinels = [Redis(host=h, port=p, decode_responses=True, **options)
                           for h, p in target.sentinels]
        self._master: Address | None = None  # decisions go there; None: nowhere now
        self._clients: dict[Address, Redis] = {}
        self._outage: _Outage | None = None
        self._awaited: dict[int, float] = {}  # sentinel -> loop time it started a failover
        self._wake = asyncio.Event()
        self._first: asyncio.Future[None] | None = None
        self._resolver: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_round = -math.inf
        self._stops = 0  # lose() calls: an ask that began before one cannot install
        self._closed = False
        self.master_losses = 0
        """Times the store stopped writing to a master (a failover, an error)."""
        self.listening = 0
        """Sentinels subscribed to now."""

    @property
    def address(self) -> Address | None:
        """The master decisions go to now (None: none until one is found)."""
        return self._master

    # -- what the store asks ----------------------------------------------------------------

    async def writable(self) -> Redis:
        """The client of the master to write to. Before the first one is known, waits for
        the first ask of the sentinels; after that never waits: StoreError when there is
        none now."""
        master = self._master
        if master is not None:
            return self._clients[master]
        if self._closed:
            raise StoreError("redis store is closed")
        if self._first is None:
            self._start()
        if self._first is not None and not self._first.done():
            await asyncio.shield(self._first)
            master = self._master
            if master is not None:
                return self._clients[master]
        raise StoreError(f"redis sentinel: no writable master for {self.target.service!r} "
                         "(the sentinels are being asked)")

    def no_master(self, decisions: int) -> None:
        """``decisions`` failed for want of a master."""
        if self._outage is not None:
            self._outage.failed += decisions

    def answered(self, address: Address) -> None:
        """The master at ``address`` answered a batch."""
        outage = self._outage
        if outage is None or address != self._master:
            return
        self._outage = None
        log.info("store writes to its master again", extra={"fields": {
            "master": address_text(address),
            "previous": address_text(outage.previous),
            "without_master_s": round(asyncio.get_running_loop().time() - outage.since, 3),
            "decisions_on_store_error": outage.failed,
        }})

    def failed(self, address: Address, exc: BaseException, decisions: int) -> None:
        """A batch sent to ``address`` failed with ``exc``."""
        if address == self._master and master_unwritable(exc):
            self.lose(f"{type(exc).__name__}: {exc}")
        self.no_master(decisions)

    def timed_out(self, address: Address, decisions: int) -> None:
        """A batch sent to ``address`` had no answer within its deadline: in doubt, ask
        the sentinels and the master's role (writes go on meanwhile)."""
        self.no_master(decisions)
        if address == self._master:
            self._check()

    def lose(self, why: str) -> None:
        """Stop writing to the master now; ask the sentinels until one is found."""
        if self._closed:
            return
        previous, self._master = self._master, None
        self._stops += 1
        if previous is not None:
            self.master_losses += 1
        if self._outage is None:
            self._outage = _Outage(asyncio.get_running_loop().time(), previous)
            log.warning("store lost its master", extra={"fields": {
                "master": address_text(previous), "why": why}})
        if self._resolver is None:  # its first ask no sooner than _ROUND_INTERVAL_S after
            self._resolver = self._spawn(self._resolve())  # the last (NOREPLICAS again)

    # -- asking the sentinels ---------------------------------------------------------------

    def _start(self) -> None:
        """At first use (a loop is running): the listeners and the first ask."""
        self._first = asyncio.get_running_loop().create_future()
        for index in range(len(self._sentinels)):
            self._spawn(self._listen(index))
        if self._resolver is None:
            self._resolver = self._spawn(self._resolve())

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _resolve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                wait = self._last_round + _ROUND_INTERVAL_S - loop.time()
                if wait > 0 and not self._wake.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                self._wake.clear()
                stops = self._stops
                views = await self._ask()
                address = choose_master(views, self._awaited)
                if (address is not None and await self._role(address) == "master"
                        and stops == self._stops):  # no failover announced meanwhile
                    self._install(address)
                    return
                if self._first is not None and not self._first.done():
                    self._first.set_result(None)
                    self.lose("no sentinel names a master that answers as one")
        finally:
            if self._first is not None and not self._first.done():
                self._first.set_result(None)
            if self._resolver is asyncio.current_task():
                self._resolver = None

    def _check(self) -> None:
        """Ask once, writes going on: stop them if the sentinels name another master, run
        a failover, or the master says it is not one any more."""
        if self._checker is None and self._resolver is None and not self._closed:
            self._checker = self._spawn(self._check_once())

    async def _check_once(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(max(0.0, self._last_round + _ROUND_INTERVAL_S - loop.time()))
            master, stops = self._master, self._stops
            views = await self._ask()
            if master is None or stops != self._stops:
                return
            chosen = choose_master(views, self._awaited)
            if chosen is None and any(v is not None and v.switching for v in views):
                self.lose("a sentinel runs a failover")
                return
            if chosen is not None and chosen != master:
                self.lose(f"the sentinels name {address_text(chosen)}")
                return
            role = await self._role(master)
            if role is not None and role != "master" and stops == self._stops:
                self.lose(f"it answers ROLE {role}")
        finally:
            self._checker = None

    async def _ask(self) -> list[SentinelView | None]:
        """Every sentinel's view, at once (None for one that did not answer in time)."""
        loop = asyncio.get_running_loop()
        self._last_round = loop.time()
        views = list(await asyncio.gather(*(self._view(s) for s in self._sentinels)))
        longest = max((v.failover_timeout_ms for v in views if v is not None),
                      default=DEFAULT_FAILOVER_TIMEOUT_MS) / 1000
        for index, since in list(self._awaited.items()):
            view = views[index]
            # A failover it announced is over (promoted, aborted), or given up on.
            if (view is not None and not view.switching) or loop.time() - since > longest:
                del self._awaited[index]
        return views

    async def _view(self, sentinel: Redis) -> SentinelView | None:
        service = self.target.service
        try:
            async with asyncio.timeout(self._timeout_s):
                pipe: Any = sentinel.pipeline(transaction=False)  # partly untyped
                pipe.execute_command("SENTINEL", "MASTER", service)
                pipe.execute_command("SENTINEL", "REPLICAS", service)
                master, replicas = await pipe.execute()
            return read_view(server_fields(master), [server_fields(r) for r in replicas])
        except (*_ERRORS, ValueError, KeyError):
            return None

    async def _role(self, address: Address) -> str | None:
        """What ``ROLE`` says the server is (None: no answer)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                role = await self._client_for(address).role()
        except _ERRORS:
            return None
        return reply_text(role[0]) if isinstance(role, list) and role else None

    def _client_for(self, address: Address) -> Redis:
        client = self._clients.get(address)
        if client is None:
            host, port = address
            target = self.target
            client = Redis(
                host=host, port=port, db=target.db, username=target.username,
                password=target.password, protocol=2, decode_responses=False,
                **{**_connection_options(target, self._timeout_s),
                   # every batch has a deadline of its own (see RedisStore)
                   "socket_timeout": None},
            )
            pool = client.connection_pool
            pool.connection_class = with_hiredis_packing(pool.connection_class)
            self._clients[address] = client
        return client

    def _install(self, address: Address) -> None:
        """Write to ``address`` from now on; clients of other servers are closed once
        their batches are over."""
        for other in [a for a in self._clients if a != address]:
            self._spawn(self._close_later(self._clients.pop(other)))
        if self._master is None and self._outage is None:
            log.info("store master", extra={"fields": {"master": address_text(address)}})
        self._master = address

    async def _close_later(self, client: Redis) -> None:
        try:
            await asyncio.sleep(self._timeout_s + _CLOSE_GRACE_S)
        finally:
            with contextlib.suppress(*_ERRORS):
                await client.aclose()

    # -- listening to the sentinels -----------------------------------------------------------

    async def _listen(self, index: int) -> None:
        """Subscribe to one sentinel's events, again whenever it goes away."""
        host, port = self.target.sentinels[index]
        options = {**_sentinel_options(self.target, self._timeout_s), "socket_timeout": None}
        loop = asyncio.get_running_loop()
        while not self._closed:
            # Not decode_responses: redis-py 8.1 then loses the PONG of a subscribed PING.
            client = Redis(host=host, port=port, decode_responses=False, **options)
            pubsub: Any = client.pubsub(ignore_subscribe_messages=True)  # partly untyped
            subscribed = False
            try:
                async with asyncio.timeout(self._timeout_s):
                    await pubsub.subscribe(*SENTINEL_EVENTS)
                subscribed = True
                self.listening += 1
                self._check()  # events may have been missed while not subscribed
                heard = loop.time()
                while True:
                    message = await pubsub.get_message(timeout=_LISTEN_PING_S)
                    now = loop.time()
                    if message is not None:
                        heard = now
                        if message["type"] == "message":
                            self._on_event(index, reply_text(message["channel"]),
                                           reply_text(message["data"]))
                    elif now - heard > 2 * _LISTEN_PING_S:
                        raise RedisConnectionError("the sentinel stopped answering")
                    elif now - heard >= _LISTEN_PING_S:
                        await pubsub.ping()
            except _ERRORS:
                pass
            finally:
                self.listening -= subscribed
                with contextlib.suppress(*_ERRORS):
                    await pubsub.aclose()
                with contextlib.suppress(*_ERRORS):
                    await client.aclose()
            await asyncio.sleep(_RESUBSCRIBE_S)

    def _on_event(self, index: int, channel: str, data: str) -> None:
        if event_service(channel, data) != self.target.service:
            return
        master = self._master
        named = event_address(channel, data)
        if channel == TRY_FAILOVER:
            self._awaited[index] = asyncio.get_running_loop().time()
            host, port = self.target.sentinels[index]
            self.lose(f"sentinel {address_text((host, port))} starts a failover")
        elif master is not None and (
            (channel == "+convert-to-slave" and named == master)
            or (channel in ("+promoted-slave", "+switch-master") and named != master)
        ):
            self.lose(f"{channel} {data}")
        self._wake.set()

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in [*self._clients.values(), *self._sentinels]:
            with contextlib.suppress(*_ERRORS):
                await client.aclose()
        self._clients.clear()


class SentinelStore(RedisStore):
    """A :class:`RedisStore` on the master of a Sentinel-monitored service, which it
    follows through switchovers and failovers (:class:`MasterTracker`).

    ``timeout_ms`` bounds every decision batch, the first ask of the sentinels included;
    asks and connects to sentinels and to the master have the same deadline, and nothing
    is retried (the caller's ``on_store_error`` decides). See the module docstring.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_ms: int = 50,
        key_prefix: str = "mqpolicy:",
        max_batch: int = 256,
        max_in_flight: int = 2,
    ) -> None:
        self.target = parse_sentinel_url(url)
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive: {timeout_ms}")
        self._tracker = MasterTracker(self.target, timeout_ms / 1000)
        super().__init__(
            Redis.from_pool(ConnectionPool(connection_class=_NoMaster)),
            timeout_ms=timeout_ms,
            key_prefix=key_prefix,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
        )

    @property
    def master_losses(self) -> int:
        """Times the store stopped writing to a master (a failover, an error)."""
        return self._tracker.master_losses

    @property
    def sentinels_listened(self) -> int:
        """Sentinels whose events the store is subscribed to now (all of them, normally,
        from the first decision on)."""
        return self._tracker.listening

    async def _on_master(self) -> Address:
        """Point the client at the master to write to (StoreError when none is now)."""
        self._client = await self._tracker.writable()
        address = self._tracker.address
        if address is None:  # lost while waiting
            raise StoreError("redis sentinel: the master was lost")
        return address

    async def _run(self, batch: list[PendingDecision]) -> list[Evaluation | StoreError]:
        tracker = self._tracker
        try:
            address = await self._on_master()
        except StoreError:
            tracker.no_master(len(batch))
            raise
        try:
            evaluations = await super()._run(batch)
        except _ERRORS as exc:
            tracker.failed(address, exc, len(batch))
            raise
        except asyncio.CancelledError:  # the batch's deadline (or the store closing)
            tracker.timed_out(address, len(batch))
            raise
        failed = sum(isinstance(e, StoreError) for e in evaluations)  # e.g. past deadline
        if failed:
            tracker.no_master(failed)
        tracker.answered(address)
        return evaluations

    async def master_address(self) -> Address:
        """The master decisions are written to (StoreError when there is none now)."""
        return await self._on_master()

    async def inspect(self, keys: Sequence[str], now_ms: int) -> list[BucketState | None]:
        await self._on_master()
        return await super().inspect(keys, now_ms)

    async def scan(self, pattern: str, count: int = 1000) -> list[str]:
        await self._on_master()
        return await super().scan(pattern, count)

    async def reset(self, keys: Sequence[str]) -> int:
        await self._on_master()
        return await super().reset(keys)

    async def ping(self) -> None:
        await self._on_master()
        await super().ping()

    async def close(self) -> None:
        if await self._close_queue():
            await self._tracker.close()
