"""``mqpolicy release-agent``: the one part of mqpolicy that runs as root.

Postfix reserves ``postsuper`` for the superuser, and Sendmail's queue is readable by root
only; everything else (policy server, milter, scheduler, feedback) runs as the unprivileged
``mqpolicy`` user and asks this agent, over a unix socket, for exactly these operations:

* **release** held messages by queue id: Postfix ``postsuper -c DIR -H -`` (every id of a
  request on standard input, one run), then ``postqueue -c DIR -i ID`` for each released
  message so it leaves at once; Sendmail ``sendmail -C CF -qI<id> -qQ -Q``, then
  ``-qI<id> -qf``;
* **list** the queue where listing needs root: Sendmail's ``-bp -qQ`` and ``-bp``.
  Postfix's listing is refused: ``postqueue -j`` works for any member of group postdrop,
  so the scheduler runs it itself.

It never deletes nor holds, validates every queue id strictly before anything runs
(:func:`~mqpolicy.scheduler.release_protocol.queue_id_ok`), takes the MTA settings from the policy
file's ``scheduler:`` section (``mta``, ``postfix_config_dir``, ``sendmail_cf``), answers
per id what happened, and logs each request with its peer's credentials (SO_PEERCRED). It
holds no policy: which message leaves when is the scheduler's decision. Requests are done
one at a time. The protocol: :mod:`mqpolicy.scheduler.release_protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import Any, NamedTuple

from mqpolicy.daemon.unix_sockets import OwnedSocket, bind_unix
from mqpolicy.policy.endpoints import Endpoint, parse_endpoint
from mqpolicy.policy.model import MtaKind
from mqpolicy.scheduler.mta_queue import MtaQueue, QueueCommandError
from mqpolicy.scheduler.release_protocol import (
    MAX_REQUEST_BYTES,
    LineDecoder,
    ListRequest,
    Outcome,
    ReleaseProtocolError,
    Request,
    encode,
    listing_answer,
    parse_request,
    queue_id_ok,
    refusal,
    release_answer,
)

__all__ = ["DEFAULT_AGENT_ENDPOINT", "AgentServer", "Peer", "ReleaseAgent", "peer_of"]

log = logging.getLogger("mqpolicy.release_agent")

DEFAULT_AGENT_ENDPOINT = parse_endpoint("unix:/run/mqpolicy-agent/agent.sock")
SOCKET_MODE = 0o660  # owner root, group the process's (the unit's Group=mqpolicy)


class ReleaseAgent:
    """What the agent does for one request, with the MTA behind ``queue`` (an adapter that
    runs the MTA's commands itself). One request at a time."""

    def __init__(self, queue: MtaQueue, mta: MtaKind) -> None:
        self.queue = queue
        self.mta = mta
        self._lock = asyncio.Lock()

    async def answer(self, request: Request) -> dict[str, Any]:
        async with self._lock:
            if isinstance(request, ListRequest):
                return await self._list()
            return await self._release(request.ids)

    async def _list(self) -> dict[str, Any]:
        if self.mta is MtaKind.POSTFIX:
            return refusal("Postfix's queue is listed with postqueue -j by any member of "
                           "group postdrop: the scheduler lists it itself")
        try:
            return listing_answer(await self.queue.snapshot())
        except QueueCommandError as exc:
            return refusal(str(exc))

    async def _release(self, ids: tuple[str, ...]) -> dict[str, Any]:
        outcomes: dict[str, Outcome] = {}
        valid: list[str] = []
        for queue_id in dict.fromkeys(ids):  # once each, in the order asked
            if queue_id_ok(self.mta, queue_id):
                valid.append(queue_id)
            else:
                outcomes[queue_id] = Outcome.INVALID
        error = ""
        released: set[str] = set()
        if valid:
            try:
                released = await self.queue.release(valid)
            except QueueCommandError as exc:
                released, error = exc.released, str(exc)
        unflushed = await self._deliver([q for q in valid if q in released])
        for queue_id in valid:
            if queue_id in released:
                outcomes[queue_id] = (Outcome.RELEASED_NO_FLUSH if queue_id in unflushed
                                      else Outcome.RELEASED)
            else:
                outcomes[queue_id] = Outcome.FAILED if error else Outcome.NOT_HELD
        if unflushed:
            error = "; ".join(filter(None, (error, *sorted(set(unflushed.values())))))
        return release_answer(outcomes, error)

    async def _deliver(self, queue_ids: list[str]) -> dict[str, str]:
        """Immediate delivery of each released message; the error of each that failed."""
        results = await asyncio.gather(*(self.queue.deliver_now([q]) for q in queue_ids),
                                       return_exceptions=True)
        failed: dict[str, str] = {}
        for queue_id, result in zip(queue_ids, results, strict=True):
            if isinstance(result, QueueCommandError):
                failed[queue_id] = str(result)
            elif isinstance(result, BaseException):
                raise result
        return failed


class Peer(NamedTuple):
    """The process at the other end of a unix socket, as the kernel saw it connect."""

    pid: int
    uid: int
    gid: int


_UCRED = struct.Struct("3i")


def peer_of(sock: socket.socket) -> Peer:
    """SO_PEERCRED of a connected unix socket."""
    return Peer(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               _UCRED.size)))


class AgentServer:
    """The agent's unix socket: one request per line, answered in order; idle connections
    are closed after ``idle_timeout_s``; a malformed line is answered with a refusal and
    the connection closed."""

    def __init__(self, agent: ReleaseAgent, endpoint: Endpoint, *,
                 idle_timeout_s: float = 60.0, drain_timeout_s: float = 30.0) -> None:
        if not endpoint.is_unix:
            raise ValueError("the release agent listens on a unix socket")
        self.agent = agent
        self.endpoint = endpoint
        self._idle_timeout_s = idle_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._server: asyncio.Server | None = None
        self._owned: OwnedSocket | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock, self._owned = bind_unix(self.endpoint.path, SOCKET_MODE)
        try:
            self._server = await asyncio.start_unix_server(self._client, sock=sock)
        except BaseException:
            sock.close()
            self._owned.remove()
            raise

    async def close(self) -> None:
        """Stop accepting, let requests in progress finish (within the drain timeout)."""
        if self._server is not None:
            self._server.close()
        if self._owned is not None:
            self._owned.remove()
        if self._clients:
            _, pending = await asyncio.wait(self._clients, timeout=self._drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            peer = peer_of(writer.get_extra_info("socket"))
            await self._serve(peer, reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve(self, peer: Peer, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        decoder = LineDecoder(MAX_REQUEST_BYTES)
        while True:
            async with asyncio.timeout(self._idle_timeout_s):
                data = await reader.read(65536)
            if not data:
                return
            try:
                lines = decoder.feed(data)
                requests = [parse_request(line) for line in lines]
            except ReleaseProtocolError as exc:
                log.warning("malformed request", extra={"fields": {
                    **peer._asdict(), "error": str(exc)}})
                writer.write(encode(refusal(f"malformed request: {exc}")))
                await writer.drain()
                return
            for request in requests:
                writer.write(encode(await self._answer(peer, request)))
                await writer.drain()

    async def _answer(self, peer: Peer, request: Request) -> dict[str, Any]:
        answer = await self.agent.answer(request)
        fields: dict[str, object] = {"peer_pid": peer.pid, "peer_uid": peer.uid,
                                     "peer_gid": peer.gid, "error": answer.get("error", "")}
        if isinstance(request, ListRequest):
            log.info("list", extra={"fields": {**fields,
                                               "entries": len(answer.get("entries", ()))}})
            return answer
        outcomes: dict[str, str] = answer["outcomes"]
        counts: dict[str, int] = {}
        for outcome in outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        log.info("release", extra={"fields": {
            **fields, "ids": len(request.ids), **counts,
            "qids": " ".join(list(outcomes)[:20])}})
        return answer
