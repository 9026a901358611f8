"""Every store family opened from the one ``store:`` URL: the counters
(:func:`open_store`), the destination backoff states (:func:`open_backoff_store`) and the
hold records (:func:`open_hold_records`, :func:`records_for`).

The URL is parsed once (:func:`~mqpolicy.store.urls.parse_store_url`, the parser
``mqpolicy check`` runs too) and each family is opened from what it says: ``memory://`` in
this process; ``redis://``, ``rediss://``, ``unix://`` one Redis; ``redis+sentinel://``
the master of a Sentinel service; ``redis+cluster://`` a Redis Cluster. A family that
cannot live on a URL's store says so (ValueError): hold records on a Redis Cluster (their
multi-key operations need one slot)."""

from __future__ import annotations

from redis.asyncio.cluster import RedisCluster

from mqpolicy.policy.model import Policy, SchedulerSettings
from mqpolicy.store.backoff_states import BackoffStore, MemoryBackoffStore, RedisBackoffStore
from mqpolicy.store.budget import CounterStore
from mqpolicy.store.cluster import ClusterStore
from mqpolicy.store.hold_records import HoldRecordStore, MemoryHoldRecords, RedisHoldRecords
from mqpolicy.store.memory import DEFAULT_MAX_ENTRIES, MemoryStore
from mqpolicy.store.redis import RedisStore
from mqpolicy.store.sentinel import SentinelStore, open_sentinel_master
from mqpolicy.store.urls import StoreLocation, parse_store_url

_BACKOFF_TIMEOUT_MS = 500


def _located(url: str | StoreLocation) -> StoreLocation:
    return url if isinstance(url, StoreLocation) else parse_store_url(url)


def open_store(url: str | StoreLocation, *, timeout_ms: int = 50,
               key_prefix: str = "mqpolicy:",
               max_entries: int = DEFAULT_MAX_ENTRIES) -> CounterStore:
    """The counter store: ``memory://`` is the embedded store (of at most ``max_entries``
    entries), ``redis://``, ``rediss://`` and ``unix://`` one Redis
    (:class:`~mqpolicy.store.redis.RedisStore`), ``redis+sentinel://`` the master of a
    Sentinel-monitored service (:class:`~mqpolicy.store.sentinel.SentinelStore`),
    ``redis+cluster://`` a Redis Cluster (:class:`~mqpolicy.store.cluster.ClusterStore`);
    ``rediss+`` for TLS. ValueError for any other URL (:func:`parse_store_url`)."""
    where = _located(url)
    if where.kind == "memory":
        return MemoryStore(key_prefix=key_prefix, max_entries=max_entries)
    if where.kind == "redis":
        return RedisStore(where.url, timeout_ms=timeout_ms, key_prefix=key_prefix)
    if where.kind == "sentinel":
        return SentinelStore(where.url, timeout_ms=timeout_ms, key_prefix=key_prefix)
    return ClusterStore(where.url, timeout_ms=timeout_ms, key_prefix=key_prefix)


def open_backoff_store(url: str | StoreLocation, *,
                       key_prefix: str = "mqpolicy:") -> BackoffStore:
    """The backoff store beside the counter store of the same URL: in memory, in one
    Redis, on a Sentinel service's master. On a Redis Cluster the states live in the one
    slot of ``<prefix>backoff`` (one key: no cross-slot operation), reached through a
    cluster client, which follows that slot when it moves."""
    where = _located(url)
    if where.kind == "memory":
        return MemoryBackoffStore()
    if where.kind == "sentinel":
        client, sentinel = open_sentinel_master(where.url, timeout_ms=_BACKOFF_TIMEOUT_MS)
        return RedisBackoffStore(client=client, key_prefix=key_prefix, closing=(sentinel,))
    if where.cluster is not None:
        target = where.cluster
        host, port = target.nodes[0]
        timeout_s = _BACKOFF_TIMEOUT_MS / 1000
        cluster = RedisCluster(host=host, port=port, username=target.username,
                               password=target.password, ssl=target.tls,
                               socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return RedisBackoffStore(client=cluster, key_prefix=key_prefix)  # type: ignore[arg-type]
    return RedisBackoffStore(where.url, key_prefix=key_prefix, timeout_ms=_BACKOFF_TIMEOUT_MS)


def open_hold_records(url: str | StoreLocation, *, key_prefix: str = "mqpolicy:",
                      timeout_ms: int = 1000, instance: str = "default") -> HoldRecordStore:
    """The record store beside the counter store of ``url`` (the ``store:`` setting):
    memory, one Redis, or the master of a Sentinel service. ValueError for a Redis
    Cluster (the records' multi-key operations need one slot)."""
    where = _located(url)
    if where.kind == "memory":
        return MemoryHoldRecords()
    if where.kind == "redis":
        return RedisHoldRecords(where.url, key_prefix=key_prefix, instance=instance,
                                timeout_ms=timeout_ms)
    if where.kind == "sentinel":
        client, _ = open_sentinel_master(where.url, timeout_ms=timeout_ms,
                                         decode_responses=True)
        return RedisHoldRecords(client=client,
                                key_prefix=key_prefix, instance=instance, timeout_ms=timeout_ms)
    raise ValueError(f"store {where.url!r}: hold records need memory://, one Redis or "
                     "Sentinel (a Redis Cluster cannot keep them: their multi-key "
                     "operations need one slot)")


def records_for(policy: Policy, *, timeout_ms: int) -> HoldRecordStore:
    """The record store of a policy: its store URL and key prefix, and the scheduler's
    ``instance`` (the MTA whose hold queue the records describe)."""
    scheduler = policy.scheduler or SchedulerSettings()
    return open_hold_records(policy.store.url, key_prefix=policy.store.key_prefix,
                             timeout_ms=timeout_ms, instance=scheduler.instance)
