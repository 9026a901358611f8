"""The policy server over real sockets: a server on port 0 (or a temporary unix socket) per test.

Each test drives its scenario with ``asyncio.run`` under an overall timeout; readiness is
never waited for by sleeping (``start()`` returns once listening, handlers signal events).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import random
import resource
import socket
import stat
import struct
import time
from collections.abc import Awaitable
from pathlib import Path

import pytest

from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.codec import encode_request
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.delegation.server import (
    DEFAULT_ERROR_ACTION,
    PolicyServer,
    SyncPolicyHandler,
    connection_id,
)
from mqpolicy.policy.endpoints import Endpoint
from mqpolicy.policy.model import Policy
from mqpolicy.store.memory import MemoryStore
from tests.support.async_poll import poll_async
from tests.support.bounded_run import run
from tests.support.policy_client import LOCAL, Client, serving


class Echo:
    """Answers ``OK <n>`` for attribute ``n``; records how many calls overlap."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def handle(self, attrs: dict[str, str]) -> str:
        self.calls.append(attrs.get("n", ""))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            delay = attrs.get("sleep")
            if delay:
                await asyncio.sleep(float(delay))
            return f"OK {attrs.get('n', '')}"
        finally:
            self.in_flight -= 1


class Gate:
    """Signals when a request starts; ``hold=1`` waits for ``release``, ``sleep`` sleeps."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = 0

    async def handle(self, attrs: dict[str, str]) -> str:
        self.started.set()
        if attrs.get("hold"):
            await self.release.wait()
        await asyncio.sleep(float(attrs.get("sleep", "0")))
        self.finished += 1
        return f"OK {attrs.get('n', '')}"


def tcp(server: PolicyServer) -> Endpoint:
    endpoint = server.bound_endpoints[0]
    assert endpoint.port != 0
    return endpoint


# --- ordering and persistence --------------------------------------------------------------


def test_many_requests_on_one_connection_in_order() -> None:
    handler = Echo()

    async def scenario() -> None:
        async with serving(handler) as server:
            client = await Client.to(tcp(server))
            answers = [await client.ask(n=str(i)) for i in range(200)]
            assert answers == [f"OK {i}" for i in range(200)]
            assert server.counters.requests == 200
            assert server.counters.connections_accepted == 1
            assert server.counters.connections_active == 1
            client.close()

    run(scenario())


def test_pipelined_requests_in_one_write_answered_in_order() -> None:
    handler = Echo()

    async def scenario() -> None:
        async with serving(handler) as server:
            client = await Client.to(tcp(server))
            # Earlier requests take longer: answering them concurrently would reorder.
            batch = b"".join(
                encode_request({"n": str(i), "sleep": str((30 - i) / 10000)}) for i in range(30)
            )
            await client.send(batch)
            answers = [await client.reply() for _ in range(30)]
            assert answers == [f"OK {i}" for i in range(30)]
            assert handler.max_in_flight == 1
            # The connection stays open for the next request.
            assert await client.ask(n="next") == "OK next"
            client.close()

    run(scenario())


def test_requests_sent_before_the_client_closes_its_side_are_answered() -> None:
    async def scenario() -> None:
        async with serving(Echo()) as server:
            client = await Client.to(tcp(server))
            batch = b"".join(
                encode_request({"n": str(i), "sleep": "0.05" if i == 0 else "0"})
                for i in range(3)
            )
            client.writer.write(batch)
            client.writer.write_eof()  # like `printf ... | nc`: no more requests
            assert [await client.reply() for _ in range(3)] == ["OK 0", "OK 1", "OK 2"]
            assert await client.closed_by_server()
            await poll_async(lambda: server.connection_count == 0, "the server let it go")

    run(scenario())


def test_a_client_that_stops_reading_is_paused_then_dropped() -> None:
    """Requests keep coming, answers are never read: the server stops reading once its
    buffers are full (it does not queue answers without bound) and closes the connection
    after the idle timeout; other clients are served meanwhile."""

    class Instant:
        def handle_now(self, attrs: dict[str, str]) -> str:
            return "OK " + "x" * 200

        async def handle(self, attrs: dict[str, str]) -> str:
            return self.handle_now(attrs)

    async def scenario() -> None:
        # the other client asks every 0.2 s: far inside the idle timeout, however slow
        async with serving(Instant(), idle_timeout_s=3) as server:
            endpoint = tcp(server)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (endpoint.host, endpoint.port))
            _, writer = await asyncio.open_connection(sock=sock)
            request = encode_request({"n": "1"})
            sent = 0
            # 20 MB of answers asked for, none read: more than the socket buffers hold
            while sent < 100_000:
                writer.write(request * 1000)
                sent += 1000
                try:
                    await asyncio.wait_for(writer.drain(), 2)
                except ConnectionError:
                    break  # closed
                except TimeoutError:
                    if any(c.paused for c in server._conns):
                        break  # the server stopped reading: drain waits
            other = await Client.to(endpoint)
            give_up = time.monotonic() + 60
            while not server.counters.idle_timeouts:  # the other client stays busy
                assert await other.ask(n="2") == "OK " + "x" * 200
                assert time.monotonic() < give_up, "the stuck connection was never dropped"
                await asyncio.sleep(0.2)
            # the stuck connection was dropped (not answered to the end), the other not
            assert server.counters.idle_timeouts == 1
            assert server.counters.requests < sent
            assert server.connection_count == 1
            assert await other.ask(n="3") == "OK " + "x" * 200
            writer.transport.abort()
            other.close()

    run(scenario())


def test_connections_are_served_concurrently() -> None:
    async def scenario() -> None:
        handler = Gate()
        async with serving(handler) as server:
            slow = await Client.to(tcp(server))
            fast = await Client.to(tcp(server))
            await slow.send(encode_request({"n": "slow", "hold": "1"}))
            await handler.started.wait()
            # The held request does not stop another connection from being answered.
            assert await fast.ask(n="fast") == "OK fast"
            assert not handler.release.is_set()
            handler.release.set()
            assert await slow.reply() == "OK slow"
            slow.close()
            fast.close()

    run(scenario())


def test_bound_endpoints_report_real_port() -> None:
    async def scenario() -> None:
        async with serving(Echo()) as server:
            (endpoint,) = server.bound_endpoints
            assert endpoint.host == "127.0.0.1"
            assert endpoint.port > 0
            assert await (await Client.to(endpoint)).ask(n="1") == "OK 1"

    run(scenario())


def test_connection_id_contextvar_set_per_connection() -> None:
    class WhoAmI:
        async def handle(self, attrs: dict[str, str]) -> str:
            return f"OK {connection_id.get()}"

    async def scenario() -> None:
        async with serving(WhoAmI()) as server:
            first = await Client.to(tcp(server))
            second = await Client.to(tcp(server))
            a1, a2 = await first.ask(), await first.ask()
            b1 = await second.ask()
            assert a1 == a2
            assert a1 != b1
            assert "OK " not in (a1, b1)  # an id was set: not the empty default
            first.close()
            second.close()

    before = connection_id.get()
    run(scenario())
    assert connection_id.get() == before  # the server's ids never leak into the caller


# --- idle connections ----------------------------------------------------------------------


def test_silent_and_trickling_clients_do_not_block_others_and_are_dropped() -> None:
    handler = Echo()
    idle_s = 3.0  # the busy client asks every 0.2 s, far inside it however slow the machine

    async def scenario() -> None:
        async with serving(handler, idle_timeout_s=idle_s) as server:
            endpoint = tcp(server)
            opened = time.monotonic()
            silent = await Client.to(endpoint)
            trickler = await Client.to(endpoint)
            # a byte every 0.2 s: over a minute to complete, 20 times the idle timeout
            trickle_bytes = encode_request({"n": "never", "pad": "x" * 300})
            trickled = 0

            async def trickle() -> None:
                nonlocal trickled
                for byte in trickle_bytes:
                    if trickler.reader.at_eof():
                        return
                    trickler.writer.write(bytes([byte]))
                    trickled += 1
                    await asyncio.sleep(0.2)

            async def closed_at(client: Client) -> tuple[float, int]:
                assert await client.closed_by_server(within=60)
                return time.monotonic() - opened, trickled

            trickling = asyncio.create_task(trickle())
            silent_closed = asyncio.create_task(closed_at(silent))
            trickler_closed = asyncio.create_task(closed_at(trickler))

            # Meanwhile another client is answered, again and again: the first answer
            # while the other two are still held.
            other = await Client.to(endpoint)
            assert await other.ask(n="0") == "OK 0"
            assert not silent_closed.done() and not trickler_closed.done()
            i = 0
            while not (silent_closed.done() and trickler_closed.done()):
                i += 1
                assert await other.ask(n=str(i)) == f"OK {i}"
                assert time.monotonic() - opened < 60
                await asyncio.sleep(0.2)

            # Both dropped once the idle timeout passed, not before; the trickler while it
            # was still sending bytes (of a request it would not finish for a minute).
            silent_s, _ = await silent_closed
            trickler_s, trickled_then = await trickler_closed
            assert silent_s >= idle_s and trickler_s >= idle_s
            assert 0 < trickled_then < len(trickle_bytes)
            trickling.cancel()
            # An active connection older than the idle timeout is still served.
            assert time.monotonic() - opened > idle_s
            assert await other.ask(n="late") == "OK late"
            assert server.counters.idle_timeouts == 2
            assert "never" not in handler.calls
            other.close()

    run(scenario())


def test_idle_time_counts_from_the_last_answer_not_the_request() -> None:
    """Idle 3 s; the request takes 1.6 s and the next comes 1.8 s after its answer. Counted
    from the request, 3.4 s would have passed (sleeps only last longer): cut. Counted from
    the answer, 1.8 s: kept, with 1.2 s to spare for a slow machine."""

    async def scenario() -> None:
        async with serving(Echo(), idle_timeout_s=3) as server:
            client = await Client.to(tcp(server))
            # A handler slower than half the idle timeout is not cut off ...
            assert await client.ask(n="slow", sleep="1.6") == "OK slow"
            # ... and the pause after its answer starts a fresh idle period.
            await asyncio.sleep(1.8)
            assert await client.ask(n="next") == "OK next"
            assert server.counters.idle_timeouts == 0
            client.close()

    run(scenario())


def test_requests_piled_behind_a_stuck_answer_neither_keep_it_open_nor_pile_up() -> None:
    async def scenario() -> None:
        handler = Echo()
        # idle 3 s: time for the client to send over a thousand requests, however slow
        async with serving(handler, idle_timeout_s=3) as server:
            client = await Client.to(tcp(server))
            await client.send(encode_request({"n": "stuck", "sleep": "60"}))
            # the client keeps sending while the first request waits for its answer: were
            # they to keep it open, it would stay open as long as they come (here 30 s)
            loop = asyncio.get_running_loop()
            sent, queued, started = 0, 0, loop.time()
            with contextlib.suppress(ConnectionError):
                while loop.time() - started < 30 and server.counters.idle_timeouts == 0:
                    client.writer.write(encode_request({"n": f"more{sent}"}) * 50)
                    sent += 50
                    await asyncio.sleep(0.01)
                    queued = max([queued, *(len(c.queue) for c in server._conns)])
            # closed at the idle timeout after the stuck request, though requests kept coming
            assert server.counters.idle_timeouts == 1
            assert await client.closed_by_server()
            assert handler.calls == ["stuck"]  # nothing behind it was answered
            # the server stopped reading: what waits is bounded, not what the client sent
            assert sent >= 1000 and queued <= 100, (sent, queued)

    run(scenario())


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"this is not a policy request\n\n", id="no-equals"),
        pytest.param(b"=value\n\n", id="empty-name"),
        pytest.param(b"a=" + b"x" * 3000, id="oversized-no-newline"),
        pytest.param(b"".join(b"a%d=1\n" % i for i in range(50)) + b"\n", id="too-many-lines"),
    ],
)
def test_protocol_error_closes_only_that_connection(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    handler = Echo()
    caplog.set_level(logging.WARNING, logger="mqpolicy.server")

    async def scenario() -> None:
        async with serving(handler, max_request_bytes=1024, max_lines=40) as server:
            good = await Client.to(tcp(server))
            bad = await Client.to(tcp(server))
            assert await good.ask(n="1") == "OK 1"
            await bad.send(garbage)
            assert await bad.closed_by_server()
            assert await good.ask(n="2") == "OK 2"
            assert server.counters.protocol_errors == 1
            records = [r for r in caplog.records if r.name == "mqpolicy.server"]
            assert len(records) == 1
            assert f"peer=127.0.0.1:{bad.local_port}" in records[0].getMessage()
            good.close()

    run(scenario())


def test_handler_exception_answers_fallback_and_connection_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Flaky:
        async def handle(self, attrs: dict[str, str]) -> str:
            if attrs["n"] == "boom":
                raise RuntimeError("store exploded")
            if attrs["n"] == "inject":
                return "OK\naction=REJECT"  # never sent as is
            if attrs["n"] == "none":
                return None  # type: ignore[return-value]  # a buggy handler
            return f"OK {attrs['n']}"

    async def scenario() -> None:
        async with serving(Flaky()) as server:
            client = await Client.to(tcp(server))
            assert await client.ask(n="1") == "OK 1"
            assert await client.ask(n="boom") == DEFAULT_ERROR_ACTION
            assert await client.ask(n="2") == "OK 2"
            assert await client.ask(n="inject") == DEFAULT_ERROR_ACTION
            assert await client.ask(n="none") == DEFAULT_ERROR_ACTION
            assert await client.ask(n="3") == "OK 3"
            assert server.counters.handler_errors == 3
            assert server.counters.requests == 6
            client.close()

    run(scenario())
    errors = [r for r in caplog.records if r.name == "mqpolicy.server"]
    assert errors
    assert errors[0].levelno == logging.ERROR
    assert errors[0].exc_info is not None


def test_custom_error_action_and_bad_one_refused() -> None:
    class Broken:
        async def handle(self, attrs: dict[str, str]) -> str:
            raise KeyError("x")

    async def scenario() -> None:
        async with serving(Broken(), error_action="DUNNO") as server:
            assert await (await Client.to(tcp(server))).ask() == "DUNNO"

    run(scenario())
    with pytest.raises(ValueError):
        PolicyServer(Broken(), [LOCAL], error_action="DUNNO\n\naction=OK")


def test_handler_cancellation_is_not_swallowed() -> None:
    class Cancelling:
        async def handle(self, attrs: dict[str, str]) -> str:
            if attrs.get("n") == "cancel":
                raise asyncio.CancelledError
            return "OK"

    async def scenario() -> None:
        async with serving(Cancelling()) as server:
            victim = await Client.to(tcp(server))
            bystander = await Client.to(tcp(server))
            await victim.send(encode_request({"n": "cancel"}))
            # No fallback answer: the cancellation ends that connection.
            assert await victim.closed_by_server()
            assert server.counters.handler_errors == 0
            assert await bystander.ask(n="1") == "OK"
            bystander.close()

    run(scenario())


def test_random_bytes_never_kill_the_server(caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(20240611)
    pieces = [b"\n", b"\r\n", b"=", b"request=smtpd_access_policy\n", b"\x00", b"\xff", b"n=1\n"]

    def garbage() -> bytes:
        out = bytearray()
        for _ in range(rng.randrange(0, 40)):
            if rng.random() < 0.5:
                out += rng.choice(pieces)
            else:
                out += rng.randbytes(rng.randrange(1, 64))
        return bytes(out)

    async def scenario() -> None:
        async with serving(Echo(), max_request_bytes=512, max_lines=20) as server:
            endpoint = tcp(server)

            async def fuzz() -> None:
                client = await Client.to(endpoint)
                data = garbage()
                cut = rng.randrange(0, len(data) + 1)
                with contextlib.suppress(ConnectionError):
                    await client.send(data[:cut])
                    await asyncio.sleep(0)
                    await client.send(data[cut:])
                client.close()

            for _ in range(10):
                await asyncio.gather(*(fuzz() for _ in range(30)))
            normal = await Client.to(endpoint)
            assert await normal.ask(n="after") == "OK after"
            assert server.counters.connections_accepted == 301
            normal.close()

    run(scenario())
    # No unexpected exception inside the server (those are logged as "connection failed").
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_client_reset_is_quietly_cleaned_up(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with serving(Echo()) as server:
            endpoint = tcp(server)
            for _ in range(20):
                client = await Client.to(endpoint)
                await client.send(b"request=smtpd_acc")  # half a request, then a reset
                sock = client.writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.writer.transport.abort()
            await poll_async(lambda: server.counters.connections_active == 0,
                             "the server to see every reset")
            gc.collect()
            await asyncio.sleep(0)
            assert await (await Client.to(endpoint)).ask(n="1") == "OK 1"

    run(scenario())
    gc.collect()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- limits --------------------------------------------------------------------------------


def _raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def test_thousand_simultaneous_connections_each_answered() -> None:
    count = 1000
    _raise_nofile(2 * count + 200)
    handler = Echo()

    async def scenario() -> None:
        async with serving(handler) as server:
            endpoint = tcp(server)
            clients = await asyncio.gather(*(Client.to(endpoint) for _ in range(count)))
            answers = await asyncio.gather(
                *(client.ask(within=50, n=str(i)) for i, client in enumerate(clients))
            )
            assert answers == [f"OK {i}" for i in range(count)]
            # All were open at once: none was closed to make room for another.
            assert server.counters.connections_accepted == count
            assert server.counters.connections_active == count
            for client in clients:
                client.close()

    run(scenario(), timeout=60)


def test_over_max_connections_closed_immediately_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mqpolicy.server")

    async def scenario() -> None:
        async with serving(Echo(), max_connections=3) as server:
            endpoint = tcp(server)
            kept = [await Client.to(endpoint) for _ in range(3)]
            for i, client in enumerate(kept):
                assert await client.ask(n=str(i)) == f"OK {i}"
            extra = [await Client.to(endpoint) for _ in range(5)]
            for client in extra:
                assert await client.closed_by_server()
            assert server.counters.connections_refused == 5
            # The kept connections are unaffected; closing one makes room again.
            assert await kept[0].ask(n="still") == "OK still"
            kept[0].close()
            assert await kept[0].closed_by_server()
            # until the server has read the EOF and let the connection go
            await poll_async(lambda: server.counters.connections_active < 3, "the EOF seen")
            assert server.counters.connections_active == 2
            late = await Client.to(endpoint)
            assert await late.ask(n="late") == "OK late"

    run(scenario())
    warnings = [r for r in caplog.records if "connection limit" in r.getMessage()]
    assert len(warnings) == 1


# --- drain ---------------------------------------------------------------------------------


def test_drain_answers_in_flight_request_and_refuses_new_connections() -> None:
    async def scenario() -> None:
        handler = Gate()
        async with serving(handler, drain_timeout_s=60) as server:
            endpoint = tcp(server)
            busy = await Client.to(endpoint)
            idle = await Client.to(endpoint)
            assert await idle.ask(n="warm") == "OK warm"
            handler.started.clear()
            await busy.send(encode_request({"n": "slow", "hold": "1", "sleep": "0.3"}))
            await handler.started.wait()

            draining = asyncio.create_task(server.drain())
            await asyncio.sleep(0)  # let drain() run up to its first wait
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(endpoint.host, endpoint.port)
            # An idle connection is closed at once; the busy one is left to finish.
            assert await idle.closed_by_server()
            assert not draining.done()
            assert server.connection_count == 1
            began = time.monotonic()
            handler.release.set()  # the handler now sleeps 0.3 s, drain still waiting
            assert await busy.reply() == "OK slow"
            assert await busy.closed_by_server()
            await draining
            # after the busy request's 0.3 s (slowness only adds), not at the 60 s timeout
            assert 0.3 <= time.monotonic() - began < 30
            assert handler.finished == 2
            assert server.connection_count == 0

    run(scenario())


def test_drain_gives_up_after_drain_timeout() -> None:
    async def scenario() -> None:
        handler = Gate()
        async with serving(handler, drain_timeout_s=0.3) as server:
            stuck = await Client.to(tcp(server))
            await stuck.send(encode_request({"n": "stuck", "hold": "1"}))  # never released
            await handler.started.wait()
            began = time.monotonic()
            await server.drain()  # returns at all: it gave up on the stuck request
            assert time.monotonic() - began >= 0.3 * 0.9  # but not before its timeout
            assert await stuck.closed_by_server()
            assert handler.finished == 0

    run(scenario())


def test_serve_until_stop_event_then_drains() -> None:
    async def scenario() -> None:
        server = PolicyServer(Echo(), [LOCAL])
        stop = asyncio.Event()
        await server.start()
        serving_task = asyncio.create_task(server.serve_until(stop))
        endpoint = tcp(server)
        client = await Client.to(endpoint)
        assert await client.ask(n="1") == "OK 1"
        stop.set()
        await serving_task
        assert await client.closed_by_server()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(endpoint.host, endpoint.port)

    run(scenario())


# --- unix sockets --------------------------------------------------------------------------


def _stale_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # leaves the file behind, as a killed process would


def test_unix_socket_with_mode_replaces_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    _stale_socket(path)

    async def scenario() -> None:
        endpoint = Endpoint(path=str(path), mode=0o600)
        server = PolicyServer(Echo(), [endpoint, LOCAL])
        await server.start()
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert server.bound_endpoints[0] == endpoint
        client = await Client.to(endpoint)
        assert await client.ask(n="unix") == "OK unix"
        assert await (await Client.to(server.bound_endpoints[1])).ask(n="tcp") == "OK tcp"
        await server.drain()
        assert not path.exists()

    run(scenario())


@pytest.mark.parametrize("mode", [0o660, 0o666])
def test_unix_socket_mode_applied(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "p.sock"

    async def scenario() -> None:
        async with serving(Echo(), [Endpoint(path=str(path), mode=mode)]):
            assert stat.S_IMODE(path.stat().st_mode) == mode

    old = os.umask(0o077)
    try:
        run(scenario())
    finally:
        os.umask(old)


def test_unix_socket_refuses_live_socket_and_regular_file(tmp_path: Path) -> None:
    live = tmp_path / "live.sock"
    regular = tmp_path / "file"
    regular.write_text("not a socket")

    async def scenario() -> None:
        async with serving(Echo(), [Endpoint(path=str(live))]):
            second = PolicyServer(Echo(), [Endpoint(path=str(live))])
            with pytest.raises(OSError) as in_use:
                await second.start()
            assert in_use.value.errno == errno.EADDRINUSE
            # The first server still owns and serves its socket.
            assert await (await Client.to(Endpoint(path=str(live)))).ask(n="1") == "OK 1"
        third = PolicyServer(Echo(), [Endpoint(path=str(regular))])
        with pytest.raises(FileExistsError):
            await third.start()

    run(scenario())
    assert regular.read_text() == "not a socket"


def test_start_failure_releases_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "first.sock"
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = Endpoint(host="127.0.0.1", port=blocker.getsockname()[1])

    async def scenario() -> None:
        server = PolicyServer(Echo(), [Endpoint(path=str(path)), taken])
        with pytest.raises(OSError):
            await server.start()
        assert not path.exists()

    try:
        run(scenario())
    finally:
        blocker.close()


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        PolicyServer(Echo(), [])
    with pytest.raises(ValueError):
        PolicyServer(Echo(), [LOCAL], idle_timeout_s=0)
    with pytest.raises(ValueError):
        PolicyServer(Echo(), [LOCAL], max_connections=0)
    with pytest.raises(ValueError):
        PolicyServer(Echo(), [LOCAL], max_request_bytes=0)


def test_a_handler_that_answers_at_once_is_only_asked_that_way() -> None:
    """A :class:`SyncPolicyHandler` (it has ``handle_now``) is asked with ``handle_now`` only:
    a string is the answer, written in the callback that read the request; an awaitable is
    waited for. A handler with ``handle`` alone is awaited. The Postfix handler answers at
    once (on the embedded store, the decision needs no I/O)."""

    class AtOnce:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def handle_now(self, attrs: dict[str, str]) -> str | Awaitable[str]:
            self.calls.append(f"now {attrs['n']}")
            return f"OK {attrs['n']}" if attrs["n"] == "1" else self.handle(attrs)

        async def handle(self, attrs: dict[str, str]) -> str:
            self.calls.append(f"handle {attrs['n']}")
            await asyncio.sleep(0)
            return f"LATER {attrs['n']}"

    handler = AtOnce()
    assert isinstance(handler, SyncPolicyHandler)
    assert not isinstance(Echo(), SyncPolicyHandler)
    assert isinstance(PostfixPolicyHandler(DecisionService(Policy(), MemoryStore())),
                      SyncPolicyHandler)

    async def scenario() -> None:
        async with serving(handler) as server:
            client = await Client.to(tcp(server))
            assert await client.ask(n="1") == "OK 1"
            assert await client.ask(n="2") == "LATER 2"
        async with serving(Echo()) as server:
            client = await Client.to(tcp(server))
            assert await client.ask(n="3") == "OK 3"

    run(scenario())
    assert handler.calls == ["now 1", "now 2", "handle 2"]
