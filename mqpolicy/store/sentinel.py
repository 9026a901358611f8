"""Budgets in a Redis that Sentinel watches: the Redis store, on whichever server is master.

``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?options]``
lists the sentinels (default port 26379), the monitored service name and the database;
``rediss+sentinel://`` uses TLS to the sentinels and to the master. ``user:password`` are
the master's credentials; options: ``sentinel_username``, ``sentinel_password`` (when the
sentinels themselves require AUTH). Example:
``redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/mqpolicy/0``.

Everything a decision does is exactly :class:`~mqpolicy.store.redis.RedisStore`'s (one
atomic Lua call per batch, same keys, same deadline); only the way to the master differs.
A new connection asks the sentinels, in turn, which server is master and takes the first
answer whose master is neither subjectively nor objectively down; open connections stay
on the server they reached.

During a failover (the master dies; the sentinels agree it is down after their
``down-after-milliseconds``, elect a leader and promote a replica):

* decisions fail fast with :class:`~mqpolicy.store.budget.StoreError` and each limit follows its
  ``on_store_error`` (``accept`` by default): a dead master refuses connections at once, and
  while the sentinels still name it (down) there is no master to connect to. Nothing waits
  for the failover beyond the store's deadline and nothing is retried;
* the first decision after the promotion connects to the new master, which holds every
  counter the old one had replicated. Redis replication is asynchronous: spends acknowledged
  by the old master in its last moments (typically the last few milliseconds) may not have
  reached the replica and are forgotten, i.e. those units come back. Use
  ``min-replicas-to-write`` / ``min-replicas-max-lag`` on the servers to bound that window;
* a demoted master that is still reachable answers writes with READONLY: the connection
  is dropped (one :class:`StoreError`) and the next one asks the sentinels again.

Measured in ``tests/store/test_redis_ha.py`` (loopback, 1 master + 1 replica + 3 sentinels,
``down-after-milliseconds 1000``): decisions failed for about 2-3 s after the master was
killed, each failure within the store's deadline, and continued on the promoted replica
with the budget spent before the failure intact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, unquote

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from mqpolicy.store.redis import RedisStore, split_store_url

SENTINEL_SCHEMES: Final = frozenset({"redis+sentinel", "rediss+sentinel"})
SENTINEL_URL_FORM: Final = (
    "redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?options]"
)
DEFAULT_SENTINEL_PORT: Final = 26379
_SENTINEL_OPTIONS: Final = frozenset({"sentinel_username", "sentinel_password"})
# Sentinel's constructor has no annotations before redis-py 8.2 and has them since: called
# through this name it type-checks the same way under both, with no ignore to go stale.
_new_sentinel: Final[Callable[..., Sentinel]] = Sentinel


def parse_host_list(hosts: str, default_port: int, url: str) -> tuple[tuple[str, int], ...]:
    """``host[:port],host[:port],...`` (IPv6 in brackets) as (host, port) pairs."""
    found: list[tuple[str, int]] = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"store {url!r}: empty host in {hosts!r}")
        if item.startswith("["):
            host, bracket, rest = item[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"store {url!r}: bad IPv6 address {item!r}")
            port_text = rest[1:]
        else:
            host, _, port_text = item.partition(":")
        if not host:
            raise ValueError(f"store {url!r}: empty host in {item!r}")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ValueError(f"store {url!r}: bad port in {item!r}") from None
        if not 0 < port < 65536:
            raise ValueError(f"store {url!r}: bad port in {item!r}")
        found.append((host, port))
    return tuple(found)


def split_credentials(netloc: str) -> tuple[str | None, str | None, str]:
    """``user:password@hosts`` as (user or None, password or None, hosts), percent-decoded."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None, unquote(password) if colon else None, hosts)


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


def open_sentinel_master(
    url: str, *, timeout_ms: int, decode_responses: bool = False,
    master_read_timeout: bool = True,
) -> tuple[Redis, Sentinel]:
    """A ``redis.asyncio`` client on the master a ``redis+sentinel://`` URL names, and the
    :class:`Sentinel` behind it (close both). Connects and reads to sentinels and master
    have the deadline ``timeout_ms`` (reads from the master none with
    ``master_read_timeout=False``: for a caller that keeps its deadline itself, as
    :class:`SentinelStore` does, like :class:`~mqpolicy.store.redis.RedisStore`); nothing
    is retried. Also for the stores beside the counters (hold records, backoff states)."""
    if timeout_ms <= 0:
        raise ValueError(f"timeout_ms must be positive: {timeout_ms}")
    target = parse_sentinel_url(url)
    timeout_s = timeout_ms / 1000
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }
    if target.tls:
        common["ssl"] = True
    sentinel_kwargs = dict(common)
    if target.sentinel_username:
        sentinel_kwargs["username"] = target.sentinel_username
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = _new_sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    client: Redis = sentinel.master_for(
        target.service,
        redis_class=Redis,
        db=target.db,
        username=target.username,
        password=target.password,
        protocol=2,
        decode_responses=decode_responses,
        **{**common, "socket_timeout": timeout_s if master_read_timeout else None},
    )
    return client, sentinel


class SentinelStore(RedisStore):
    """A :class:`RedisStore` on the master of a Sentinel-monitored service.

    ``timeout_ms`` bounds every decision batch, asking the sentinels included; connects to
    sentinels and to the master have the same deadline, and nothing is retried (the
    caller's ``on_store_error`` decides). See the module docstring for failover behaviour.
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
        client, self._sentinel = open_sentinel_master(url, timeout_ms=timeout_ms,
                                                      master_read_timeout=False)
        super().__init__(
            client,
            timeout_ms=timeout_ms,
            key_prefix=key_prefix,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
        )

    async def master_address(self) -> tuple[str, int]:
        """The master the sentinels name now (raises a RedisError when none is up)."""
        host, port = await self._sentinel.discover_master(self.target.service)
        return str(host), int(port)

    async def close(self) -> None:
        await super().close()
        with contextlib.suppress(RedisError, OSError):
            await self._sentinel.aclose()
