"""Build a counter store from its URL (the ``store:`` setting)."""

from __future__ import annotations

from urllib.parse import urlsplit

from mqpolicy.budget import CounterStore
from mqpolicy.cluster_store import CLUSTER_SCHEMES, ClusterStore
from mqpolicy.memory_store import MemoryStore
from mqpolicy.redis_store import RedisStore
from mqpolicy.sentinel_store import SENTINEL_SCHEMES, SentinelStore

_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
_SHORT_SCHEMES = {"sentinel": "redis+sentinel", "cluster": "redis+cluster"}
_KNOWN = (
    "memory://, redis://host:port/db, rediss://host:port/db, unix:///path/redis.sock?db=0, "
    "redis+sentinel://host:port[,host:port...]/service/db, "
    "redis+cluster://host:port[,host:port...]"
)


def open_store(url: str, *, timeout_ms: int = 50, key_prefix: str = "mqpolicy:") -> CounterStore:
    """``memory://`` is the embedded store; ``redis://``, ``rediss://`` and ``unix://`` are
    one Redis (:class:`~mqpolicy.redis_store.RedisStore`); ``redis+sentinel://`` is the
    master of a Sentinel-monitored service (:class:`~mqpolicy.sentinel_store.SentinelStore`)
    and ``redis+cluster://`` a Redis Cluster (:class:`~mqpolicy.cluster_store.ClusterStore`);
    ``rediss+`` for TLS. Raises ValueError otherwise."""
    url = url.strip()
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryStore(key_prefix=key_prefix)
    if scheme in _REDIS_SCHEMES:
        return RedisStore(url, timeout_ms=timeout_ms, key_prefix=key_prefix)
    if scheme in SENTINEL_SCHEMES:
        return SentinelStore(url, timeout_ms=timeout_ms, key_prefix=key_prefix)
    if scheme in CLUSTER_SCHEMES:
        return ClusterStore(url, timeout_ms=timeout_ms, key_prefix=key_prefix)
    if scheme in _SHORT_SCHEMES:
        raise ValueError(
            f"store {url!r}: write {_SHORT_SCHEMES[scheme]}:// (or rediss+{scheme}:// for TLS)"
        )
    raise ValueError(f"store {url!r}: unknown store URL scheme {scheme!r}; use one of {_KNOWN}")
