"""Where destination backoff states and pauses live: in memory (one process) or in Redis
(shared).

Every policy server, milter and scheduler reads the factors (``factors()``, about once a
second); the feedback process changes them with ``update(destination, change)``, which
is atomic: in Redis an optimistic transaction (WATCH / MULTI / EXEC, retried), so two
feedback processes (two MTA hosts) never lose each other's updates.

Pauses of destinations and lanes (:mod:`mqpolicy.policy.pauses`) live beside them, in the
hash ``<prefix>pauses`` (field ``destination:<name>`` or ``lane:<name>``, a JSON value):
written by ``mqpolicy pause`` / ``resume`` and by feedback rules, read with the factors.
A pause that ran out stays until it is overwritten or resumed; readers ask ``active()``.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from mqpolicy.policy.backoff import BackoffState
from mqpolicy.policy.pauses import Pause, pause_field
from mqpolicy.store.budget import StoreError
from mqpolicy.store.redis import parse_redis_url
from mqpolicy.store.redis_connection import load_script

T = TypeVar("T")
Change = Callable[[BackoffState], tuple[BackoffState, T]]

_KEY = "backoff"
_PAUSES_KEY = "pauses"
_CAS_SCRIPT = load_script("backoff_cas.lua")
# a Redis Cluster client raises its own errors besides redis-py's
_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)
_TTL_MS = 30 * 86_400_000  # a safety net: states are rewritten on every change
_RETRIES = 20
_PAUSE_TTL_MS = 366 * 86_400_000  # a safety net, renewed by every pause: a year at most


class BackoffStore(Protocol):
    async def factors(self) -> dict[str, float]:
        """The factor of every destination that is backed off (factor below 1)."""
        ...

    async def states(self) -> dict[str, BackoffState]: ...

    async def update(self, destination: str, change: Change[T]) -> T:
        """Apply ``change`` to the destination's state atomically; return what it returns."""
        ...

    async def pauses(self) -> list[Pause]:
        """Every stored pause, also those that ran out (see ``Pause.active``)."""
        ...

    async def set_pause(self, pause: Pause) -> None:
        """Store ``pause``, replacing one of the same destination or lane."""
        ...

    async def clear_pause(self, kind: str, name: str) -> Pause | None:
        """End a pause; the one that was stored (None: none was)."""
        ...

    async def close(self) -> None: ...


def _backed_off(states: dict[str, BackoffState]) -> dict[str, float]:
    return {name: state.factor for name, state in states.items() if state.factor < 1.0}


class MemoryBackoffStore:
    """States in this process (``store.url: memory://``): feedback must run in ``serve``."""

    def __init__(self) -> None:
        self._states: dict[str, BackoffState] = {}
        self._pauses: dict[str, Pause] = {}

    async def factors(self) -> dict[str, float]:
        return _backed_off(self._states)

    async def states(self) -> dict[str, BackoffState]:
        return dict(self._states)

    async def update(self, destination: str, change: Change[T]) -> T:
        new, result = change(self._states.get(destination, BackoffState()))
        self._states[destination] = new
        return result

    async def pauses(self) -> list[Pause]:
        return list(self._pauses.values())

    async def set_pause(self, pause: Pause) -> None:
        self._pauses[pause.field] = pause

    async def clear_pause(self, kind: str, name: str) -> Pause | None:
        return self._pauses.pop(pause_field(kind, name), None)

    async def close(self) -> None:
        return None


class RedisBackoffStore:
    """States as JSON in one Redis hash, ``<prefix>backoff``, field = destination."""

    def __init__(self, url: str = "", *, key_prefix: str = "mqpolicy:", timeout_ms: int = 500,
                 client: Redis | None = None, closing: Sequence[Any] = ()) -> None:
        """One Redis by ``url``, or a ready ``client`` (the master of a Sentinel service;
        ``closing`` lists what to close with it)."""
        timeout = timeout_ms / 1000
        self._client: Redis = client or Redis.from_url(parse_redis_url(url).url,
                                                       socket_timeout=timeout,
                                                       socket_connect_timeout=timeout)
        self._closing = closing
        self._key = key_prefix + _KEY
        self._pauses_key = key_prefix + _PAUSES_KEY
        # one update at a time from this process: WATCH retries are for other processes
        self._updating = asyncio.Lock()

    async def states(self) -> dict[str, BackoffState]:
        try:
            raw = await self._client.hgetall(self._key)
        except _ERRORS as exc:
            raise StoreError(f"backoff states: {exc}") from exc
        states = {}
        for field, value in raw.items():
            state = _decode(value)
            if state is not None:
                name = field.decode("utf-8", "replace") if isinstance(field, bytes) else field
                states[name] = state
        return states

    async def factors(self) -> dict[str, float]:
        return _backed_off(await self.states())

    async def update(self, destination: str, change: Change[T]) -> T:
        """Read, change in Python, write back only if unchanged (``lua/backoff_cas.lua``);
        retried when another process changed the state in between."""
        try:
            async with self._updating:
                for attempt in range(_RETRIES):
                    if attempt:
                        await asyncio.sleep(random.uniform(0, 0.002 * attempt))
                    raw = await self._client.hget(self._key, destination)
                    new, result = change(_decode(raw) or BackoffState())
                    written = await self._client.eval(
                        _CAS_SCRIPT, 1, self._key, destination, raw or b"",
                        json.dumps(new.to_dict()), _TTL_MS)
                    if written == 1:
                        return result
        except _ERRORS as exc:
            raise StoreError(f"backoff update of {destination}: {exc}") from exc
        raise StoreError(f"backoff update of {destination}: too much contention")

    async def pauses(self) -> list[Pause]:
        try:
            raw = await self._client.hgetall(self._pauses_key)
        except _ERRORS as exc:
            raise StoreError(f"pauses: {exc}") from exc
        pauses = []
        for value in raw.values():
            try:
                pauses.append(Pause.from_dict(json.loads(value)))
            except (ValueError, TypeError, KeyError):
                continue  # not a pause: never pauses anything
        return pauses

    async def set_pause(self, pause: Pause) -> None:
        try:
            # single commands: a cluster client runs no MULTI
            await self._client.hset(self._pauses_key, pause.field,
                                    json.dumps(pause.to_dict()))
            await self._client.pexpire(self._pauses_key, _PAUSE_TTL_MS)
        except _ERRORS as exc:
            raise StoreError(f"pause of {pause.kind} {pause.name}: {exc}") from exc

    async def clear_pause(self, kind: str, name: str) -> Pause | None:
        field = pause_field(kind, name)
        try:
            raw = await self._client.hget(self._pauses_key, field)
            await self._client.hdel(self._pauses_key, field)
        except _ERRORS as exc:
            raise StoreError(f"resume of {kind} {name}: {exc}") from exc
        if raw is None:
            return None
        try:
            return Pause.from_dict(json.loads(raw))
        except (ValueError, TypeError, KeyError):
            return None

    async def close(self) -> None:
        await self._client.aclose()
        for other in self._closing:
            closer = getattr(other, "aclose", None)
            if closer is not None:
                await closer()


def _decode(value: bytes | str | None) -> BackoffState | None:
    if value is None:
        return None
    try:
        return BackoffState.from_dict(json.loads(value))
    except (ValueError, TypeError, KeyError):
        return None
