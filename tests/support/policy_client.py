"""A policy-protocol client for tests, and a policy server serving a handler for the length
of a ``with`` block (in-process, loopback, port 0)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from mqpolicy.delegation.codec import encode_request
from mqpolicy.delegation.server import PolicyHandler, PolicyServer
from mqpolicy.policy.endpoints import Endpoint

LOCAL = Endpoint(host="127.0.0.1", port=0)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def to(cls, endpoint: Endpoint) -> Client:
        if endpoint.is_unix:
            reader, writer = await asyncio.open_unix_connection(endpoint.path)
        else:
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, within: float = 30) -> str:
        line = await asyncio.wait_for(self.reader.readuntil(b"\n\n"), within)
        assert line.startswith(b"action=")
        return line[len(b"action=") : -2].decode()

    async def ask(self, within: float = 30, **attrs: str) -> str:
        await self.send(encode_request({"request": "smtpd_access_policy", **attrs}))
        return await self.reply(within)

    async def closed_by_server(self, within: float = 30) -> bool:
        """True when the server closes (EOF or reset) within ``within`` s, sending nothing."""
        try:
            data = await asyncio.wait_for(self.reader.read(), within)
        except ConnectionResetError:
            return True
        return data == b""

    def close(self) -> None:
        self.writer.close()

    @property
    def local_port(self) -> int:
        port: int = self.writer.get_extra_info("sockname")[1]
        return port


@contextlib.asynccontextmanager
async def serving(
    handler: PolicyHandler, endpoints: list[Endpoint] | None = None, **kwargs: Any
) -> AsyncIterator[PolicyServer]:
    server = PolicyServer(handler, endpoints or [LOCAL], **kwargs)
    await server.start()
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
