"""Private Redis Cluster and Sentinel set-ups for tests, on loopback, never the machine's Redis.

``redis_cluster`` (session): three redis-server processes in cluster mode, joined with
``redis-cli --cluster create`` (three masters, no replicas), ready once every node reports
``cluster_state:ok`` and knows the two others. ``RedisClusterHarness.flushall()`` empties it.

``redis_sentinel`` (function): one master, one replica and three sentinels (quorum 2,
``down-after-milliseconds`` 1000) monitoring service ``mqtest``; ready once the replica's
link is up and every sentinel sees the replica and the two other sentinels. Tests may
kill the master (:meth:`RedisSentinelHarness.kill_master`) and wait for the promotion.
``sentinel_setup`` (function): the same with the replicas and server options a test asks
for (``sentinel_setup(replicas=2, data_options=("--min-replicas-to-write", "1"))``), for
planned switchovers (:meth:`RedisSentinelHarness.switchover`, ``SENTINEL FAILOVER``).

Every process is started through ``setpriv --pdeathsig`` where available, polled for
readiness (never a fixed sleep) and stopped by its PID, even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from mqpolicy.lab.processes import stop_process
from mqpolicy.lab.readiness import READY_TIMEOUT_S, free_port
from tests.support.redis_fixture import REDIS_SERVER_BIN, _launcher, running_in_tmpdir

REDIS_CLI_BIN = os.environ.get("MQPOLICY_TEST_REDIS_CLI", "/usr/bin/redis-cli")
SERVICE = "mqtest"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
_POLL_S = 0.01
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float) -> T:
    """Poll ``probe`` until it returns something other than None/False; fail after
    ``timeout_s`` saying ``what`` was awaited."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
        except (redis.RedisError, OSError) as exc:
            value, last_error = None, exc
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} (last error: {last_error!r})")
        time.sleep(_POLL_S)  # between polls


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """One redis-server process we own (a data node or a sentinel), TCP on loopback."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def start(self, args: Callable[[int], list[str]], attempts: int = 5) -> None:
        """Start with ``args(port)`` on a free port (another one if it was taken meanwhile)
        and wait until it answers PING."""
        for _ in range(attempts):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [*_launcher(), *args(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + READY_TIMEOUT_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _answers_ping(self.port):
                    return
                time.sleep(0.002)  # between connect polls
            self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        raise RuntimeError(f"{self.name} did not start:\n{tail}")

    def kill(self) -> None:
        """SIGKILL (a crash), then reap."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)

    def stop(self) -> None:
        """SIGTERM by PID and wait (SIGKILL after 5 s); idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, 5)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def info(self, section: str) -> dict[str, str]:
        with self.client() as client:
            return {str(k): str(v) for k, v in client.info(section).items()}


def _data_args(workdir: Path, *extra: str) -> Callable[[int], list[str]]:
    def args(port: int) -> list[str]:
        return [
            REDIS_SERVER_BIN,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--logfile", str(workdir / "redis.log"),
            "--daemonize", "no",
            *extra,
        ]  # fmt: skip

    return args


def require_binaries(*paths: str) -> None:
    for path in paths:
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} not available")


# ------------------------------------------------------------------ cluster


class RedisClusterHarness:
    """Three masters, slots spread by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, size: int = 3, extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.nodes = [RedisProcess(workdir, f"node{i}") for i in range(size)]
        self.extra = extra

    @property
    def url(self) -> str:
        """Two of the nodes as startup nodes: the client discovers the third."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def start(self) -> None:
        for node in self.nodes:
            node.start(self._node_args(node))
        create = subprocess.run(
            [
                REDIS_CLI_BIN, "--cluster", "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}")
        for node in self.nodes:
            wait_for(f"{node.name} cluster_state:ok", lambda n=node: self._ready(n),
                     READY_TIMEOUT_S)

    def _node_args(self, node: RedisProcess) -> Callable[[int], list[str]]:
        def args(port: int) -> list[str]:
            return _data_args(
                node.workdir,
                "--cluster-enabled", "yes",
                "--cluster-port", str(free_port()),  # the cluster bus
                "--cluster-config-file", str(node.workdir / "nodes.conf"),
                "--cluster-node-timeout", "2000",
                *self.extra,
            )(port)  # fmt: skip

        return args

    def _ready(self, node: RedisProcess) -> bool:
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            nodes = client.execute_command("CLUSTER", "NODES")
            listing = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
        return (
            "cluster_state:ok" in text
            and f"cluster_known_nodes:{len(self.nodes)}" in text
            and listing.count("connected") == len(self.nodes)
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def flushall(self) -> None:
        for node in self.nodes:
            with node.client() as client:
                client.flushall()

    def node_of_key(self, key: str) -> RedisProcess:
        """The node that serves ``key``'s slot."""
        with self.nodes[0].client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            shards = client.execute_command("CLUSTER", "SLOTS")
        for start, end, primary, *_ in shards:
            if start <= slot <= end:
                port = int(primary[1])
                return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no node serves slot {slot}")

    def get(self, key: str) -> bytes | None:
        with self.node_of_key(key).client() as client:
            value: bytes | None = client.get(key)
            return value

    def all_keys(self) -> list[str]:
        found: list[str] = []
        for node in self.nodes:
            with node.client() as client:
                found.extend(k.decode() for k in client.keys("*"))
        return sorted(found)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterHarness]:
    require_binaries(REDIS_SERVER_BIN, REDIS_CLI_BIN)
    with running_in_tmpdir("mqcluster-", RedisClusterHarness) as harness:
        yield harness


@pytest.fixture
def redis_cluster_partial() -> Iterator[RedisClusterHarness]:
    """A cluster of the test's own whose nodes keep serving the slots of live masters when
    one dies (``cluster-require-full-coverage no``): free to kill a node."""
    require_binaries(REDIS_SERVER_BIN, REDIS_CLI_BIN)
    with running_in_tmpdir("mqcluster-", lambda w: RedisClusterHarness(w, extra=("--cluster-require-full-coverage", "no"))) as harness:
        yield harness


# ------------------------------------------------------------------ sentinel


class RedisSentinelHarness:
    """A master, ``replicas`` replicas and three sentinels (quorum 2) watching service
    ``mqtest``; ``data_options`` are given to the master and the replicas alike."""

    def __init__(
        self, workdir: Path, sentinels: int = 3, quorum: int = 2, replicas: int = 1,
        data_options: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.master = RedisProcess(workdir, "master")
        self.replicas = [RedisProcess(workdir, "replica" + (str(i) if i else ""))
                         for i in range(replicas)]
        self.sentinels = [RedisProcess(workdir, f"sentinel{i}") for i in range(sentinels)]
        self.quorum = quorum
        self.data_options = data_options

    @property
    def replica(self) -> RedisProcess:
        """The first replica."""
        return self.replicas[0]

    @property
    def data_nodes(self) -> list[RedisProcess]:
        """The master the harness started with, then its replicas."""
        return [self.master, *self.replicas]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(
            f"127.0.0.1:{s.port}" for s in self.sentinels
        ) + f"/{SERVICE}/0"

    def start(self) -> None:
        # full sync at once, not after 5 s
        options = ("--repl-diskless-sync-delay", "0", *self.data_options)
        self.master.start(_data_args(self.master.workdir, *options))
        for replica in self.replicas:
            replica.start(
                _data_args(
                    replica.workdir, *options, "--replicaof", "127.0.0.1", str(self.master.port)
                )
            )
        for replica in self.replicas:
            wait_for(
                f"{replica.name}'s link to the master",
                lambda r=replica: r.info("replication").get("master_link_status") == "up",
                READY_TIMEOUT_S,
            )
        for sentinel in self.sentinels:
            sentinel.start(self._sentinel_args(sentinel))
        for sentinel in self.sentinels:
            wait_for(
                f"{sentinel.name} to see the replica and the other sentinels",
                lambda s=sentinel: self._sentinel_ready(s),
                READY_TIMEOUT_S,
            )

    def _sentinel_args(self, sentinel: RedisProcess) -> Callable[[int], list[str]]:
        def args(port: int) -> list[str]:
            config = sentinel.workdir / "sentinel.conf"
            config.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {sentinel.workdir}\n"
                f"logfile {sentinel.log_path}\n"
                "sentinel resolve-hostnames no\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            return [REDIS_SERVER_BIN, str(config), "--sentinel"]

        return args

    def _sentinel_ready(self, sentinel: RedisProcess) -> bool:
        with sentinel.client() as client:
            state = client.sentinel_master(SERVICE)
        return (
            int(state["num-slaves"]) >= len(self.replicas)
            and int(state["num-other-sentinels"]) == len(self.sentinels) - 1
        )

    def master_port(self) -> int:
        """The master's port as the first live sentinel says."""
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError, OSError), sentinel.client() as client:
                _host, port = client.sentinel_get_master_addr_by_name(SERVICE)
                return int(port)
        raise LookupError("no sentinel answered")

    def kill_master(self) -> None:
        """SIGKILL the master's process (a crash: no shutdown, no final sync)."""
        self.master.kill()

    def wait_for_promotion(self, timeout_s: float = READY_TIMEOUT_S) -> int:
        """Wait until every sentinel names the replica as master and it has the master
        role; the new master's port."""
        new_port = self.replica.port

        def promoted() -> bool:
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    _host, port = client.sentinel_get_master_addr_by_name(SERVICE)
                if int(port) != new_port:
                    return False
            return self.replica.info("replication").get("role") == "master"

        wait_for("the replica's promotion", promoted, timeout_s)
        return new_port

    def node_at(self, port: int) -> RedisProcess:
        """The data node listening on ``port``."""
        return next(n for n in self.data_nodes if n.port == port)

    def switchover(self) -> RedisProcess:
        """A planned switchover: ``SENTINEL FAILOVER`` on the first sentinel, the master
        staying up. The master before it."""
        old = self.node_at(self.master_port())
        with self.sentinels[0].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE)
        return old

    def wait_for_new_master(self, old: RedisProcess, timeout_s: float = READY_TIMEOUT_S) -> RedisProcess:
        """Wait until every running sentinel names one data node other than ``old`` as
        master and that node has the master role; that node."""

        def switched() -> RedisProcess | None:
            named = set()
            for sentinel in self.sentinels:
                if sentinel.proc is None:  # stopped by the test
                    continue
                with sentinel.client() as client:
                    named.add(int(client.sentinel_get_master_addr_by_name(SERVICE)[1]))
            if len(named) != 1 or old.port in named:
                return None
            node = self.node_at(named.pop())
            return node if node.info("replication").get("role") == "master" else None

        return wait_for("the sentinels to name a new master", switched, timeout_s)

    def wait_demoted(self, old: RedisProcess, new: RedisProcess, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until Sentinel has turned ``old`` (a master that stayed up through a
        switchover) into a replica of ``new`` and it has resynced."""

        def demoted() -> bool:
            info = old.info("replication")
            return (info.get("role") == "slave" and info.get("master_port") == str(new.port)
                    and info.get("master_link_status") == "up")

        wait_for(f"{old.name} to follow {new.name}", demoted, timeout_s)

    def wait_replicated(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until the replica has everything the master wrote so far."""
        with self.master.client() as client:
            target = int(client.info("replication")["master_repl_offset"])
        wait_for(
            "the replica to catch up",
            lambda: int(self.replica.info("replication").get("slave_repl_offset", "-1"))
            >= target,
            timeout_s,
        )

    def stop(self) -> None:
        for process in (*self.sentinels, *reversed(self.data_nodes)):
            process.stop()


@pytest.fixture
def redis_sentinel() -> Iterator[RedisSentinelHarness]:
    require_binaries(REDIS_SERVER_BIN)
    with running_in_tmpdir("mqsentinel-", RedisSentinelHarness) as harness:
        yield harness


@pytest.fixture
def sentinel_setup() -> Iterator[Callable[..., RedisSentinelHarness]]:
    """``sentinel_setup(replicas=..., data_options=...)``: a Sentinel set-up of the test's
    own, started; every one made is stopped at the end of the test."""
    require_binaries(REDIS_SERVER_BIN)
    with contextlib.ExitStack() as stack:

        def make(replicas: int = 1, data_options: tuple[str, ...] = ()) -> RedisSentinelHarness:
            return stack.enter_context(running_in_tmpdir(
                "mqsentinel-",
                lambda w: RedisSentinelHarness(w, replicas=replicas, data_options=data_options),
            ))

        yield make
