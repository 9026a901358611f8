"""Waiting on a condition inside an event loop, as ``mqpolicy.lab.readiness.poll`` waits
outside one: checked between short sleeps (the loop keeps running), with a generous bound
that only a broken system reaches, whatever the machine's speed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mqpolicy.lab.readiness import READY_TIMEOUT_S

__all__ = ["READY_TIMEOUT_S", "poll_async"]


async def poll_async(condition: Callable[[], bool], what: str,
                     timeout_s: float = READY_TIMEOUT_S, interval_s: float = 0.01) -> None:
    """Until ``condition()``; AssertionError naming ``what`` after ``timeout_s``."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, f"timed out after {timeout_s}s waiting for {what}"
        await asyncio.sleep(interval_s)  # between checks; the loop runs meanwhile
