"""The scheduler's MTA queue when ``scheduler.release_agent`` is set: releases (and a
Sendmail listing, which needs root) are asked of ``mqpolicy release-agent`` over its unix
socket; a Postfix listing is ``postqueue -j``, run by the scheduler itself (any member of
group postdrop may). One connection per request: an agent restarted between two passes is
simply connected to again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from mqpolicy.policy.endpoints import Endpoint
from mqpolicy.scheduler.mta_queue import MtaQueue, QueueCommandError, QueueSnapshot
from mqpolicy.scheduler.release_protocol import (
    LIST_REQUEST,
    MAX_ANSWER_BYTES,
    LineDecoder,
    Outcome,
    ReleaseProtocolError,
    encode,
    parse_listing_answer,
    parse_release_answer,
    release_request,
)

__all__ = ["AgentQueue"]

_RELEASED = frozenset({Outcome.RELEASED, Outcome.RELEASED_NO_FLUSH})


class AgentQueue:
    """:class:`~mqpolicy.scheduler.mta_queue.MtaQueue` through the release agent at ``endpoint``.

    ``lister`` lists the queue (Postfix: the scheduler's own ``postqueue -j``); None asks
    the agent (Sendmail). A release asks the agent to release and deliver at once; the ids
    it released but could not flush make the following :meth:`deliver_now` fail (they
    leave at the next queue run), as the direct adapters' would."""

    def __init__(self, endpoint: Endpoint, instance: str, lister: MtaQueue | None = None,
                 *, timeout_s: float = 300.0) -> None:
        self.endpoint = endpoint
        self._instance = instance
        self._lister = lister
        self._timeout_s = timeout_s
        self._unflushed: set[str] = set()

    @property
    def instance(self) -> str:
        return self._instance

    async def snapshot(self) -> QueueSnapshot:
        if self._lister is not None:
            return await self._lister.snapshot()
        answer = await self._ask(LIST_REQUEST)
        try:
            return parse_listing_answer(answer)
        except ReleaseProtocolError as exc:
            raise QueueCommandError(f"release agent {self.endpoint}: {exc}") from None

    async def release(self, queue_ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(queue_ids))
        if not ids:
            return set()
        answer = await self._ask(release_request(ids))
        try:
            outcomes, error = parse_release_answer(answer)
        except ReleaseProtocolError as exc:
            raise QueueCommandError(f"release agent {self.endpoint}: {exc}") from None
        released = {q for q in ids if outcomes.get(q) in _RELEASED}
        self._unflushed = {q for q in ids if outcomes.get(q) is Outcome.RELEASED_NO_FLUSH}
        refused = [q for q in ids if outcomes.get(q) in (Outcome.FAILED, Outcome.INVALID)
                   or q not in outcomes]
        if refused:
            said = ", ".join(f"{q}: {outcomes.get(q, 'no answer')}" for q in refused[:5])
            raise QueueCommandError(
                f"release agent {self.endpoint}: {len(refused)} of {len(ids)} not released "
                f"({said})" + (f": {error}" if error else ""), released)
        return released

    async def deliver_now(self, queue_ids: Sequence[str]) -> None:
        missed = [q for q in queue_ids if q in self._unflushed]
        self._unflushed.clear()
        if missed:
            raise QueueCommandError(f"release agent {self.endpoint}: {len(missed)} of "
                                    f"{len(queue_ids)} released messages not flushed "
                                    "(they leave at the next queue run)")

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request on a fresh connection; its answer."""
        where = f"release agent {self.endpoint}"
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await asyncio.open_unix_connection(self.endpoint.path)
                try:
                    writer.write(encode(request))
                    await writer.drain()
                    decoder = LineDecoder(MAX_ANSWER_BYTES)
                    while True:
                        data = await reader.read(1 << 20)
                        if not data:
                            raise QueueCommandError(f"{where}: closed without an answer")
                        answers = decoder.feed(data)
                        if answers:
                            return answers[0]
                finally:
                    writer.close()
        except TimeoutError:
            raise QueueCommandError(f"{where}: no answer within {self._timeout_s:g}s") from None
        except ReleaseProtocolError as exc:
            raise QueueCommandError(f"{where}: {exc}") from None
        except OSError as exc:
            raise QueueCommandError(f"{where}: {exc.strerror or exc}") from None
