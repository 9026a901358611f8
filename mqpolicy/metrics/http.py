"""The metrics' small loopback HTTP server: ``GET /metrics`` (Prometheus text),
``GET /top.json`` (busiest keys and sections), ``GET /``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from types import TracebackType
from typing import Final
from urllib.parse import urlsplit

from mqpolicy import __version__
from mqpolicy.daemon.connection_tasks import ConnectionTasks
from mqpolicy.metrics.registry import MetricsRegistry
from mqpolicy.policy.endpoints import Endpoint

log = logging.getLogger("mqpolicy.metrics")

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   408: "Request Timeout", 431: "Request Header Fields Too Large",
                   500: "Internal Server Error"}

_LINGER_S: Final = 2.0

_LINGER_BYTES: Final = 1 << 20

_INDEX: Final = b"mqpolicy\n/metrics  Prometheus metrics\n/top.json  busiest keys and sections\n"


class MetricsServer:
    """HTTP/1.1 on loopback TCP: ``GET /metrics``, ``GET /top.json``, ``GET /``.

    One request per connection (``Connection: close``). A request head larger than
    ``max_request_bytes`` gets 431, one not complete within ``timeout_s`` gets 408 (or
    just a close), anything unparsable 400; over ``max_connections`` a connection is closed
    at once. Answers are written within ``timeout_s`` or the connection is cut. Nothing a
    client sends can stop the server.
    """

    def __init__(
        self,
        registry: MetricsRegistry,
        endpoint: Endpoint,
        *,
        max_request_bytes: int = 8192,
        timeout_s: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        if endpoint.is_unix:
            raise ValueError("metrics listen on HOST:PORT")
        self.registry = registry
        self.endpoint = endpoint
        self._max_request_bytes = max_request_bytes
        self._timeout_s = timeout_s
        self._connections = ConnectionTasks(max_connections)
        self.bound_endpoints: list[Endpoint] = []
        self.responses: Counter[int] = Counter()  # by status code; 0 = closed without one
        registry.counter("mqpolicy_metrics_http_responses_total",
                         "Answers of the metrics HTTP server, by status (0: closed unanswered)",
                         lambda: {(str(code),): n for code, n in self.responses.items()},
                         labels=("code",))

    async def start(self) -> None:
        server = self._connections.server = await asyncio.start_server(
            self._on_connect, self.endpoint.host or "127.0.0.1", self.endpoint.port,
            reuse_address=True,
        )
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            self.bound_endpoints.append(Endpoint(host=host, port=port))
        log.info("metrics listening", extra={"fields": {
            "listen": " ".join(str(e) for e in self.bound_endpoints)}})

    def close(self) -> None:
        self._connections.close()

    async def wait_closed(self) -> None:
        await self._connections.wait_closed()

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
        await self.wait_closed()

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._connections.start(writer, lambda: self._connection(reader, writer)):
            self.responses[0] += 1

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        status = 0
        try:
            head = await self._read_head(reader)
            if isinstance(head, int):
                status = head
                if status:
                    await self._send(writer, status, b"", "text/plain", head_only=False)
                    await self._linger(reader, writer)
                return
            status, body, ctype, head_only = self._route(head)
            await self._send(writer, status, body, ctype, head_only=head_only)
            if status >= 400:
                await self._linger(reader, writer)
        except (ConnectionError, TimeoutError, OSError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            self.responses[status] += 1
            transport = writer.transport
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an error answer: close our side, then read and drop what the client still
        sends (bounded), so that closing with unread input (a TCP reset) does not destroy
        the answer before the client has read it."""
        writer.write_eof()
        dropped = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(self._timeout_s, _LINGER_S)):
                while dropped < _LINGER_BYTES:
                    chunk = await reader.read(65536)
                    if not chunk:
                        return
                    dropped += len(chunk)

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | int:
        """The request head, or a status to answer (0: just close)."""
        buffer = bytearray()
        try:
            async with asyncio.timeout(self._timeout_s):
                while True:
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        end = buffer.find(b"\n\n")
                    if end >= 0:
                        return bytes(buffer[:end])
                    if len(buffer) > self._max_request_bytes:
                        return 431
                    chunk = await reader.read(4096)
                    if not chunk:
                        return 400 if buffer.strip() else 0
                    buffer += chunk
        except TimeoutError:
            return 408 if buffer else 0

    def _route(self, head: bytes) -> tuple[int, bytes, str, bool]:
        if len(head) > self._max_request_bytes:
            return 431, b"", "text/plain", False
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, b"", "text/plain", False
        method, target = parts[0], parts[1].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            return 405, b"", "text/plain", False
        head_only = method == b"HEAD"
        url = urlsplit(target)
        if url.path == "/metrics":
            body = self.registry.render().encode("utf-8", "backslashreplace")
            return 200, body, CONTENT_TYPE, head_only
        if url.path == "/top.json":
            data = {"version": __version__, "time": time.time(),
                    "sections": self.registry.sections()}
            return 200, json.dumps(data).encode("ascii"), "application/json", head_only
        if url.path == "/":
            return 200, _INDEX, "text/plain; charset=utf-8", head_only
        return 404, b"not found\n", "text/plain; charset=utf-8", head_only

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                    ctype: str, *, head_only: bool) -> None:
        headers = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if status == 405:
            headers.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("ascii"))
        if not head_only:
            writer.write(body)
        async with asyncio.timeout(self._timeout_s):
            await writer.drain()
