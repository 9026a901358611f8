"""Where destination backoff states live: in memory (one process) or in Redis (shared).

Every policy server, milter and scheduler reads the factors (``factors()``, about once a
second); the feedback process changes them with ``update(destination, change)``, which
is atomic: in Redis an optimistic transaction (WATCH / MULTI / EXEC, retried), so two
feedback processes (two MTA hosts) never lose each other's updates.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Protocol, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from mqpolicy.backoff import BackoffState
from mqpolicy.budget import StoreError

T = TypeVar("T")
Change = Callable[[BackoffState], tuple[BackoffState, T]]

_KEY = "backoff"
_TTL_MS = 30 * 86_400_000  # a safety net: states are rewritten on every change
_RETRIES = 20


class BackoffStore(Protocol):
    async def factors(self) -> dict[str, float]:
        """The factor of every destination that is backed off (factor below 1)."""
        ...

    async def states(self) -> dict[str, BackoffState]: ...

    async def update(self, destination: str, change: Change[T]) -> T:
        """Apply ``change`` to the destination's state atomically; return what it returns."""
        ...

    async def close(self) -> None: ...


def _backed_off(states: dict[str, BackoffState]) -> dict[str, float]:
    return {name: state.factor for name, state in states.items() if state.factor < 1.0}


class MemoryBackoffStore:
    """States in this process (``store.url: memory://``): feedback must run in ``serve``."""

    def __init__(self) -> None:
        self._states: dict[str, BackoffState] = {}

    async def factors(self) -> dict[str, float]:
        return _backed_off(self._states)

    async def states(self) -> dict[str, BackoffState]:
        return dict(self._states)

    async def update(self, destination: str, change: Change[T]) -> T:
        new, result = change(self._states.get(destination, BackoffState()))
        self._states[destination] = new
        return result

    async def close(self) -> None:
        return None


class RedisBackoffStore:
    """States as JSON in one Redis hash, ``<prefix>backoff``, field = destination."""

    def __init__(self, url: str, *, key_prefix: str = "mqpolicy:", timeout_ms: int = 500) -> None:
        timeout = timeout_ms / 1000
        self._client: Redis = Redis.from_url(url, socket_timeout=timeout,
                                             socket_connect_timeout=timeout)
        self._key = key_prefix + _KEY
        # one update at a time from this process: WATCH retries are for other processes
        self._updating = asyncio.Lock()

    async def states(self) -> dict[str, BackoffState]:
        try:
            raw = await self._client.hgetall(self._key)
        except (RedisError, OSError) as exc:
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
        try:
            async with self._updating, self._client.pipeline(transaction=True) as pipe:
                for attempt in range(_RETRIES):
                    if attempt:
                        await asyncio.sleep(random.uniform(0, 0.002 * attempt))
                    try:
                        await pipe.watch(self._key)
                        current = _decode(await pipe.hget(self._key, destination))
                        new, result = change(current or BackoffState())
                        pipe.multi()  # type: ignore[no-untyped-call]
                        pipe.hset(self._key, destination, json.dumps(new.to_dict()))
                        pipe.pexpire(self._key, _TTL_MS)
                        await pipe.execute()
                    except WatchError:
                        continue
                    return result
        except (RedisError, OSError) as exc:
            raise StoreError(f"backoff update of {destination}: {exc}") from exc
        raise StoreError(f"backoff update of {destination}: too much contention")

    async def close(self) -> None:
        await self._client.aclose()


def _decode(value: bytes | str | None) -> BackoffState | None:
    if value is None:
        return None
    try:
        return BackoffState.from_dict(json.loads(value))
    except (ValueError, TypeError, KeyError):
        return None


def open_backoff_store(url: str, *, key_prefix: str = "mqpolicy:") -> BackoffStore:
    """The backoff store beside the counter store of the same URL."""
    if url.strip().lower().startswith("memory:"):
        return MemoryBackoffStore()
    return RedisBackoffStore(url.strip(), key_prefix=key_prefix)
