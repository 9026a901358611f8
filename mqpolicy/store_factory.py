"""Build a counter store from its URL (the ``store:`` setting)."""

from __future__ import annotations

from urllib.parse import urlsplit

from mqpolicy.budget import CounterStore
from mqpolicy.memory_store import MemoryStore
from mqpolicy.redis_store import RedisStore

_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
_LATER_SCHEMES = frozenset(
    {"redis+sentinel", "rediss+sentinel", "sentinel", "redis+cluster", "rediss+cluster", "cluster"}
)
_KNOWN = "memory://, redis://host:port/db, rediss://host:port/db, unix:///path/redis.sock?db=0"


def open_store(url: str, *, timeout_ms: int = 50, key_prefix: str = "mqpolicy:") -> CounterStore:
    """``memory://`` is the embedded store; ``redis://``, ``rediss://`` and ``unix://`` are
    Redis (see :class:`~mqpolicy.redis_store.RedisStore`). Raises ValueError otherwise."""
    scheme = urlsplit(url.strip()).scheme.lower()
    if scheme == "memory":
        return MemoryStore(key_prefix=key_prefix)
    if scheme in _REDIS_SCHEMES:
        return RedisStore(url.strip(), timeout_ms=timeout_ms, key_prefix=key_prefix)
    if scheme in _LATER_SCHEMES:
        raise ValueError(
            f"store {url!r}: Redis Sentinel and Cluster are not supported yet; "
            f"point the store at one Redis ({_KNOWN})"
        )
    raise ValueError(f"store {url!r}: unknown store URL scheme {scheme!r}; use one of {_KNOWN}")
