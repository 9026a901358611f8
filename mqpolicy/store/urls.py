"""Store URLs (the ``store:`` setting), parsed once: :func:`parse_store_url` reads a URL
with the parser of its store family (the one that store's opening runs) and says which
store it names and where; :func:`check_store_url` is that check alone (``mqpolicy
check``, the policy loader). :mod:`mqpolicy.store.opener` opens every store family from
it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from mqpolicy.store.cluster import CLUSTER_SCHEMES, ClusterTarget, parse_cluster_url
from mqpolicy.store.memory import parse_memory_url
from mqpolicy.store.redis import REDIS_SCHEMES, RedisTarget, parse_redis_url
from mqpolicy.store.sentinel import SENTINEL_SCHEMES, SentinelTarget, parse_sentinel_url

StoreKind = Literal["memory", "redis", "sentinel", "cluster"]

_SHORT_SCHEMES = {"sentinel": "redis+sentinel", "cluster": "redis+cluster"}
_KNOWN = (
    "memory://, redis://host:port/db, rediss://host:port/db, unix:///path/redis.sock?db=0, "
    "redis+sentinel://host:port[,host:port...]/service/db, "
    "redis+cluster://host:port[,host:port...]"
)


@dataclass(frozen=True, slots=True)
class StoreLocation:
    """What a store URL says: which store (``kind``), the URL (stripped), and the target
    its family's parser read (one of ``redis``, ``sentinel``, ``cluster``; none for
    ``memory://``)."""

    kind: StoreKind
    url: str
    redis: RedisTarget | None = None
    sentinel: SentinelTarget | None = None
    cluster: ClusterTarget | None = None


def parse_store_url(url: str) -> StoreLocation:
    """``url`` parsed by its store family's parser
    (:func:`~mqpolicy.store.memory.parse_memory_url`,
    :func:`~mqpolicy.store.redis.parse_redis_url`,
    :func:`~mqpolicy.store.sentinel.parse_sentinel_url`,
    :func:`~mqpolicy.store.cluster.parse_cluster_url`); connects to nothing. ValueError
    saying what to write instead."""
    text = url.strip()
    scheme = urlsplit(text).scheme.lower()
    if scheme == "memory":
        parse_memory_url(url)
        return StoreLocation("memory", text)
    if scheme in REDIS_SCHEMES:
        return StoreLocation("redis", text, redis=parse_redis_url(url))
    if scheme in SENTINEL_SCHEMES:
        return StoreLocation("sentinel", text, sentinel=parse_sentinel_url(url))
    if scheme in CLUSTER_SCHEMES:
        return StoreLocation("cluster", text, cluster=parse_cluster_url(url))
    if scheme in _SHORT_SCHEMES:
        raise ValueError(
            f"store {url!r}: write {_SHORT_SCHEMES[scheme]}:// (or rediss+{scheme}:// for TLS)"
        )
    host_port = ":" in text and "/" not in text  # 127.0.0.1:6379
    hint = f"; for a Redis at {text} write redis://{text}/0" if host_port else ""
    raise ValueError(
        f"store {url!r}: unknown store URL scheme {scheme!r}; use one of {_KNOWN}{hint}"
    )


def check_store_url(url: str) -> StoreKind:
    """Which store ``url`` names, after parsing it as that store's opening does
    (:func:`parse_store_url`); connects to nothing. ValueError saying what to write
    instead."""
    return parse_store_url(url).kind
