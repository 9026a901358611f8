"""What every Redis-backed store shares to reach Redis: store URLs split and their host
lists and credentials read, commands packed in C (hiredis), the Lua scripts (package data)
and their SHA1, key prefixes in SCAN patterns, and Redis client errors as a store error's
text."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import hiredis
from redis.asyncio import Redis
from redis.exceptions import NoScriptError


def split_store_url(url: str, schemes: frozenset[str], forms: str) -> SplitResult:
    """``urlsplit`` of a Redis store URL whose scheme is one of ``schemes`` (else ValueError
    listing ``forms``), refusing what no Redis store URL can mean: no ``//`` after the scheme
    (``unix:/path``, ``redis:host:6379``; the error says the form to write) and a fragment
    (an unencoded ``#`` in a password would cut the URL there)."""
    text = url.strip()
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise ValueError(f"store {url!r}: not a {' / '.join(sorted(schemes))} URL ({forms})")
    rest = text[len(scheme) + 1:]
    if not rest.startswith("//"):
        # unix:/run/redis.sock -> unix:///run/redis.sock; redis:h:6379 -> redis://h:6379
        slash = "/" if scheme == "unix" else ""
        raise ValueError(f"store {url!r}: write {scheme}://{slash}{rest.lstrip('/')}")
    if parts.fragment or text.endswith("#"):
        raise ValueError(f"store {url!r}: '#' in a store URL must be written %23")
    return parts


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


class HiredisPacking:
    """Connection mixin: pack commands in C with ``hiredis.pack_command``.

    redis-py's asyncio packer re-joins its output buffer for every argument (quadratic up to
    its 6 kB cut-off): for a 256-decision EVALSHA (~4,000 arguments) it costs ~8x as much
    as hiredis, and more than everything else the client does for the batch.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, str | bytes):
            words = name.split()  # "SCRIPT LOAD" goes out as two arguments
            if len(words) > 1:
                args = (*words, *args[1:])
        return [pack(*args)]


def pack(*words: Any) -> bytes:
    """One command in the Redis protocol, packed in C."""
    packed: bytes = hiredis.pack_command(words)
    return packed


def with_hiredis_packing(connection_class: Any) -> Any:
    return type(f"Packed{connection_class.__name__}", (HiredisPacking, connection_class), {})


def load_script(name: str) -> str:
    """A Lua source from package data (``lua/<name>``)."""
    return resources.files("mqpolicy.store").joinpath("lua", name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua source and its SHA1, for ``EVALSHA`` (and ``SCRIPT LOAD`` after NOSCRIPT)."""

    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> LuaScript:
        source = load_script(name)
        return cls(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())

    async def run(self, client: Redis, keys: Sequence[str], args: Sequence[int]) -> Any:
        """``EVALSHA``, with ``EVAL`` when the server lost its script cache."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


def glob_escape(text: str) -> str:
    """``text`` matched literally in a Redis SCAN pattern."""
    out = []
    for ch in text:
        if ch in "*?[]\\":
            out.append("\\")
        out.append(ch)
    return "".join(out)


def unprefixed(key: bytes | str, strip: int) -> str:
    """A key as SCAN returns it, without the store's prefix of ``strip`` bytes."""
    raw = key if isinstance(key, bytes) else key.encode()
    return raw[strip:].decode("utf-8", "replace")


NO_ANSWER = "redis did not answer within the deadline"


def describe_error(exc: BaseException) -> str:
    """A Redis client's error as a StoreError's text."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return NO_ANSWER
    return f"redis: {type(exc).__name__}: {exc}"
