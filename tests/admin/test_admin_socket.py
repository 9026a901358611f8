"""``mqpolicy queue``, ``counters`` and ``explain`` against a running ``mqpolicy serve``
on the memory:// store, through its admin socket: real serve processes, the commands run
as an operator runs them. The same tests run on a Redis store (where the commands read
Redis themselves) and must print the same.

Expected budgets follow the README ("How counting works"): ``burst`` is a bucket's size,
``rate`` refills it continuously (one unit every period/count), a message costs one unit
of a ``messages`` budget at END-OF-MESSAGE; ``counters show`` lists what is left and when
the bucket is full again, ``explain`` the budget left (after the decision, when it spends).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqpolicy.admin.codec import encode_request
from mqpolicy.lab.mail_stack import MailStack
from mqpolicy.lab.readiness import poll
from tests.support.mqpolicy_command import mq
from tests.support.postfix_fixture import held, lanes, restart_serve
from tests.support.redis_fixture import RedisServer
from tests.support.serve_process import MqpolicyProcess, ServeProcess, free_port

RATE, BURST = "6/1h", 3  # one unit back every 600 s
UNIT_S = 600
HEADER = f"{'limit':<24} {'key':<40} {'remaining':>10} {'burst':>8}  full in"


def policy_text(port: int, store: str, admin: Path | None, mode: str = "0640") -> str:
    text = f"""\
listen: [127.0.0.1:{port}]
store: {{url: "{store}", key_prefix: "adm{port}:"}}
log: {{format: kv, level: info}}
limits:
  - {{name: per-sender, rate: {RATE}, burst: {BURST}, key: sender, count: messages}}
  - {{name: per-domain, rate: 100/1m, key: recipient_domain, count: recipients}}
"""
    if admin is not None:
        text += f'admin: {{listen: "unix:{admin}", mode: "{mode}"}}\n'
    return text


def eom(i: int, sender: str) -> dict[str, str]:
    return {"request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
            "sender": sender, "queue_id": f"Q{i}", "recipient_count": "1",
            "client_address": "192.0.2.9"}


def request_text(attrs: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in attrs.items() if k != "request")


class Served:
    """A running serve, its policy file, and its admin socket."""

    def __init__(self, process: ServeProcess, admin: Path) -> None:
        self.process = process
        self.config = process.config
        self.admin = admin
        self._next_qid = 0

    def spend(self, sender: str) -> str:
        """One message of ``sender`` at END-OF-MESSAGE: the server's answer."""
        self._next_qid += 1
        return self.process.ask(eom(self._next_qid, sender))

    def mq(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        command, *rest = args
        return mq(command, "-c", str(self.config), *rest, stdin=stdin)


@contextlib.contextmanager
def serving(tmp_path: Path, sock_dir: Path, store: str, name: str = "p",
            key_prefix: str | None = None) -> Iterator[Served]:
    """``mqpolicy serve`` with an admin socket, stopped by its PID afterwards."""
    port = free_port()
    admin = sock_dir / f"{name}.sock"
    config = tmp_path / f"{name}.yaml"
    text = policy_text(port, store, admin)
    config.write_text(text if key_prefix is None else text.replace(f"adm{port}:", key_prefix))
    process = ServeProcess(config, port, tmp_path / f"{name}.log")
    process.start(str(admin))
    try:
        yield Served(process, admin)
    finally:
        process.stop()


def store_url(name: str, request: pytest.FixtureRequest) -> str:
    if name == "memory":
        return "memory://"
    server: RedisServer = request.getfixturevalue("redis_clean")
    return server.tcp_url


@pytest.fixture(params=["memory", "redis"])
def served(request: pytest.FixtureRequest, tmp_path: Path,
           sock_dir: Path) -> Iterator[Served]:
    """serve with an admin socket, on the memory store (the commands ask it) or on Redis
    (the commands read Redis)."""
    with serving(tmp_path, sock_dir, store_url(request.param, request)) as served:
        yield served


def rows(out: str) -> dict[str, list[str]]:
    """``counters show`` rows by key (the header checked)."""
    lines = out.splitlines()
    assert lines[0] == HEADER, out
    return {line.split()[1]: line.split() for line in lines[1:]}


def full_in(row: list[str]) -> int:
    assert row[4].endswith("s"), row
    return int(row[4][:-1])


@pytest.mark.e2e
def test_counters_show_what_the_server_spent(served: Served) -> None:
    assert [served.spend("a@example.com") for _ in range(2)] == ["DUNNO", "DUNNO"]
    assert served.spend("b@example.com") == "DUNNO"
    shown = served.mq("counters", "show", "per-sender")
    assert shown.returncode == 0, shown.stderr
    by_key = rows(shown.stdout)
    assert set(by_key) == {"a@example.com", "b@example.com"}
    assert by_key["a@example.com"][:4] == ["per-sender", "a@example.com", str(BURST - 2),
                                           str(BURST)]
    assert by_key["b@example.com"][:4] == ["per-sender", "b@example.com", str(BURST - 1),
                                           str(BURST)]
    # full again once what was spent has come back; time has passed since (bounded)
    assert 2 * UNIT_S - 60 <= full_in(by_key["a@example.com"]) <= 2 * UNIT_S
    assert UNIT_S - 60 <= full_in(by_key["b@example.com"]) <= UNIT_S
    one = served.mq("counters", "show", "per-sender", "A@Example.com")  # keys are lowercased
    assert rows(one.stdout)["a@example.com"][2] == str(BURST - 2)
    unused = served.mq("counters", "show", "per-sender", "c@example.com")
    assert unused.stdout.splitlines()[1].split() == ["per-sender", "c@example.com", str(BURST),
                                                     str(BURST), "(unused)"]
    every = rows(served.mq("counters", "show").stdout)  # every limit (per-domain: unused)
    assert set(every) == {"a@example.com", "b@example.com"}
    unknown = served.mq("counters", "show", "per-nothing")
    assert unknown.returncode == 2
    assert "no limit named 'per-nothing'" in unknown.stderr


@pytest.mark.e2e
def test_counters_reset_gives_a_key_its_budget_back(served: Served) -> None:
    assert [served.spend("a@example.com") for _ in range(BURST)] == ["DUNNO"] * BURST
    assert served.spend("a@example.com").startswith("450 4.7.1 ")  # spent
    reset = served.mq("counters", "reset", "per-sender", "a@example.com")
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout == "reset 1 budget(s) of per-sender\n"
    assert served.spend("a@example.com") == "DUNNO"
    assert served.spend("b@example.com") == "DUNNO"
    every = served.mq("counters", "reset", "per-sender", "--all")
    assert every.stdout == "reset 2 budget(s) of per-sender\n"
    assert served.mq("counters", "show", "per-sender").stdout == HEADER + "\n"
    bare = served.mq("counters", "reset", "per-sender")
    assert bare.returncode == 2 and "give a KEY or --all" in bare.stderr


@pytest.mark.e2e
def test_explain_reports_the_servers_budget_and_consume_spends_there(served: Served) -> None:
    assert served.spend("a@example.com") == "DUNNO"
    asked = request_text(eom(100, "a@example.com"))
    explained = served.mq("explain", stdin=asked)
    assert explained.returncode == 0, explained.stderr
    assert explained.stderr == ""
    line = next(ln for ln in explained.stdout.splitlines() if ln.strip().startswith("per-sender"))
    assert f"remaining={BURST - 1} -> ok" in line  # what the server has left, not spent
    assert "budgets: not spent (use --consume)" in explained.stdout
    consumed = json.loads(served.mq("explain", "--consume", "--json", stdin=asked).stdout)
    assert consumed["consumed"] is True
    (limit,) = [x for x in consumed["limits"] if x["name"] == "per-sender"]
    assert (limit["spent"], limit["remaining"]) == (True, BURST - 2)
    # the server's own budget was spent: one message left, then deferred
    assert served.spend("a@example.com") == "DUNNO"
    assert served.spend("a@example.com").startswith("450 4.7.1 ")
    again = served.mq("explain", stdin=request_text(eom(101, "a@example.com")))
    assert "-> defer retry=" in again.stdout


@pytest.mark.e2e
def test_commands_print_the_same_as_with_redis(tmp_path: Path, sock_dir: Path,
                                               request: pytest.FixtureRequest) -> None:
    """The same spending on each store: the same lines, but for the seconds left."""
    printed: dict[str, list[str]] = {}
    for name in ("memory", "redis"):
        store = store_url(name, request)
        with serving(tmp_path, sock_dir, store, name, "same:") as served:
            for sender in ("a@example.com", "a@example.com", "b@example.com"):
                assert served.spend(sender) == "DUNNO"
            asked = request_text(eom(7, "a@example.com"))
            outputs = [served.mq("counters", "show").stdout,
                       served.mq("explain", stdin=asked).stdout,
                       served.mq("explain", "--json", stdin=asked).stdout.replace(
                           store, "STORE"),
                       served.mq("counters", "reset", "per-sender", "--all").stdout]
            printed[name] = [" ".join(ln.split()[:4]) if ln.startswith("per-sender ")
                             else ln.replace(store, "STORE")
                             for out in outputs for ln in out.splitlines()]
    assert printed["memory"] == printed["redis"]


# ---------------------------------------------------------------- the admin socket itself


@pytest.fixture
def memory_served(tmp_path: Path, sock_dir: Path) -> Iterator[Served]:
    with serving(tmp_path, sock_dir, "memory://") as served:
        yield served


@pytest.mark.e2e
def test_the_socket_has_the_configured_mode_and_goes_with_the_server(
        memory_served: Served) -> None:
    mode = memory_served.admin.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o640
    assert memory_served.process.stop() == 0
    assert not memory_served.admin.exists()


@pytest.mark.e2e
def test_malformed_admin_requests_get_error_answers_and_everything_goes_on(
        memory_served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(memory_served.admin))
        reader = sock.makefile("rb")

        def answer(data: bytes) -> dict[str, object]:
            sock.sendall(data)
            return dict(json.loads(reader.readline()))

        assert answer(b"this is not json\n")["error"] == "malformed"
        assert answer(b'{"op": "shutdown", "id": 1}\n') == {
            "id": 1, "ok": False, "error": "unknown_operation",
            "message": "no operation 'shutdown' (operations: counters.reset, counters.show, "
                       "destinations, destinations.reset, explain, pause, pauses, queue, "
                       "resume)"}
        assert answer(b'{"op": "counters.show", "args": {"x": 1' + b" " * 70_000 + b"}}\n"
                      )["error"] == "too_large"
        assert answer(encode_request("counters.show", {"limit": "nope"}))["error"] == \
            "bad_arguments"
        assert answer(encode_request("counters.show", {"max": "many"}))["message"] == \
            "max: expected int, got str"
        assert answer(encode_request("counters.reset", {"limit": "per-sender"}))[
            "message"] == "give key (one key's budget) or all: true (every key's)"
        assert answer(encode_request("explain", {"request": "no equals sign"}))[
            "message"] == "malformed request: attribute line without '=': 'no equals sign'"
        # the same connection still answers, and so does the server
        assert memory_served.spend("a@example.com") == "DUNNO"
        shown = answer(encode_request("counters.show", {"limit": "per-sender"}, "last"))
        assert shown["ok"] is True and shown["id"] == "last"
        assert shown["result"] == {"rows": [
            {"limit": "per-sender", "key": "a@example.com", "remaining": BURST - 1,
             "burst": BURST, "full_in_s": dict(shown["result"])["rows"][0]["full_in_s"]}]}
    # each request logged with the peer's uid (its log is written every 50 ms)
    memory_served.process.wait_logged(f"msg=\"admin request\" op=shutdown uid={os.getuid()} ")
    memory_served.process.wait_logged(f"msg=\"admin request\" op=counters.show "
                                      f"uid={os.getuid()} ", count=3)


@pytest.mark.e2e
def test_admin_is_a_restart_setting_on_reload(memory_served: Served, sock_dir: Path) -> None:
    moved = sock_dir / "moved.sock"
    config = memory_served.config
    config.write_text(config.read_text().replace(str(memory_served.admin), str(moved)))
    memory_served.process.signal(signal.SIGHUP)
    memory_served.process.wait_logged("policy reloaded")
    assert "changed setting needs a restart to take effect\" setting=admin" in \
        memory_served.process.log_text()
    assert memory_served.admin.exists() and not moved.exists()
    # the commands read the file: they look for the new socket, which is not there yet
    gone = memory_served.mq("counters", "show")
    assert gone.returncode == 1
    assert f"admin socket unix:{moved} cannot be reached (No such file or directory)" in \
        gone.stderr


@pytest.mark.e2e
def test_only_serve_opens_the_admin_socket(tmp_path: Path, sock_dir: Path) -> None:
    """``mqpolicy milter`` reading the same file (contrib/systemd runs both units with
    /etc/mqpolicy/mqpolicy.yaml) leaves the admin socket to serve."""
    admin, milter_socket = sock_dir / "admin.sock", sock_dir / "milter.sock"
    config = tmp_path / "p.yaml"
    config.write_text(policy_text(free_port(), "memory://", admin)
                      + f"milter: {{listen: \"unix:{milter_socket}\"}}\n")
    milter = MqpolicyProcess("milter", config, tmp_path / "milter.log")
    try:
        milter.start(str(milter_socket))
        milter.wait_logged("msg=ready")  # what it listens on is open by then
        assert not admin.exists()
        assert "logger=mqpolicy.admin" not in milter.log_text()
    finally:
        milter.stop()


# ---------------------------------------------------------------- when it cannot be asked


def test_without_an_admin_socket_the_commands_say_what_to_do(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text(policy_text(free_port(), "memory://", None))
    hint = (f"the memory:// store lives inside the running `mqpolicy serve`; set "
            f"admin.listen in {config}")
    for args in (("counters", "show"), ("counters", "reset", "per-sender", "--all"),
                 ("queue",)):
        result = mq(args[0], "-c", str(config), *args[1:])
        assert result.returncode == 2, args
        assert result.stdout == ""
        assert result.stderr.startswith(f"mqpolicy {args[0]}: {hint}"), result.stderr
        assert "or use a redis:// store" in result.stderr
    explained = mq("explain", "-c", str(config), stdin=request_text(eom(1, "a@example.com")))
    assert explained.returncode == 0
    assert hint in explained.stderr
    assert ("explained on a fresh private memory:// store: the budgets shown are full "
            "budgets, not the running server's") in explained.stderr
    assert "note:    explained on a fresh private memory:// store" in explained.stdout
    assert f"remaining={BURST} -> ok" in explained.stdout  # a full budget, said as such


def test_a_socket_that_is_missing_or_refuses_is_said_plainly(tmp_path: Path,
                                                             sock_dir: Path) -> None:
    admin = sock_dir / "admin.sock"
    config = tmp_path / "p.yaml"
    config.write_text(policy_text(free_port(), "memory://", admin))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for why in ("No such file or directory", "Connection refused"):
        if why == "Connection refused":  # a socket file nobody listens on (a dead server's)
            stale.bind(str(admin))
        for args in (("counters", "show"), ("queue",)):
            result = mq(args[0], "-c", str(config), *args[1:])
            assert result.returncode == 1, (why, args)
            assert (f"the memory:// store lives inside the running `mqpolicy serve`, and its "
                    f"admin socket unix:{admin} cannot be reached ({why}): is `mqpolicy "
                    f"serve -c {config}` running") in result.stderr, result.stderr
        explained = mq("explain", "-c", str(config), stdin=request_text(eom(1, "a@x.test")))
        assert explained.returncode == 0
        assert "the budgets shown are full budgets, not the running server's" in \
            explained.stderr
    stale.close()


# ---------------------------------------------------------------- queue, with a real Postfix


@pytest.mark.e2e
def test_queue_lists_the_hold_records_the_server_wrote(stack: MailStack) -> None:
    admin = stack.root / "admin.sock"
    # every normal-lane message is held; the lane may release one a day: the first goes,
    # the second stays held, with the record the policy server wrote for it
    restart_serve(stack, lanes(("normal",), {"normal": "1/1d"}) + f"""\
store: {{url: "memory://", timeout_ms: 200}}
log: {{format: kv, level: info}}
admin: {{listen: "unix:{admin}", mode: "0600"}}
scheduler:
  interval: 1s
  postfix_config_dir: {stack.postfix.config_dir}
""")
    for i in range(2):
        assert stack.send("a@n.admin.test", ["r@dest.admin.test"], f"held-{i}").queued
    stack.sink.wait_for(lambda m: len(m) >= 1, 30)
    poll(lambda: len(held(stack)) == 1, 30, "one message left on hold")
    (still,) = held(stack)

    shown = mq("queue", "-c", str(stack.policy_file))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == ("held by mqpolicy: 1   held by others (left alone): 0   "
                        "unreadable records: 0")
    (lane,) = [ln.split() for ln in lines if ln.startswith("normal ")
               and "dest.admin.test" not in ln]
    assert lane[:5] == ["normal", "1", "1", "0", "0"]  # held, due (its budget spent)
    (dest,) = [ln.split() for ln in lines if "dest.admin.test" in ln]
    assert dest[:4] == ["normal", "dest.admin.test", "1", "1"]
    data = json.loads(mq("queue", "-c", str(stack.policy_file), "--json").stdout)
    assert [(g["lane"], g["held"]) for g in data["lanes"]] == [("normal", 1)]
    assert data["queues"].get("hold") == 1
    poll(lambda: "msg=\"admin request\" op=queue" in stack.server.log_file.read_text(), 10,
         f"the queue requests in the server's log (held: {still.queue_id})")
