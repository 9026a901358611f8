"""Fixtures every test module may ask for (registered here or by the plugins below)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

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
