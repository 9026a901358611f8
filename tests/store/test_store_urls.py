"""Store URLs: ``mqpolicy check`` and opening the store agree on every one.

For each URL of the table, a policy file with it goes through ``mqpolicy check`` (the
function the command runs; one case through the command itself), and the counter store,
the backoff store and the hold-record store are opened on it. A good URL passes the check
and opens, connecting to nothing: the Redis addresses in it are a listening socket of the
test's own, which must have no connection waiting afterwards. A bad URL fails the check on
the line of ``store.url`` with the form to write instead, and every opening refuses it with
the same words.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqpolicy.commands.check import cmd_check
from mqpolicy.policy.loader import load_policy
from mqpolicy.store.cluster import ClusterStore
from mqpolicy.store.memory import MemoryStore
from mqpolicy.store.opener import open_backoff_store, open_hold_records, open_store
from mqpolicy.store.redis import RedisStore, parse_redis_url
from mqpolicy.store.sentinel import SentinelStore
from mqpolicy.store.urls import check_store_url


class Listeners:
    """A TCP and a unix listening socket that the good URLs point at: after the stores were
    opened and closed, neither may have a connection waiting."""

    def __init__(self, directory: Path) -> None:
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.sock = str(directory / "redis.sock")
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.sock)
        self.unix.listen()

    def url(self, template: str) -> str:
        return template.format(port=self.port, sock=self.sock)

    def assert_untouched(self) -> None:
        for listener in (self.tcp, self.unix):
            listener.setblocking(False)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue  # nobody connected
            conn.close()
            pytest.fail(f"a store connected to {listener.getsockname()!r} when opened")

    def close(self) -> None:
        self.tcp.close()
        self.unix.close()


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[Listeners]:
    found = Listeners(tmp_path)
    try:
        yield found
    finally:
        found.close()


def policy_file(directory: Path, url: str) -> Path:
    path = directory / "policy.yaml"
    path.write_text(f"store:\n  url: {json.dumps(url)}\n")  # store.url on line 2
    return path


def check(path: Path) -> tuple[int, str]:
    out = io.StringIO()
    return cmd_check(str(path), out), out.getvalue()


GOOD = [
    ("memory://", MemoryStore),
    ("MEMORY://", MemoryStore),
    ("redis://127.0.0.1:{port}", RedisStore),
    ("redis://127.0.0.1:{port}/0", RedisStore),
    ("REDIS://127.0.0.1:{port}/3", RedisStore),
    ("redis://127.0.0.1:{port}?db=2", RedisStore),
    ("redis://user:p%23ss@127.0.0.1:{port}/1", RedisStore),
    ("redis://[::1]:{port}/0", RedisStore),
    ("rediss://127.0.0.1:{port}/2", RedisStore),
    ("rediss://127.0.0.1:{port}/0?ssl_ca_certs=/etc/ssl/certs/ca-certificates.crt"
     "&ssl_cert_reqs=required", RedisStore),
    ("unix://{sock}", RedisStore),
    ("unix://{sock}?db=1", RedisStore),
    ("unix://:secret@{sock}?db=0", RedisStore),
    ("redis+sentinel://127.0.0.1:{port}/mymaster", SentinelStore),
    ("redis+sentinel://127.0.0.1:{port},[::1]:{port}/mymaster/2", SentinelStore),
    ("rediss+sentinel://127.0.0.1:{port}/mymaster/0?sentinel_password=s", SentinelStore),
    ("redis+cluster://127.0.0.1:{port}", ClusterStore),
    ("redis+cluster://127.0.0.1:{port},127.0.0.1:{port}/0", ClusterStore),
    ("rediss+cluster://user:pw@127.0.0.1:{port}", ClusterStore),
]


@pytest.mark.parametrize(("template", "kind"), GOOD)
def test_good_url_passes_check_and_opens_without_connecting(
    template: str, kind: type, tmp_path: Path, listeners: Listeners
) -> None:
    url = listeners.url(template)
    code, out = check(policy_file(tmp_path, url))
    assert code == 0, out
    assert f"store {url}" in out
    assert load_policy(str(policy_file(tmp_path, url)), check_store_url).store.url == url

    async def main() -> None:
        store = open_store(url, timeout_ms=200, key_prefix="p:")
        assert isinstance(store, kind)
        await store.close()
        backoff = open_backoff_store(url)
        await backoff.close()
        if kind is ClusterStore:  # hold records need one slot: serve goes on without them
            with pytest.raises(ValueError, match="hold records need"):
                open_hold_records(url)
        else:
            records = open_hold_records(url)
            await records.close()

    asyncio.run(main())
    listeners.assert_untouched()


# (url, what the error must say: the form to write instead, or what is wrong)
BAD = [
    ("unix:/run/redis/redis.sock", "write unix:///run/redis/redis.sock"),
    ("unix:/run/redis/redis.sock?db=1", "write unix:///run/redis/redis.sock?db=1"),
    ("unix://run/redis/redis.sock", "write unix:///run/redis/redis.sock"),
    ("unix://localhost/run/redis.sock", "write unix:///run/redis.sock"),
    ("unix:///", "no socket path (unix:///path/to/redis.sock)"),
    ("unix:///run/redis.sock?db=one", "the database must be a number, got 'one'"),
    ("unix:///run/redis.sock/?ssl_ca_certs=/ca.pem", "a TLS option: rediss:// only"),
    ("redis:127.0.0.1:6379", "write redis://127.0.0.1:6379"),
    ("redis://127.0.0.1:notaport/0", "bad host or port in '127.0.0.1:notaport'"),
    ("redis://127.0.0.1:70000/0", "bad host or port"),
    ("redis://127.0.0.1:0/0", "bad port 0"),
    ("redis:///0", "no host (redis://host[:port][/db], redis://localhost:6379/0"),
    ("redis://::1:6379/0", "[IPv6]:port"),
    ("redis://127.0.0.1:6379/zero", "the database must be a number, got 'zero'"),
    ("redis://127.0.0.1:6379/1/2", "expected /db after the host, got '/1/2'"),
    ("redis://127.0.0.1:6379/1?db=2", "the database given twice"),
    ("redis://127.0.0.1:6379?db=", "option 'db' needs a value"),
    ("redis://127.0.0.1:6379?db=1&db=2", "option 'db' given twice"),
    ("redis://127.0.0.1:6379?socket_timeout=5", "unknown option 'socket_timeout'; known: db"),
    ("redis://127.0.0.1:6379?password=x", "credentials go before the host"),
    ("redis://:pa#ss@127.0.0.1:6379/0", "'#' in a store URL must be written %23"),
    ("rediss://127.0.0.1:6379?ssl_cert_reqs=sometimes",
     "ssl_cert_reqs is one of none, optional, required"),
    ("memory://x", "write memory://"),
    ("memory:", "write memory://"),
    ("redis+sentinel://127.0.0.1:26379", "the service name is missing"),
    ("redis+sentinel://127.0.0.1:26379/mymaster/x", "the database must be a number"),
    ("redis+sentinel://127.0.0.1:26379/mymaster?db=1", "unknown option(s) db"),
    ("redis+sentinel:127.0.0.1:26379/mymaster", "write redis+sentinel://127.0.0.1:26379/"),
    ("rediss+sentinel://127.0.0.1:99999/mymaster", "bad port"),
    ("redis+cluster://127.0.0.1:7000/2", "database 0 only"),
    ("redis+cluster://127.0.0.1:7000?db=0", "takes no options"),
    ("rediss+cluster://127.0.0.1:x", "bad port"),
    ("redis+cluster://", "no cluster node"),
    ("sentinel://127.0.0.1:26379/mymaster", "write redis+sentinel://"),
    ("cluster://127.0.0.1:7000", "write redis+cluster://"),
    ("memcached://127.0.0.1:11211", "unknown store URL scheme 'memcached'"),
    ("127.0.0.1:6379", "write redis://127.0.0.1:6379/0"),
    ("localhost:6379", "write redis://localhost:6379/0"),
]


@pytest.mark.parametrize(("url", "says"), BAD)
def test_bad_url_fails_check_as_opening_fails(url: str, says: str, tmp_path: Path) -> None:
    path = policy_file(tmp_path, url)
    code, out = check(path)
    assert code == 1
    assert f"{path}:2: store.url: " in out
    assert says in out

    with pytest.raises(ValueError, match=r"^store ") as opened:
        open_store(url)
    assert says in str(opened.value)
    assert str(opened.value) in out  # the very words check printed
    for opening in (open_backoff_store, open_hold_records):
        with pytest.raises(ValueError) as refused:
            opening(url)
        assert str(refused.value) == str(opened.value)


def test_mqpolicy_check_command_says_what_to_write(tmp_path: Path) -> None:
    path = policy_file(tmp_path, "unix:/run/redis/redis.sock")
    result = subprocess.run([sys.executable, "-m", "mqpolicy", "check", "-c", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert (f"{path}:2: store.url: store 'unix:/run/redis/redis.sock': "
            "write unix:///run/redis/redis.sock") in result.stdout


@pytest.mark.parametrize(
    ("url", "host", "port", "path", "db", "tls"),
    [
        ("redis://cache.example/3", "cache.example", 6379, None, 3, False),
        ("redis://cache.example:6390?db=4", "cache.example", 6390, None, 4, False),
        ("rediss://u:p@cache.example:6380", "cache.example", 6380, None, 0, True),
        ("redis://[2001:db8::1]:6379/1", "2001:db8::1", 6379, None, 1, False),
        ("unix:///run/redis/redis.sock?db=2", None, None, "/run/redis/redis.sock", 2, False),
        (" unix:///run/redis/redis.sock ", None, None, "/run/redis/redis.sock", 0, False),
    ],
)
def test_parse_redis_url_reads_what_the_url_says(
    url: str, host: str | None, port: int | None, path: str | None, db: int, tls: bool
) -> None:
    target = parse_redis_url(url)
    assert (target.host, target.port, target.path, target.db, target.tls) == (
        host, port, path, db, tls)
    assert target.url == url.strip()
