"""Running libmilter (pymilter) for the milter: its socket, its thread, its stop.

The milter binds its socket itself and hands it to libmilter as ``fd:N``: a unix socket
gets its mode before anyone can connect, and a TCP socket gets ``TCP_NODELAY``. libmilter
writes each reply (a header change, then the final answer) with its own ``writev``; without
``TCP_NODELAY`` Nagle's algorithm holds the second write until the MTA acknowledges the
first, which a waiting MTA does only when its delayed-ACK timer fires: ~40 ms per message
that changes a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import Milter

from mqpolicy.daemon.unix_sockets import OwnedSocket, bind_unix
from mqpolicy.decision.service import DecisionService
from mqpolicy.milter.callbacks import PolicyMilter
from mqpolicy.milter.gateway import DecisionGateway
from mqpolicy.policy.endpoints import MilterEndpoint
from mqpolicy.policy.model import ErrorAction, MilterSettings
from mqpolicy.store.hold_records import HoldRecordStore

__all__ = ["MilterRunner", "bind_milter_socket"]

log = logging.getLogger("mqpolicy.milter")


def bind_milter_socket(endpoint: MilterEndpoint, mode: int, backlog: int = 128,
                       ) -> tuple[socket.socket, OwnedSocket | None]:
    """A listening socket for libmilter, and the socket file to remove at the end (ours;
    None for TCP and for an inherited ``fd:N``): unix sockets get ``mode`` before
    ``listen()``, TCP sockets (also inherited ones) get ``TCP_NODELAY``, which accepted
    sockets inherit."""
    if endpoint.kind == "fd":
        sock = socket.socket(fileno=endpoint.fd)
    elif endpoint.kind == "unix":
        sock, owned = bind_unix(endpoint.path, mode)
        try:
            sock.listen(backlog)
        except BaseException:
            sock.close()
            owned.remove()
            raise
        return sock, owned
    else:
        family = socket.AF_INET6 if endpoint.kind == "inet6" else socket.AF_INET
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, family, socket.SOCK_STREAM)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # before listen(): no connection can be accepted without it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(infos[0][4])
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # An inherited socket: connections already queued keep what they had (systemd's
        # NoDelay=true in the .socket unit covers those).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, None


def _describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{address}"
    if sock.family == socket.AF_INET6:
        return f"inet6:{address[1]}@[{address[0]}]"
    return f"inet:{address[1]}@{address[0]}"


class MilterRunner:
    """Runs libmilter (``Milter.runmilter``) in a thread of its own, beside the asyncio loop
    that owns the DecisionService and the signal handlers.

    The loop stays in the main thread because SIGHUP must reload: libmilter turns SIGHUP,
    SIGTERM and SIGINT into "stop" in a signal thread of its own, and a Python signal
    handler only runs in the main thread. libmilter blocks those signals in the threads it
    starts, so the kernel hands them to the main thread and its loop.
    """

    def __init__(
        self,
        service: DecisionService,
        settings: MilterSettings,
        loop: asyncio.AbstractEventLoop,
        on_exit: Callable[[], None] | None = None,
        records: HoldRecordStore | None = None,
    ) -> None:
        self.settings = settings
        self.loop = loop
        self.gateway = DecisionGateway(service, loop, settings, records)
        self.endpoint = ""
        self._on_exit = on_exit
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, Any] | None = None  # family and address to wake the listener
        self._unix: OwnedSocket | None = None  # the socket file to remove at the end
        self._stopping = False
        self.exit_error: BaseException | None = None
        #: True when libmilter stopped by itself (not asked to by :meth:`stop`).
        self.failed = False

    def start(self) -> str:
        """Bind, register with libmilter and start serving; OSError when it cannot bind."""
        settings = self.settings
        sock, self._unix = bind_milter_socket(settings.listen, settings.listen_mode)
        self.endpoint = _describe(sock)
        self._wake = (sock.family, sock.getsockname())
        fd = sock.detach()  # libmilter owns and closes it from now on
        # The one library global: libmilter creates every connection through it.
        Milter.factory = functools.partial(PolicyMilter, self.gateway)
        exception_policy = (Milter.TEMPFAIL if settings.on_error is ErrorAction.TEMPFAIL
                            else Milter.CONTINUE)
        Milter.set_exception_policy(exception_policy)
        self._thread = threading.Thread(
            target=self._run, args=(f"fd:{fd}",), name="libmilter", daemon=True
        )
        self._thread.start()
        return self.endpoint

    def _run(self, conn: str) -> None:
        try:
            Milter.runmilter(self.settings.name, conn, self.settings.mta_timeout_s,
                             rmsock=False)
        except BaseException as exc:
            self.exit_error = exc
        finally:
            if not self._stopping:
                self.failed = True
                log.error("milter stopped unexpectedly",
                          extra={"fields": {"error": repr(self.exit_error)}})
                if self._on_exit is not None:
                    with contextlib.suppress(RuntimeError):  # the loop is gone already
                        self.loop.call_soon_threadsafe(self._on_exit)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def stop(self) -> None:
        """Stop accepting, wait (at most ``drain_timeout``) for messages in flight, then
        return. The loop must keep running meanwhile: those messages need decisions."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        thread = self._thread
        if thread is not None and thread.is_alive():
            # smfi_stop() waits for the listener, which holds its lock while it polls the
            # socket for up to 5 s: connect until the listener has seen the stop flag.
            stopper = loop.run_in_executor(None, Milter.stop)
            for _ in range(500):
                done, _ = await asyncio.wait({stopper}, timeout=0.02)
                if done:
                    break
                await loop.run_in_executor(None, self._wake_listener)
            await stopper
            await loop.run_in_executor(None, thread.join, 10.0)
        self._remove_socket()
        counters = self.gateway.counters
        if not await loop.run_in_executor(None, counters.idle.wait,
                                          self.settings.drain_timeout_s):
            log.warning("milter drain timeout: messages still in flight",
                        extra={"fields": {"messages": counters.messages_active}})

    def _wake_listener(self) -> None:
        """libmilter looks at its stop flag only between accepts (or every 5 s): connect."""
        if self._wake is None:
            return
        family, address = self._wake
        if family in (socket.AF_INET, socket.AF_INET6) and address[0] in ("0.0.0.0", "::"):
            address = ("127.0.0.1", address[1]) if family == socket.AF_INET else ("::1",
                                                                                   *address[1:])
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(address)

    def _remove_socket(self) -> None:
        if self._unix is None:
            return
        owned, self._unix = self._unix, None
        owned.remove()
