"""Fixtures every test module may ask for (registered here or by the plugins below)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mqpolicy.daemon.structured_log import connection_id_var, queue_id_var
from mqpolicy.store.budget import CounterStore
from mqpolicy.store.memory import MemoryStore
from mqpolicy.store.redis import RedisStore

pytest_plugins = ["tests.support.redis_fixture"]
pytest_plugins += ["tests.support.postfix_fixture"]
pytest_plugins += ["tests.support.redis_ha_fixture"]
pytest_plugins += ["tests.support.milter_session"]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets (a unix socket path has at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mqsock-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def mqpolicy_logger_kept() -> Iterator[None]:
    """Each test leaves the ``mqpolicy`` logger and the log lines' request context as it
    found them. A test that configures logging as the commands do (``configure_logging``:
    a handler of its own, no propagation) would otherwise keep every later test's records
    from pytest's ``caplog``, which listens at the root logger: what a test sees must not
    depend on which tests ran before it."""
    logger = logging.getLogger("mqpolicy")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    # the request context of log lines: a milter callback called from a test's own thread
    # sets them there, and every later line of that thread would carry them
    queue_id, connection_id = queue_id_var.set(""), connection_id_var.set("")
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        queue_id_var.reset(queue_id)
        connection_id_var.reset(connection_id)


@pytest.fixture(params=["memory", "redis"])
def each_store(request: pytest.FixtureRequest) -> Callable[[], CounterStore]:
    """Makes a fresh counter store of each kind in turn: the memory store, and a Redis
    store on the session's redis-server (flushed first) with a deadline of 5 s, for tests
    about what a store answers rather than how fast."""
    if request.param == "memory":
        return MemoryStore
    server = request.getfixturevalue("redis_clean")
    return lambda: RedisStore(server.unix_url, timeout_ms=5000)
