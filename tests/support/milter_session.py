"""The milter driven through pymilter's test context in libmilter's order, and the asyncio
loop in a thread of its own where the decision service lives (as in ``mqpolicy milter``);
the ``loop`` fixture."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import Milter
import Milter.test  # makes @noreply callbacks answer CONTINUE under test
import pytest
from Milter.testctx import TestCtx as MilterTestCtx

from mqpolicy.milter.callbacks import PolicyMilter
from mqpolicy.milter.gateway import DecisionGateway


class RecordingCtx(MilterTestCtx):  # type: ignore[misc]
    """TestCtx that records the actions, and applies the header changes to the current
    message's headers as the MTA does (libmilter's contract, which Postfix and Sendmail
    follow: an empty value deletes, a change past the last occurrence adds the header)."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[tuple[str, str]] = []
        self.changed: list[tuple[str, int, str]] = []
        self.quarantined: list[str] = []
        self.replies: list[tuple[str, ...]] = []
        self.headers: list[tuple[str, str]] = []  # the current message's, as the MTA has them

    def addheader(self, field: str, value: str, idx: int) -> None:
        self.added.append((field, value))
        self.headers.append((field, value))

    def chgheader(self, field: str, idx: int, value: str) -> None:
        self.changed.append((field, idx, value))
        at = [i for i, (name, _) in enumerate(self.headers) if name.lower() == field.lower()]
        if 1 <= idx <= len(at):
            if value:
                self.headers[at[idx - 1]] = (self.headers[at[idx - 1]][0], value)
            else:
                del self.headers[at[idx - 1]]
        elif value:
            self.headers.append((field, value))

    def header_values(self, field: str) -> list[str]:
        """The current message's values of ``field``, in order."""
        return [value for name, value in self.headers if name.lower() == field.lower()]

    def lanes(self, field: str = "X-MQ-Lane") -> list[str]:
        """Every lane the milter gave, message after message."""
        return [value for name, _, value in self.changed if name == field and value]

    def quarantine(self, reason: str) -> None:
        self.quarantined.append(reason)

    def setreply(self, rcode: str, xcode: str, *msg: str) -> None:
        self.replies.append((rcode, xcode, *msg))


class Session:
    """One MTA connection to a PolicyMilter, driven in libmilter's order."""

    def __init__(self, gateway: DecisionGateway) -> None:
        self.ctx = RecordingCtx()
        self.milter = PolicyMilter(gateway)
        self.milter._setctx(self.ctx)
        self.ctx._stage = -1
        self.opts = list(MilterTestCtx.default_opts)
        assert self.milter.negotiate(self.opts) == Milter.CONTINUE
        self.ctx._opts = self.opts
        self.ctx._protocol = self.opts[1]

    def macro(self, **values: str) -> None:
        for name, value in values.items():
            self.ctx._setsymval(name if len(name) == 1 else "{" + name + "}", value)

    def connect(self, host: str = "mx.example.net", ip: str = "192.0.2.10",
                port: int = 40000) -> int:
        self.ctx._stage = Milter.M_CONNECT
        rc: int = self.milter.connect(host, socket.AF_INET, (ip, port))
        self.ctx._stage = Milter.M_HELO
        self.milter.hello("client.example.net")
        self.ctx._stage = None
        return rc

    def mail(self, sender: str) -> int:
        self.ctx.headers = []  # a new message
        rc: int = self.ctx._envfrom(f"<{sender}>")
        return rc

    def rcpt(self, recipient: str) -> int:
        rc: int = self.ctx._envrcpt(f"<{recipient}>")
        return rc

    def header(self, name: str, value: str | bytes) -> int:
        raw = value if isinstance(value, bytes) else value.encode()
        self.ctx.headers.append((name, raw.decode("utf-8", "surrogateescape")))
        rc: int = self.milter.header_bytes(name, raw)
        return rc

    def body(self, data: bytes) -> int:
        rc: int = self.milter.body(data)
        return rc

    def eom(self) -> int:
        rc: int = self.ctx._eom()
        return rc

    def message(self, sender: str, recipients: Sequence[str],
                headers: Sequence[tuple[str, str | bytes]] = (), body: bytes = b"hello\r\n",
                queue_id: str = "") -> int:
        """A whole transaction; the first answer that is not CONTINUE, else the EOM one."""
        if queue_id:
            self.macro(i=queue_id)
        self.mail(sender)
        for r in recipients:
            rc = self.rcpt(r)
            if rc not in (Milter.CONTINUE,):
                return rc
        for name, value in headers:
            self.header(name, value)
        self.body(body)
        return self.eom()


class Loop:
    """An asyncio loop in a thread of its own: where the decision service lives."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    try:
        yield lp
    finally:
        lp.close()
