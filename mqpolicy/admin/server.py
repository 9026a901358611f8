"""``serve``'s admin socket: operators' commands reach the running server here.

A unix socket only (its file mode, set before it listens, decides who may connect),
served on serve's event loop. Requests and answers are lines of JSON
(:mod:`mqpolicy.admin.codec`), answered in order, as many per connection as the client
sends. Each operation is one handler (:data:`AdminHandler`) found by its name: a new
operation is a new entry in the mapping given to :class:`AdminServer`.

Each request is logged at info with the peer's uid and pid (``SO_PEERCRED``), the
operation and how it ended. Nothing a client sends ends the connection or the server: a
bad line, an unknown operation, bad arguments, a handler that fails or overruns
``request_timeout_s`` each get an error answer and the next request is read. A connection
with no request for ``idle_timeout_s`` is closed; past ``max_connections`` a new one is
closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

from mqpolicy.admin.codec import (
    DEFAULT_MAX_REQUEST_BYTES,
    AdminDecoder,
    AdminRequest,
    AdminRequestError,
    OperationFailed,
    UnknownOperation,
    encode_answer,
    encode_error,
)
from mqpolicy.daemon.connection_tasks import ConnectionTasks
from mqpolicy.daemon.unix_sockets import OwnedSocket, bind_unix
from mqpolicy.policy.endpoints import Endpoint

__all__ = ["AdminHandler", "AdminServer", "Peer", "peer_of"]

log = logging.getLogger("mqpolicy.admin")

AdminHandler = Callable[[Mapping[str, Any]], Awaitable[object]]
"""One operation: its arguments in, a JSON-able result out (or an AdminRequestError)."""

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Peer(NamedTuple):
    """Who is on the other end of a unix socket connection (-1: not known)."""

    pid: int = -1
    uid: int = -1
    gid: int = -1


def peer_of(sock: Any) -> Peer:
    """The peer's credentials from ``SO_PEERCRED`` (Linux); unknown elsewhere."""
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return Peer()
    try:
        return Peer(*_PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option,
                                                      _PEERCRED.size)))
    except (OSError, struct.error):
        return Peer()


class AdminServer:
    def __init__(
        self,
        endpoint: Endpoint,
        handlers: Mapping[str, AdminHandler],
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        request_timeout_s: float = 90.0,
        idle_timeout_s: float = 300.0,
        max_connections: int = 16,
    ) -> None:
        if not endpoint.is_unix:
            raise ValueError("the admin socket is a unix socket (unix:/path)")
        self.endpoint = endpoint
        self._handlers = dict(handlers)
        self._max_request_bytes = max_request_bytes
        self._request_timeout_s = request_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._owned: OwnedSocket | None = None
        self._connections = ConnectionTasks(max_connections)
        self.requests = 0
        self.errors = 0

    @property
    def operations(self) -> list[str]:
        return sorted(self._handlers)

    async def start(self) -> None:
        sock, self._owned = bind_unix(self.endpoint.path, self.endpoint.mode)
        try:
            self._connections.server = await asyncio.start_unix_server(self._on_connect,
                                                                       sock=sock)
        except BaseException:
            sock.close()
            self._owned.remove()
            raise
        log.info("admin socket listening", extra={"fields": {
            "listen": str(self.endpoint), "mode": f"{self.endpoint.mode:04o}"}})

    def close(self) -> None:
        """Stop accepting, remove the socket file (if still ours), end every connection."""
        self._connections.close()
        if self._owned is not None:
            self._owned.remove()
            self._owned = None

    async def wait_closed(self) -> None:
        await self._connections.wait_closed()

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._connections.start(writer, lambda: self._connection(reader, writer)):
            log.warning("admin connection refused: too many", extra={"fields": {
                "max_connections": self._connections.max_connections}})

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer.get_extra_info("socket"))
        decoder = AdminDecoder(self._max_request_bytes)
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_timeout_s):
                        chunk = await reader.read(1 << 16)
                except TimeoutError:
                    log.info("admin connection idle, closed",
                             extra={"fields": {"uid": peer.uid, "pid": peer.pid}})
                    return
                if not chunk:
                    return
                for item in decoder.feed(chunk):
                    writer.write(await self._answer(item, peer))
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that does not read its answers
            else:
                writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def _answer(self, item: AdminRequest | AdminRequestError, peer: Peer) -> bytes:
        """The answer line to one request (or to a line that was none)."""
        self.requests += 1
        if isinstance(item, AdminRequestError):
            return self._failed(item, None, "-", peer)
        handler = self._handlers.get(item.op)
        if handler is None:
            unknown = UnknownOperation(f"no operation {item.op!r} (operations: "
                                       f"{', '.join(self.operations)})")
            return self._failed(unknown, item.id, item.op, peer)
        deadline = asyncio.timeout(self._request_timeout_s)
        try:
            async with deadline:
                result = await handler(item.args)
            answer = encode_answer(result, item.id)
        except AdminRequestError as exc:
            return self._failed(exc, item.id, item.op, peer)
        except Exception as exc:  # not CancelledError: a closing server ends the connection
            if isinstance(exc, TimeoutError) and deadline.expired():
                error = OperationFailed(f"no result within {self._request_timeout_s:g}s")
            else:
                log.exception("admin operation failed", extra={"fields": {"op": item.op}})
                error = OperationFailed(f"internal error: {type(exc).__name__}: {exc}")
            return self._failed(error, item.id, item.op, peer)
        log.info("admin request", extra={"fields": {
            "op": item.op, "uid": peer.uid, "pid": peer.pid, "result": "ok"}})
        return answer

    def _failed(self, error: AdminRequestError, request_id: str | int | None, op: str,
                peer: Peer) -> bytes:
        self.errors += 1
        log.info("admin request", extra={"fields": {
            "op": op, "uid": peer.uid, "pid": peer.pid, "result": error.kind,
            "error": str(error)}})
        return encode_error(error, request_id)
