"""Fixtures every test module may ask for (registered here or by the plugins below)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mqpolicy.budget import CounterStore
from mqpolicy.memory_store import MemoryStore
from mqpolicy.redis_store import RedisStore

pytest_plugins = ["tests.redis_fixture"]
pytest_plugins += ["tests.postfix_fixture"]
pytest_plugins += ["tests.redis_ha_fixture"]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets (a unix socket path has at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mqadm-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["memory", "redis"])
def each_store(request: pytest.FixtureRequest) -> Callable[[], CounterStore]:
    """Makes a fresh counter store of each kind in turn: the memory store, and a Redis
    store on the session's redis-server (flushed first) with a deadline of 5 s, for tests
    about what a store answers rather than how fast."""
    if request.param == "memory":
        return MemoryStore
    server = request.getfixturevalue("redis_clean")
    return lambda: RedisStore(server.unix_url, timeout_ms=5000)
