"""The admin socket's server and client over a real unix socket, with handlers written
for the test (the operations of ``serve`` are tested through a real process in
tests/admin/test_admin_socket.py). Each test runs under ``asyncio.run`` with an overall bound;
nothing waits by sleeping."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from mqpolicy.admin.client import AdminFailed, AdminUnavailable, ask_server
from mqpolicy.admin.codec import BadArguments, encode_request
from mqpolicy.admin.server import AdminHandler, AdminServer
from mqpolicy.commands.explain import cmd_explain
from mqpolicy.policy.endpoints import Endpoint
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import Policy
from tests.support.bounded_run import run


async def echo(args: Mapping[str, Any]) -> object:
    return {"echo": dict(args)}


async def boom(args: Mapping[str, Any]) -> object:
    raise RuntimeError("boom")


async def picky(args: Mapping[str, Any]) -> object:
    raise BadArguments("x: expected int")


def never_done(started: asyncio.Event) -> AdminHandler:
    async def handler(args: Mapping[str, Any]) -> object:
        started.set()
        await asyncio.Event().wait()  # nobody sets it
        return None

    return handler


HANDLERS: dict[str, AdminHandler] = {"echo": echo, "boom": boom, "picky": picky}


async def serving(path: Path, scenario: Callable[[AdminServer], Awaitable[None]],
                  handlers: Mapping[str, AdminHandler] = HANDLERS, **kwargs: Any) -> None:
    server = AdminServer(Endpoint(path=str(path), mode=0o640), handlers, **kwargs)
    await server.start()
    try:
        await scenario(server)
    finally:
        server.close()
        await server.wait_closed()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> Client:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def answers(self, data: bytes, count: int) -> list[dict[str, Any]]:
        self.writer.write(data)
        return [json.loads(await self.reader.readline()) for _ in range(count)]

    def close(self) -> None:
        self.writer.close()


def test_requests_are_answered_in_order_and_failures_are_answers(
        sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = sock_dir / "admin.sock"

    async def scenario(server: AdminServer) -> None:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        client = await Client.connect(path)
        pipelined = (encode_request("echo", {"a": 1}, 1) + encode_request("boom", {}, 2)
                     + b"{not json\n" + encode_request("picky", {}, "p")
                     + encode_request("nope", {}, 5))
        split = encode_request("echo", {"b": "ü"}, 6)
        answers = await client.answers(pipelined + split[:7], 5)
        answers += await client.answers(split[7:], 1)
        assert answers == [
            {"id": 1, "ok": True, "result": {"echo": {"a": 1}}},
            {"id": 2, "ok": False, "error": "failed",
             "message": "internal error: RuntimeError: boom"},
            {"id": None, "ok": False, "error": "malformed",
             "message": answers[2]["message"]},
            {"id": "p", "ok": False, "error": "bad_arguments", "message": "x: expected int"},
            {"id": 5, "ok": False, "error": "unknown_operation",
             "message": "no operation 'nope' (operations: boom, echo, picky)"},
            {"id": 6, "ok": True, "result": {"echo": {"b": "ü"}}},
        ]
        assert answers[2]["message"].startswith("the request is not JSON")
        client.close()
        assert (server.requests, server.errors) == (6, 4)

    with caplog.at_level(logging.INFO, logger="mqpolicy.admin"):
        run(serving(path, scenario))
    assert not path.exists()  # removed on close
    logged = [r for r in caplog.records if r.getMessage() == "admin request"]
    fields = [r.fields for r in logged]  # type: ignore[attr-defined]
    assert [f["op"] for f in fields] == ["echo", "boom", "-", "picky", "nope", "echo"]
    assert [f["result"] for f in fields] == ["ok", "failed", "malformed", "bad_arguments",
                                             "unknown_operation", "ok"]
    assert {f["uid"] for f in fields} == {os.getuid()}  # SO_PEERCRED
    assert {f["pid"] for f in fields} == {os.getpid()}
    assert any(r.getMessage() == "admin operation failed" and r.exc_info for r in
               caplog.records)  # the internal error with its traceback


def test_an_operation_that_overruns_gets_an_error_and_the_connection_goes_on(
        sock_dir: Path) -> None:
    path = sock_dir / "admin.sock"
    started = asyncio.Event()

    async def scenario(server: AdminServer) -> None:
        client = await Client.connect(path)
        first = await client.answers(encode_request("stuck", {}, 1), 1)
        assert started.is_set()
        assert first == [{"id": 1, "ok": False, "error": "failed",
                          "message": "no result within 0.2s"}]
        assert (await client.answers(encode_request("echo", {}, 2), 1))[0]["ok"] is True
        # a TimeoutError of the operation's own is no overrun of the deadline
        assert (await client.answers(encode_request("inner", {}, 3), 1))[0]["message"] == \
            "internal error: TimeoutError: the store was slow"
        client.close()

    async def inner(args: Mapping[str, Any]) -> object:
        raise TimeoutError("the store was slow")

    run(serving(path, scenario, {**HANDLERS, "stuck": never_done(started), "inner": inner},
                request_timeout_s=0.2))


def test_connections_past_the_maximum_are_closed_the_others_served(sock_dir: Path) -> None:
    path = sock_dir / "admin.sock"

    async def scenario(server: AdminServer) -> None:
        first = await Client.connect(path)
        assert (await first.answers(encode_request("echo"), 1))[0]["ok"] is True
        second = await Client.connect(path)
        assert await second.reader.read() == b""  # closed at once
        second.close()
        assert (await first.answers(encode_request("echo"), 1))[0]["ok"] is True
        first.close()

    run(serving(path, scenario, max_connections=1))


def test_an_idle_connection_is_closed(sock_dir: Path) -> None:
    path = sock_dir / "admin.sock"

    async def scenario(server: AdminServer) -> None:
        client = await Client.connect(path)
        client.writer.write(b'{"op": "ec')  # and nothing more
        assert await client.reader.read() == b""
        client.close()

    run(serving(path, scenario, idle_timeout_s=0.2))


def ask(policy: Policy, **kwargs: float) -> None:
    """``echo`` asked outside a server's scenario (its answer does not matter)."""
    async def asking() -> None:
        await ask_server(policy, "echo", {}, lambda r: r, **kwargs)

    run(asking())


def test_the_client_asks_and_says_what_failed(sock_dir: Path) -> None:
    path = sock_dir / "admin.sock"
    policy = parse_policy(f'admin: {{listen: "unix:{path}"}}\n', "/etc/p.yaml")

    async def scenario(server: AdminServer) -> None:
        assert await ask_server(policy, "echo", {"k": "v"}, lambda r: r["echo"]) == {"k": "v"}
        with pytest.raises(AdminFailed, match="x: expected int") as failed:
            await ask_server(policy, "picky", {}, lambda r: r)
        assert failed.value.kind == "bad_arguments" and failed.value.exit_code == 1
        with pytest.raises(AdminFailed, match="unexpected echo result") as odd:
            await ask_server(policy, "echo", {}, lambda r: r["missing"])
        assert odd.value.kind == "malformed"

    run(serving(path, scenario))
    with pytest.raises(AdminUnavailable, match=r"admin socket unix:\S+ cannot be reached "
                       r"\(No such file or directory\): is `mqpolicy serve -c /etc/p.yaml` "
                       "running") as gone:
        ask(policy)
    assert gone.value.exit_code == 1
    no_admin = parse_policy("{}", "/etc/p.yaml")
    with pytest.raises(AdminUnavailable, match=r"set admin\.listen in /etc/p\.yaml") as unset:
        ask(no_admin)
    assert unset.value.exit_code == 2


def test_the_client_gives_up_on_a_server_that_does_not_answer(sock_dir: Path) -> None:
    path = sock_dir / "silent.sock"
    policy = parse_policy(f'admin: {{listen: "unix:{path}"}}\n')
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)  # accepted by the kernel, never read
    try:
        with pytest.raises(AdminFailed, match="no answer on the admin socket"):
            ask(policy, answer_timeout_s=0.2)
    finally:
        listener.close()


def test_explain_says_a_server_error_and_explains_nothing_else(
        sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sock_dir / "admin.sock"
    policy = parse_policy(f'admin: {{listen: "unix:{path}"}}\n', "/etc/p.yaml")

    async def scenario(server: AdminServer) -> None:
        assert await cmd_explain(policy, "protocol_state=RCPT\nsender=a@x.test\n",
                                 consume=False, as_json=False) == 1

    run(serving(path, scenario, {"explain": picky}))
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == ("", "mqpolicy explain: x: expected int\n")
