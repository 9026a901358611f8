"""The asyncio server for Postfix policy delegation (``check_policy_service``).

This module is the only place that touches sockets; decoding lives in
:mod:`mqpolicy.delegation.codec` and decisions in the :class:`PolicyHandler` passed in.

Each connection is an :class:`asyncio.Protocol`: a request is decoded and answered in the
callback that received it when the handler can answer at once (a
:class:`SyncPolicyHandler`'s ``handle_now``, e.g. a decision on the embedded store),
without waking a task; otherwise the handler's coroutine runs as a task and the answer is
written when it ends. That is one loop iteration per request instead of several, which is
most of a policy server's cost when Postfix sends a request, waits, and sends the next.

Per connection (Postfix keeps it open and sends request after request):

* requests are answered strictly in order, one at a time; requests that arrive together
  (pipelined) are answered in arrival order;
* no connection stalls the others: one answers at most ``_REQUESTS_PER_TURN`` requests in
  a turn of the event loop, then lets the loop serve the other connections and goes on at
  its next turn (its reading paused meanwhile). Postfix sends one request and waits, so only
  a pipelining client ever waits for a turn;
* what a pipelining client gets buffered is bounded: at most ``_MAX_WAITING`` requests
  decoded and not answered yet; the rest of what it sent stays undecoded in the decoder
  (at most one read, which asyncio caps at 256 KiB, and one incomplete request) and the
  connection is not read again until all of it is answered: the client's own writes then
  wait (backpressure, as TCP gives it);
* no complete request within ``idle_timeout_s`` (also a client trickling bytes), or a
  request not answered within that time (a handler stuck, a client that stops reading its
  answers: reading stops while the kernel buffer is full): the connection is closed. More
  requests sent meanwhile do not keep it open. One
  sweeper task checks every connection's deadline, so a request costs no timer; a
  connection goes between ``idle_timeout_s`` and 1/8 of it (at most 1 s) later;
* a protocol error (oversized or malformed request, or an empty one: a bare line end, which
  Postfix never sends) is logged with the peer and closes that connection only, without
  answering what it had sent before the error and not answered yet;
* a handler exception is logged and answered with ``error_action``; the connection goes on.
  A handler task cancelled from inside ends its connection without an answer.

Over ``max_connections`` a new connection is accepted and closed at once. :meth:`drain` stops
accepting, lets requests already received be answered within ``drain_timeout_s``, then
closes everything. Log lines about a connection carry its id, and :data:`connection_id`
holds it while the handler runs so that the handler's own log lines can carry it too.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from inspect import CORO_CREATED
from types import TracebackType
from typing import Protocol, cast, runtime_checkable

from mqpolicy.daemon.structured_log import LogBurst, connection_id_var
from mqpolicy.daemon.unix_sockets import OwnedSocket, bind_unix
from mqpolicy.delegation.codec import (
    DEFAULT_MAX_LINES,
    DEFAULT_MAX_REQUEST_BYTES,
    PolicyDecoder,
    PolicyProtocolError,
    encode_reply,
)
from mqpolicy.metrics.registry import MetricsRegistry
from mqpolicy.policy.endpoints import Endpoint

__all__ = [
    "DEFAULT_ERROR_ACTION",
    "PolicyHandler",
    "PolicyServer",
    "ServerCounters",
    "connection_id",
    "register_policy_server_metrics",
]

log = logging.getLogger("mqpolicy.server")

#: The id of the connection being served (also on every log line it causes).
connection_id: ContextVar[str] = connection_id_var

DEFAULT_ERROR_ACTION = "DEFER_IF_PERMIT 4.3.0 policy service error"

# Distinct encoded replies kept; handlers return few distinct texts (DUNNO, a few defers).
_REPLY_CACHE_SIZE = 256
# Requests decoded on one connection and not answered yet: at most this many (Postfix sends
# one and waits). What a pipelining client sent beyond them stays undecoded, and the
# connection is not read until they are all answered.
_MAX_WAITING = 16
# Requests one connection answers in one turn of the event loop before it lets the loop
# serve the others (a read of 256 KiB holds 12,000 tiny pipelined requests).
_REQUESTS_PER_TURN = 16


class PolicyHandler(Protocol):
    """What the server calls for every request (a :class:`SyncPolicyHandler` may answer at
    once instead)."""

    async def handle(self, attrs: dict[str, str]) -> str:
        """Return the action text, e.g. ``"DUNNO"`` or ``"450 4.7.1 slow down"``."""
        ...


@runtime_checkable
class SyncPolicyHandler(PolicyHandler, Protocol):
    """A handler that can answer at once: the server calls only :meth:`handle_now`, in the
    callback that read the request, and writes the answer there when it is a string."""

    def handle_now(self, attrs: dict[str, str]) -> str | Awaitable[str]:
        """The action text when it is known without waiting (e.g. a decision on the
        embedded store), else an awaitable of it."""
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


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    sockname = transport.get_extra_info("sockname")
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
        self._handle_now: Callable[[dict[str, str]], str | Awaitable[str]] = (
            handler.handle_now if isinstance(handler, SyncPolicyHandler) else handler.handle)
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
        self._unix_sockets: list[OwnedSocket] = []
        self._conns: dict[_Connection, None] = {}  # ordered set of open connections
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
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._new_connection,
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
        sock, owned = bind_unix(endpoint.path, endpoint.mode)
        self._unix_sockets.append(owned)
        try:
            server = await asyncio.get_running_loop().create_unix_server(
                self._new_connection, sock=sock, backlog=self._backlog
            )
        except BaseException:
            sock.close()
            raise
        self._servers.append(server)
        self.bound_endpoints.append(Endpoint(path=endpoint.path, mode=endpoint.mode))

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
        for conn in list(self._conns):
            if not conn.busy:
                conn.close()  # waiting for its next request: nothing in flight
        closed = [conn.closed for conn in self._conns]
        if closed:
            _, pending = await asyncio.wait(closed, timeout=self._drain_timeout_s)
            if pending:
                busy = [conn for conn in self._conns if not conn.closed.done()]
                log.warning(
                    "drain timeout after %.1fs: closing %d busy connections",
                    self._drain_timeout_s,
                    len(busy),
                )
                for conn in busy:
                    conn.abort()
                await asyncio.wait(pending)
        self._stop_sweeper()
        await self._wait_listeners_closed()

    def close(self) -> None:
        """Stop accepting and cut every connection now (no drain)."""
        self._draining = True
        self._stop_listening()
        for conn in list(self._conns):
            conn.abort()
        self._stop_sweeper()

    async def wait_closed(self) -> None:
        """Wait until every connection and listener is gone (after :meth:`close`)."""
        closed = [conn.closed for conn in self._conns]
        if closed:
            await asyncio.wait(closed)
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
        for owned in self._unix_sockets:
            owned.remove()
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
            for conn in list(self._conns):
                if now >= conn.deadline and not conn.expired:
                    conn.expired = True
                    conn.abort()

    async def _wait_listeners_closed(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            await server.wait_closed()

    # --- connections -------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    def _new_connection(self) -> _Connection:
        return _Connection(self)

    def _accept(self, conn: _Connection, transport: asyncio.BaseTransport) -> bool:
        """Register a new connection; False (and closed) when draining or over the limit."""
        counters = self.counters
        if self._draining:
            transport.close()
            return False
        if len(self._conns) >= self._max_connections:
            counters.connections_refused += 1
            suppressed = self._refused_log.take()
            if suppressed is not None:
                log.warning(
                    "connection limit reached: max_connections=%d refused_since_last_log=%d",
                    self._max_connections,
                    suppressed + 1,
                )
            transport.close()
            return False
        self._next_cid += 1
        conn.cid = f"{self._next_cid:x}"
        conn.peer = _peer_name(transport)
        conn.deadline = asyncio.get_running_loop().time() + self._idle_timeout_s
        self._conns[conn] = None
        counters.connections_accepted += 1
        counters.connections_active += 1
        return True

    def _closed(self, conn: _Connection) -> None:
        self.counters.connections_active -= 1
        del self._conns[conn]
        if conn.expired:
            self.counters.idle_timeouts += 1
            log.debug("idle timeout conn=%s peer=%s", conn.cid, conn.peer)

    def _protocol_error(self, conn: _Connection, exc: PolicyProtocolError) -> None:
        self.counters.protocol_errors += 1
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

    def _handler_failed(self, conn: _Connection) -> bytes:
        """Count and log (in an ``except`` block) a handler error; the fallback reply."""
        self.counters.handler_errors += 1
        suppressed = self._handler_error_log.take()
        if suppressed is not None:
            log.exception(
                "policy handler failed, answered fallback conn=%s peer=%s suppressed=%d",
                conn.cid,
                conn.peer,
                suppressed,
            )
        return self._error_reply

    def _reply(self, action: str) -> bytes:
        """The encoded answer (cached: few distinct texts); ValueError for a bad one."""
        reply = self._reply_cache.get(action)
        if reply is None:
            reply = encode_reply(action)
            cache = self._reply_cache
            if len(cache) >= _REPLY_CACHE_SIZE:
                cache.clear()
            cache[action] = reply
        return reply


class _Connection(asyncio.Protocol):
    """One client connection: decodes what arrives, answers in order."""

    __slots__ = ("answer", "busy", "cid", "closed", "deadline", "decoder", "eof", "expired",
                 "held", "paused", "peer", "queue", "server", "task", "transport", "turn")

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None  # None until accepted, and after
        self.cid = ""
        self.peer = ""
        self.decoder = PolicyDecoder(server._max_request_bytes, server._max_lines)
        self.queue: deque[dict[str, str]] = deque()  # decoded, not answered yet
        self.task: asyncio.Task[None] | None = None  # awaits ``answer``, then writes it
        self.answer: Awaitable[str] | None = None
        # True from a request's arrival until its answer is handed to the transport.
        self.busy = False
        # Loop time after which the idle sweeper closes the connection. Moved forward when
        # a complete request arrives on an idle connection and when an answer is written;
        # never by partial data, nor by more requests while one waits for its answer.
        self.deadline = 0.0
        self.expired = False  # closed by the sweeper for idleness
        self.paused = False  # the peer does not read its answers: stop answering
        # Requests wait to be answered past this turn of the loop, or _MAX_WAITING of them
        # for an answer (or more undecoded in the decoder): stop reading more.
        self.held = False
        # The rest waits for the loop's next turn (other connections first).
        self.turn: asyncio.Handle | None = None
        self.eof = False  # the peer closed its side: answer what is queued, then close
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.server._accept(self, transport):
            # a stream transport (create_server / create_unix_server), whatever its loop's
            # class for it: no isinstance check (other event loops do not subclass it)
            self.transport = cast(asyncio.Transport, transport)
        else:
            self.closed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # refused, or already gone
        self.transport = None
        self._cancel_task()
        if exc is not None:
            log.debug("connection lost conn=%s peer=%s error=%r", self.cid, self.peer, exc)
        self.server._closed(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or not self._decode(data) or not self.queue:
            return
        if not self.busy:
            self.busy = True
            self.deadline = asyncio.get_running_loop().time() + self.server._idle_timeout_s
        if self.task is None and not self.paused and self.turn is None:
            self._answer_queue()
        if self.busy and (len(self.queue) >= _MAX_WAITING or self.decoder.backlogged):
            self._hold()  # a client that pipelines past a stuck answer gains nothing

    def _decode(self, data: bytes) -> bool:
        """Decode what the queue has room for (the rest stays in the decoder); False when
        the peer broke the protocol (then the connection is aborted)."""
        try:  # (the queue never holds more than _MAX_WAITING)
            self.queue.extend(self.decoder.feed(data, _MAX_WAITING - len(self.queue)))
        except PolicyProtocolError as exc:
            self.server._protocol_error(self, exc)
            self.abort()
            return False
        return True

    def eof_received(self) -> bool:
        if self.decoder.pending_bytes:
            log.debug("eof inside a request conn=%s peer=%s pending_bytes=%d",
                      self.cid, self.peer, self.decoder.pending_bytes)
        self.eof = True
        return self.busy  # keep the socket open (half-closed) for the answers still due

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.paused = False
            if not self.held:
                self.transport.resume_reading()
            if (self.task is None and self.turn is None
                    and (self.queue or self.decoder.backlogged)):
                self._answer_queue()

    # --- answering -------------------------------------------------------------------------

    def _answer_queue(self) -> None:
        """Answer queued requests in order (decoding more from the decoder's backlog) until
        one needs a task, the peer stops reading, none is left, or ``_REQUESTS_PER_TURN``
        were answered: then the rest waits for the loop's next turn."""
        server = self.server
        connection_id.set(self.cid)  # this transport's callbacks share one context
        queue = self.queue
        budget = _REQUESTS_PER_TURN
        while not self.paused and self.transport is not None:
            if not queue:
                if not self.decoder.backlogged:
                    self._idle()
                    return
                if not self._decode(b""):
                    return  # a protocol error further on: aborted
                continue  # answers what it decoded, or idles (only an incomplete request left)
            if not budget:
                self._wait_for_next_turn()
                return
            budget -= 1
            attrs = queue.popleft()
            try:
                result = server._handle_now(attrs)
                if not isinstance(result, str):
                    self.answer = result
                    self.task = asyncio.get_running_loop().create_task(self._finish(result))
                    return
                reply = server._reply(result)
            except Exception:  # not CancelledError (a BaseException): that propagates
                reply = server._handler_failed(self)
            self._write(reply)
        if not queue and not self.decoder.backlogged and self.transport is not None:
            self._idle()

    def _wait_for_next_turn(self) -> None:
        """Let the loop serve the other connections; go on at its next turn, not reading
        more meanwhile."""
        self.turn = asyncio.get_running_loop().call_soon(self._next_turn)
        self._hold()

    def _next_turn(self) -> None:
        self.turn = None
        if self.task is None and self.transport is not None:
            self._answer_queue()

    def _hold(self) -> None:
        """Stop reading until every request received is answered (:meth:`_idle`)."""
        if not self.held and self.transport is not None:
            self.held = True
            self.transport.pause_reading()

    async def _finish(self, answer: Awaitable[str]) -> None:
        server = self.server
        try:
            reply = server._reply(await answer)
        except Exception:  # not CancelledError: a cancelled handler ends the connection
            reply = server._handler_failed(self)
        except asyncio.CancelledError:
            self.task = self.answer = None
            self.abort()
            raise
        self.task = self.answer = None
        if self.transport is None:
            return
        self._write(reply)
        self._answer_queue()

    def _write(self, reply: bytes) -> None:
        """Hand an answer to the transport (open: callers check)."""
        cast(asyncio.Transport, self.transport).write(reply)
        self.server.counters.requests += 1
        self.deadline = asyncio.get_running_loop().time() + self.server._idle_timeout_s

    def _idle(self) -> None:
        """Every request answered: wait for the next one (or close, when it is time)."""
        self.busy = False
        if self.held and self.transport is not None:
            self.held = False
            if not self.paused:
                self.transport.resume_reading()
        if self.eof or self.server._draining:
            self.close()

    # --- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close once the answers written are sent."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close now, whatever is unsent (also when the peer stopped reading)."""
        self._cancel_task()
        if self.transport is not None:
            self.transport.abort()

    def _cancel_task(self) -> None:
        task, answer = self.task, self.answer
        if task is None:
            return
        task.cancel()
        # A task cancelled before its first step never awaits the answer: close it here.
        if inspect.iscoroutine(answer) and inspect.getcoroutinestate(answer) == CORO_CREATED:
            answer.close()


def register_policy_server_metrics(registry: MetricsRegistry, counters: ServerCounters) -> None:
    registry.gauge("mqpolicy_policy_connections", "Open policy connections",
                   lambda: counters.connections_active)
    registry.counter("mqpolicy_policy_connections_total",
                     "Policy connections, by result (refused: over max_connections)",
                     lambda: {("accepted",): counters.connections_accepted,
                              ("refused",): counters.connections_refused},
                     labels=("result",))
    registry.counter("mqpolicy_policy_idle_timeouts_total",
                     "Policy connections closed for idleness", lambda: counters.idle_timeouts)
    registry.counter("mqpolicy_policy_requests_total", "Policy requests answered",
                     lambda: counters.requests)
    registry.counter("mqpolicy_policy_protocol_errors_total",
                     "Malformed or oversized policy requests (connection closed)",
                     lambda: counters.protocol_errors)
    registry.counter("mqpolicy_policy_handler_errors_total",
                     "Policy requests answered with the fallback action after an error",
                     lambda: counters.handler_errors)
