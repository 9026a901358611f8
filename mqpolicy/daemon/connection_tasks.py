"""A small asyncio stream server's listener and connections (metrics, admin socket): a
task per connection, at most so many at once, all cancelled when the server closes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class ConnectionTasks:
    """``server`` (set once listening) and a task per connection: a task of our own (as
    in the policy server), so that cancelling it on close does not trip the stream
    machinery's error logging."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, writer: asyncio.StreamWriter,
              serve: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Serve the connection of ``writer`` with ``serve()`` in a task; False (the
        connection cut at once) when ``max_connections`` are served already."""
        if len(self._tasks) >= self.max_connections:
            writer.transport.abort()
            return False
        task = asyncio.get_running_loop().create_task(serve())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def close(self) -> None:
        """Stop listening; cancel every connection's task."""
        if self.server is not None:
            self.server.close()
        for task in self._tasks:
            task.cancel()

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None
