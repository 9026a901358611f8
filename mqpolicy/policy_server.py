"""The asyncio server for Postfix policy delegation (``check_policy_service``).

This module is the only place that touches sockets; decoding lives in
:mod:`mqpolicy.policy_codec` and decisions in the :class:`PolicyHandler` passed in.

Per connection (Postfix keeps it open and sends request after request):

* requests are answered strictly in order, one at a time; requests that arrive together
  (pipelined) are answered in arrival order;
* no complete request within ``idle_timeout_s`` (also a client trickling bytes), or a
  request not answered and flushed within that time (a handler stuck, a client that stops
  reading its answers): the connection is closed. One sweeper task checks every connection's
  deadline, so a read costs no timer; a connection goes between ``idle_timeout_s`` and
  1/8 of it (at most 1 s) later;
* a protocol error (oversized or malformed request) is logged with the peer and closes that
  connection only;
* a handler exception is logged and answered with ``error_action``; the connection goes on.
  ``CancelledError`` is never swallowed.

Over ``max_connections`` a new connection is accepted and closed at once. :meth:`drain` stops
accepting, lets requests already received be answered within ``drain_timeout_s``, then
closes everything. Log lines about a connection carry its id, and :data:`connection_id`
holds it while the handler runs so that the handler's own log lines can carry it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from mqpolicy.endpoints import Endpoint
from mqpolicy.policy_codec import (
    DEFAULT_MAX_LINES,
    DEFAULT_MAX_REQUEST_BYTES,
    PolicyDecoder,
    PolicyProtocolError,
    encode_reply,
)
from mqpolicy.structured_log import LogBurst, connection_id_var
from mqpolicy.unix_sockets import remove_stale_socket

__all__ = [
    "DEFAULT_ERROR_ACTION",
    "PolicyHandler",
    "PolicyServer",
    "ServerCounters",
    "connection_id",
]

log = logging.getLogger("mqpolicy.server")

#: The id of the policy connection being served ("-" outside one).
#: The id of the connection being served (also on every log line it causes).
connection_id: ContextVar[str] = connection_id_var

DEFAULT_ERROR_ACTION = "DEFER_IF_PERMIT 4.3.0 policy service error"

_READ_SIZE = 65536
# Distinct encoded replies kept; handlers return few distinct texts (DUNNO, a few defers).
_REPLY_CACHE_SIZE = 256


class PolicyHandler(Protocol):
    """What the server calls for every request."""

    async def handle(self, attrs: dict[str, str]) -> str:
        """Return the action text, e.g. ``"DUNNO"`` or ``"450 4.7.1 slow down"``."""
        ...


@dataclass(slots=True)
class ServerCounters:
    """Monotonic counts (``connections_active`` is a gauge) for metrics."""

    connections_accepted: int = 0
    connections_active: int = 0
    connections_refused: int = 0
    requests: int = 0
    protocol_errors: int = 0
    handler_errors: int = 0
    idle_timeouts: int = 0


class _Conn:
    __slots__ = ("busy", "cid", "deadline", "expired", "peer")

    def __init__(self, cid: str, peer: str, deadline: float) -> None:
        self.cid = cid
        self.peer = peer
        # True from a request's arrival until its answer is handed to the kernel.
        self.busy = False
        # Loop time after which the idle sweeper closes the connection. Moved forward when
        # a complete request arrives and when its answer is written, never by partial data.
        self.deadline = deadline
        # Set by the sweeper when it closes the connection for idleness.
        self.expired = False


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    sockname = writer.get_extra_info("sockname")
    return f"unix:{sockname}" if sockname else "unix"


class PolicyServer:
    """Serves Postfix policy requests on TCP and unix endpoints with one asyncio loop."""

    def __init__(
        self,
        handler: PolicyHandler,
        endpoints: Sequence[Endpoint],
        *,
        idle_timeout_s: float = 300,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_lines: int = DEFAULT_MAX_LINES,
        max_connections: int = 4096,
        drain_timeout_s: float = 10,
        reuse_port: bool = False,
        error_action: str = DEFAULT_ERROR_ACTION,
        backlog: int = 1024,
    ) -> None:
        if not endpoints:
            raise ValueError("no endpoints to listen on")
        if idle_timeout_s <= 0 or drain_timeout_s < 0:
            raise ValueError("timeouts must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        PolicyDecoder(max_request_bytes, max_lines)  # validates the limits
        self._handler = handler
        self._endpoints = tuple(endpoints)
        self._idle_timeout_s = float(idle_timeout_s)
        self._max_request_bytes = max_request_bytes
        self._max_lines = max_lines
        self._max_connections = max_connections
        self._drain_timeout_s = float(drain_timeout_s)
        self._error_reply = encode_reply(error_action)  # ValueError for a bad fallback
        self._backlog = backlog
        self._reuse_port = reuse_port

        self.counters = ServerCounters()
        #: The endpoints actually listened on (real ports when 0 was asked for).
        self.bound_endpoints: list[Endpoint] = []

        self._servers: list[asyncio.Server] = []
        self._unix_sockets: list[tuple[str, int, int]] = []  # path, st_dev, st_ino
        self._conns: dict[_Conn, asyncio.Task[None]] = {}
        self._next_cid = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._started = False
        self._draining = False
        self._reply_cache: dict[str, bytes] = {}
        self._refused_log = LogBurst(10.0)
        self._protocol_error_log = LogBurst(1.0)
        self._handler_error_log = LogBurst(1.0)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and listen on every endpoint (all or none)."""
        if self._started:
            raise RuntimeError("server already started")
        self._started = True
        try:
            for endpoint in self._endpoints:
                if endpoint.is_unix:
                    await self._start_unix(endpoint)
                else:
                    await self._start_tcp(endpoint)
        except BaseException:
            self.close()
            raise
        self._sweeper = asyncio.create_task(self._sweep_idle(), name="policy-idle-sweeper")
        log.info("policy server listening on %s", " ".join(str(e) for e in self.bound_endpoints))

    async def _start_tcp(self, endpoint: Endpoint) -> None:
        server = await asyncio.start_server(
            self._on_connect,
            endpoint.host or None,
            endpoint.port,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
        )
        self._servers.append(server)
        for sock in server.sockets:
            address = sock.getsockname()
            self.bound_endpoints.append(Endpoint(host=address[0], port=address[1]))

    async def _start_unix(self, endpoint: Endpoint) -> None:
        path = endpoint.path
        remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # Before listen(): nobody can connect with the umask's permissions meanwhile.
            os.chmod(path, endpoint.mode)
            st = os.stat(path)
            self._unix_sockets.append((path, st.st_dev, st.st_ino))
            server = await asyncio.start_unix_server(
                self._on_connect, sock=sock, backlog=self._backlog
            )
        except BaseException:
            sock.close()
            raise
        self._servers.append(server)
        self.bound_endpoints.append(Endpoint(path=path, mode=endpoint.mode))

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Start if needed, serve until ``stop`` is set, then :meth:`drain`."""
        if not self._started:
            await self.start()
        try:
            await stop.wait()
        except asyncio.CancelledError:
            self.close()
            raise
        await self.drain()

    async def drain(self) -> None:
        """Stop accepting; answer requests already received (within ``drain_timeout_s``);
        close every connection; return when all are closed."""
        self._draining = True
        self._stop_listening()
        for conn, task in list(self._conns.items()):
            if not conn.busy:
                task.cancel()  # waiting for its next request: nothing in flight
        tasks = list(self._conns.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._drain_timeout_s)
            if pending:
                log.warning(
                    "drain timeout after %.1fs: closing %d busy connections",
                    self._drain_timeout_s,
                    len(pending),
                )
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)
        self._stop_sweeper()
        await self._wait_listeners_closed()

    def close(self) -> None:
        """Stop accepting and cut every connection now (no drain)."""
        self._draining = True
        self._stop_listening()
        for task in self._conns.values():
            task.cancel()
        self._stop_sweeper()

    async def wait_closed(self) -> None:
        """Wait until every connection task and listener is gone (after :meth:`close`)."""
        tasks = list(self._conns.values())
        if tasks:
            await asyncio.wait(tasks)
        await self._wait_listeners_closed()

    async def __aenter__(self) -> PolicyServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.drain()

    def _stop_listening(self) -> None:
        for server in self._servers:
            server.close()
        for path, dev, ino in self._unix_sockets:
            # Only our own socket file: a successor may already have replaced it.
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)
        self._unix_sockets.clear()

    def _stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _sweep_idle(self) -> None:
        """Close connections past their deadline.

        One timer for all connections instead of one per read keeps the per-request cost
        down; a connection is closed between ``idle_timeout_s`` and 1/8 of it (at most 1 s)
        later.
        """
        loop = asyncio.get_running_loop()
        interval = min(1.0, self._idle_timeout_s / 8)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn, task in self._conns.items():
                if now >= conn.deadline and not conn.expired:
                    conn.expired = True
                    task.cancel()

    async def _wait_listeners_closed(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            await server.wait_closed()

    # --- connections -------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function: the connection runs in a task of our own, so that cancelling it
        # (drain, close, idle sweep) does not trip asyncio 3.11's stream callback, which
        # calls task.exception() on the finished task and logs an error when cancelled.
        counters = self.counters
        if self._draining:
            writer.close()
            return
        if len(self._conns) >= self._max_connections:
            counters.connections_refused += 1
            suppressed = self._refused_log.take()
            if suppressed is not None:
                log.warning(
                    "connection limit reached: max_connections=%d refused_since_last_log=%d",
                    self._max_connections,
                    suppressed + 1,
                )
            writer.close()
            return
        self._next_cid += 1
        loop = asyncio.get_running_loop()
        conn = _Conn(f"{self._next_cid:x}", _peer_name(writer), loop.time() + self._idle_timeout_s)
        self._conns[conn] = loop.create_task(self._connection(conn, reader, writer))
        counters.connections_accepted += 1
        counters.connections_active += 1

    async def _connection(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        cid = conn.cid
        connection_id.set(cid)
        counters = self.counters
        try:
            await self._serve(conn, reader, writer)
        except ConnectionError as exc:
            log.debug("connection lost conn=%s peer=%s error=%r", cid, conn.peer, exc)
        except Exception:
            log.exception("connection failed conn=%s peer=%s", cid, conn.peer)
        finally:
            counters.connections_active -= 1
            del self._conns[conn]
            if conn.expired:
                counters.idle_timeouts += 1
                log.debug("idle timeout conn=%s peer=%s", cid, conn.peer)
            transport = writer.transport
            if transport.get_write_buffer_size():
                transport.abort()  # the peer stopped reading: don't wait for it
            else:
                transport.close()
            # Collects a connection error stored for wait_closed() (else asyncio logs
            # "exception never retrieved"); returns as soon as the socket is closed.
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        counters = self.counters
        handle = self._handler.handle
        cache = self._reply_cache
        read = reader.read
        write = writer.write
        idle = self._idle_timeout_s
        decoder = PolicyDecoder(self._max_request_bytes, self._max_lines)
        while True:
            data = await read(_READ_SIZE)
            if not data:
                if decoder.pending_bytes:
                    log.debug(
                        "eof inside a request conn=%s peer=%s pending_bytes=%d",
                        conn.cid,
                        conn.peer,
                        decoder.pending_bytes,
                    )
                return
            try:
                requests = decoder.feed(data)
            except PolicyProtocolError as exc:
                counters.protocol_errors += 1
                suppressed = self._protocol_error_log.take()
                if suppressed is not None:
                    log.warning(
                        "policy protocol error, closing conn=%s peer=%s error=%s: %s suppressed=%d",
                        conn.cid,
                        conn.peer,
                        type(exc).__name__,
                        exc,
                        suppressed,
                    )
                return
            if not requests:
                continue
            conn.busy = True
            conn.deadline = loop.time() + idle
            for attrs in requests:
                try:
                    action = await handle(attrs)
                    reply = cache.get(action)
                    if reply is None:
                        reply = encode_reply(action)
                        if len(cache) >= _REPLY_CACHE_SIZE:
                            cache.clear()
                        cache[action] = reply
                except Exception:  # not CancelledError (a BaseException): that propagates
                    counters.handler_errors += 1
                    reply = self._error_reply
                    suppressed = self._handler_error_log.take()
                    if suppressed is not None:
                        log.exception(
                            "policy handler failed, answered fallback conn=%s peer=%s"
                            " suppressed=%d",
                            conn.cid,
                            conn.peer,
                            suppressed,
                        )
                write(reply)
            counters.requests += len(requests)
            # Waits only while the peer is slow to read; the sweeper bounds that wait.
            await writer.drain()
            conn.deadline = loop.time() + idle
            conn.busy = False
            if self._draining:
                return
