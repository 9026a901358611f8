"""Build a counter store from its URL (the ``store:`` setting), and check one without
building it (``mqpolicy check``): both through :func:`check_store_url`, which parses a URL
with the parser of its store family, the one that store's opening runs."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from mqpolicy.store.budget import CounterStore
from mqpolicy.store.cluster import CLUSTER_SCHEMES, ClusterStore, parse_cluster_url
from mqpolicy.store.memory import DEFAULT_MAX_ENTRIES, MemoryStore, parse_memory_url
from mqpolicy.store.redis import REDIS_SCHEMES, RedisStore, parse_redis_url
from mqpolicy.store.sentinel import SENTINEL_SCHEMES, SentinelStore, parse_sentinel_url

StoreKind = Literal["memory", "redis", "sentinel", "cluster"]

_SHORT_SCHEMES = {"sentinel": "redis+sentinel", "cluster": "redis+cluster"}
_KNOWN = (
    "memory://, redis://host:port/db, rediss://host:port/db, unix:///path/redis.sock?db=0, "
    "redis+sentinel://host:port[,host:port...]/service/db, "
    "redis+cluster://host:port[,host:port...]"
)


def check_store_url(url: str) -> StoreKind:
    """Which store ``url`` names, after parsing it as that store's opening does
    (:func:`~mqpolicy.store.memory.parse_memory_url`,
    :func:`~mqpolicy.store.redis.parse_redis_url`,
    :func:`~mqpolicy.store.sentinel.parse_sentinel_url`,
    :func:`~mqpolicy.store.cluster.parse_cluster_url`); connects to nothing. ValueError
    saying what to write instead."""
    text = url.strip()
    scheme = urlsplit(text).scheme.lower()
    if scheme == "memory":
        parse_memory_url(url)
        return "memory"
    if scheme in REDIS_SCHEMES:
        parse_redis_url(url)
        return "redis"
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)
        return "sentinel"
    if scheme in CLUSTER_SCHEMES:
        parse_cluster_url(url)
        return "cluster"
    if scheme in _SHORT_SCHEMES:
        raise ValueError(
            f"store {url!r}: write {_SHORT_SCHEMES[scheme]}:// (or rediss+{scheme}:// for TLS)"
        )
    host_port = ":" in text and "/" not in text  # 127.0.0.1:6379
    hint = f"; for a Redis at {text} write redis://{text}/0" if host_port else ""
    raise ValueError(
        f"store {url!r}: unknown store URL scheme {scheme!r}; use one of {_KNOWN}{hint}"
    )


def open_store(url: str, *, timeout_ms: int = 50, key_prefix: str = "mqpolicy:",
               max_entries: int = DEFAULT_MAX_ENTRIES) -> CounterStore:
    """``memory://`` is the embedded store (of at most ``max_entries`` entries);
    ``redis://``, ``rediss://`` and ``unix://`` are
    one Redis (:class:`~mqpolicy.redis_store.RedisStore`); ``redis+sentinel://`` is the
    master of a Sentinel-monitored service (:class:`~mqpolicy.sentinel_store.SentinelStore`)
    and ``redis+cluster://`` a Redis Cluster (:class:`~mqpolicy.cluster_store.ClusterStore`);
    ``rediss+`` for TLS. Raises ValueError otherwise (:func:`check_store_url`)."""
    url = url.strip()
    kind = check_store_url(url)
    if kind == "memory":
        return MemoryStore(key_prefix=key_prefix, max_entries=max_entries)
    if kind == "redis":
        return RedisStore(url, timeout_ms=timeout_ms, key_prefix=key_prefix)
    if kind == "sentinel":
        return SentinelStore(url, timeout_ms=timeout_ms, key_prefix=key_prefix)
    return ClusterStore(url, timeout_ms=timeout_ms, key_prefix=key_prefix)
