"""``mqpolicy pause`` and ``mqpolicy resume`` against a running ``mqpolicy serve``: on the
memory:// store through its admin socket, on Redis through the store (every process sees
it within a second; a restart keeps it). Real processes, the commands run as an operator
runs them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqpolicy.lab.readiness import poll
from mqpolicy.policy.backoff import BackoffSettings, on_slow_down
from mqpolicy.store.backoff_states import RedisBackoffStore
from tests.support.mqpolicy_command import mq
from tests.support.redis_fixture import RedisServer
from tests.support.serve_process import ServeProcess, free_port


def policy_text(port: int, store: str, admin: Path) -> str:
    return f"""\
listen: [127.0.0.1:{port}]
store: {{url: "{store}", key_prefix: "pausetest:"}}
log: {{format: kv, level: info}}
admin: {{listen: "unix:{admin}"}}
lanes:
  - {{name: transactional, transport: mq-transactional}}
  - {{name: normal}}
default_lane: normal
classify:
  - {{name: resets, when: {{sender: "@app.example"}}, lane: transactional}}
destinations:
  - {{name: yahoo, domains: [yahoo.test], rate: 100/1m}}
"""


class Served:
    def __init__(self, process: ServeProcess) -> None:
        self.process = process
        self.n = 0

    def mq(self, *args: str) -> subprocess.CompletedProcess[str]:
        command, *rest = args
        return mq(command, "-c", str(self.process.config), *rest)

    def message(self, sender: str, recipient: str) -> list[str]:
        """RCPT and END-OF-MESSAGE of one message: the server's answers."""
        self.n += 1
        base = {"request": "smtpd_access_policy", "sender": sender,
                "instance": f"in{self.n}", "client_address": "192.0.2.9",
                "recipient_count": "1"}
        return [self.process.ask({**base, "protocol_state": "RCPT", "recipient": recipient}),
                self.process.ask({**base, "protocol_state": "END-OF-MESSAGE",
                                  "queue_id": f"QP{self.n:04d}"})]

    def wait_answer(self, sender: str, recipient: str, end: str) -> list[str]:
        """The answers once the END-OF-MESSAGE one starts with ``end`` (a pause written to
        Redis reaches the server within its next runtime read, about a second)."""
        seen: list[list[str]] = []

        def answered() -> bool:
            seen.append(self.message(sender, recipient))
            return seen[-1][1].startswith(end)

        poll(answered, 30, f"an END-OF-MESSAGE answer starting with {end!r}",
             interval_s=0.2)
        return seen[-1]


@contextlib.contextmanager
def serving(tmp_path: Path, sock_dir: Path, store: str) -> Iterator[Served]:
    port = free_port()
    admin = sock_dir / "pause.sock"
    config = tmp_path / "p.yaml"
    config.write_text(policy_text(port, store, admin))
    process = ServeProcess(config, port, tmp_path / "serve.log")
    process.start(str(admin))
    try:
        yield Served(process)
    finally:
        process.stop()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    server: RedisServer = request.getfixturevalue("redis_clean")
    return server.tcp_url


@pytest.mark.e2e
def test_pause_holds_a_destination_resume_lets_it_flow(store: str, tmp_path: Path,
                                                       sock_dir: Path) -> None:
    with serving(tmp_path, sock_dir, store) as served:
        assert served.message("a@shop.example", "u@yahoo.test") == ["DUNNO", "DUNNO"]
        done = served.mq("pause", "destination", "yahoo", "--for", "2h", "--reason",
                         "Yahoo TSS04")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("paused destination yahoo until ")
        assert ": Yahoo TSS04" in done.stdout
        assert served.wait_answer("a@shop.example", "u@yahoo.test", "HOLD") == [
            "DUNNO", "HOLD held by mqpolicy: destination yahoo (Yahoo TSS04) paused"]
        assert served.message("a@shop.example", "u@other.test") == ["DUNNO", "DUNNO"]
        done = served.mq("resume", "destination", "yahoo")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("resumed destination yahoo (paused by operator: "
                                      "Yahoo TSS04)")
        assert served.wait_answer("a@shop.example", "u@yahoo.test", "DUNNO") == [
            "DUNNO", "DUNNO"]
        done = served.mq("resume", "destination", "yahoo")
        assert (done.returncode, done.stdout) == (0, "destination yahoo was not paused\n")


@pytest.mark.e2e
def test_pause_a_lane_and_refuse_what_cannot_be_paused(store: str, tmp_path: Path,
                                                        sock_dir: Path) -> None:
    with serving(tmp_path, sock_dir, store) as served:
        done = served.mq("pause", "lane", "transactional")
        assert done.returncode == 0, done.stderr
        assert "until resumed" in done.stdout
        assert served.wait_answer("reset@app.example", "u@other.test", "HOLD") == [
            "FILTER mq-transactional:", "HOLD held by mqpolicy: lane transactional paused"]
        assert served.message("a@shop.example", "u@other.test") == ["DUNNO", "DUNNO"]
        for args, problem in [(("lane", "fast"), "no lane named 'fast'"),
                              (("destination", "gmail"), "no destination named 'gmail'")]:
            done = served.mq("pause", *args)
            assert done.returncode == 2
            assert problem in done.stderr
        done = served.mq("pause", "destination", "yahoo", "--for", "soon")
        assert done.returncode == 2 and "--for" in done.stderr


@pytest.mark.e2e
def test_a_pause_in_redis_outlives_a_restart_of_serve(redis_clean: RedisServer,
                                                      tmp_path: Path, sock_dir: Path) -> None:
    with serving(tmp_path, sock_dir, redis_clean.tcp_url) as served:
        assert served.mq("pause", "destination", "yahoo").returncode == 0
        served.wait_answer("a@shop.example", "u@yahoo.test", "HOLD")
    with serving(tmp_path, sock_dir, redis_clean.tcp_url) as served:
        # the first answers come from the state read at start: still paused
        assert served.message("a@shop.example", "u@yahoo.test")[1].startswith("HOLD ")


@pytest.mark.e2e
def test_destinations_lists_pause_backoff_and_held_mail_reset_ends_a_backoff(
        redis_clean: RedisServer, tmp_path: Path, sock_dir: Path) -> None:
    with serving(tmp_path, sock_dir, redis_clean.tcp_url) as served:
        async def back_off() -> None:
            store = RedisBackoffStore(redis_clean.tcp_url, key_prefix="pausetest:")
            await store.update("yahoo", lambda s: on_slow_down(
                s, BackoffSettings(decrease=0.25), now_ms=1000, reason="yahoo-deferred",
                destination="yahoo", evidence="... said: 421 4.7.0 [TSS04] ..."))
            await store.close()

        asyncio.run(back_off())
        assert served.mq("pause", "destination", "yahoo", "--for", "1h").returncode == 0
        held = served.wait_answer("a@shop.example", "u@yahoo.test", "HOLD")
        done = served.mq("destinations", "--json")
        assert done.returncode == 0, done.stderr
        (yahoo,) = json.loads(done.stdout)["destinations"]
        assert (yahoo["name"], yahoo["domains"], yahoo["rate"], yahoo["burst"]) == (
            "yahoo", ["yahoo.test"], "100/1m", 100)
        assert (yahoo["factor"], yahoo["effective_burst"]) == (0.25, 25)
        assert (yahoo["paused"], yahoo["paused_by"], yahoo["held"]) == (True, "operator", 1)
        assert yahoo["evidence"] == "... said: 421 4.7.0 [TSS04] ..."
        assert held[1].startswith("HOLD ")
        text = served.mq("destinations").stdout
        assert "yahoo: yahoo.test\n  budget 100/1m, burst 100; backed off to 0.25 (burst 25)" \
               ": yahoo-deferred\n  PAUSED until " in text
        done = served.mq("destinations", "reset", "yahoo")
        assert (done.returncode, done.stdout) == (
            0, "destination yahoo: backoff ended (factor 0.25 -> 1)\n")
        (yahoo,) = json.loads(served.mq("destinations", "--json").stdout)["destinations"]
        assert (yahoo["factor"], yahoo["effective_burst"], yahoo["paused"]) == (1.0, 100, True)
        done = served.mq("destinations", "reset", "google")
        assert done.returncode == 2 and "no destination named 'google'" in done.stderr


@pytest.mark.e2e
def test_destinations_asks_a_memory_serve(tmp_path: Path, sock_dir: Path) -> None:
    with serving(tmp_path, sock_dir, "memory://") as served:
        assert served.mq("pause", "destination", "yahoo", "--reason", "TSS04").returncode == 0
        assert served.message("a@shop.example", "u@yahoo.test")[1].startswith("HOLD ")
        (yahoo,) = json.loads(served.mq("destinations", "--json").stdout)["destinations"]
        assert (yahoo["paused"], yahoo["pause_reason"], yahoo["held"],
                yahoo["paused_until_ms"]) == (True, "TSS04", 1, None)
        assert "PAUSED until resumed by operator: TSS04\n  held 1, oldest " in served.mq(
            "destinations").stdout
        done = served.mq("destinations", "reset", "yahoo")
        assert (done.returncode, done.stdout) == (0, "destination yahoo was not backed off\n")
