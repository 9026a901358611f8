"""An SMTP sink: accepts mail on a loopback port and records every message.

Plain asyncio streams, no third-party SMTP library, so it ships with the package (the
demo and the end-to-end benchmark use it as the "internet" behind a private Postfix).

* Each message is recorded with its envelope, headers, arrival time and raw size, and
  answered ``250 2.0.0 Ok: queued as <sink id>``; the sink id shows up in Postfix's
  delivery log line (``status=sent (250 2.0.0 Ok: queued as S000001)``), which is how a
  test finds out through which transport a message left.
* :meth:`SmtpSink.set_reply` makes the sink answer a given reply (``421 4.7.0 Try again
  later``, ``452 4.2.2 Mailbox full``...) to RCPT TO for chosen recipient domains; a 421
  closes the connection, as a real server does.
* The sink greets with its own host name, which must differ from Postfix's
  ``myhostname`` (else Postfix reports "mail for ... loops back to myself").

:class:`SmtpSink` runs on the caller's event loop; :class:`ThreadedSmtpSink` runs one on
its own thread for synchronous callers (tests, benchmark, demo).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32

DEFAULT_HOSTNAME = "sink.mqpolicy.test"
MAX_LINE = 1 << 20  # bytes; SMTP allows 1000, be lenient
MAX_MESSAGE = 64 << 20


@dataclass(frozen=True, slots=True)
class SinkMessage:
    """One message as the sink received it."""

    sink_id: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    data: bytes
    received_at: float  # time.time()
    size: int  # raw bytes after dot-unstuffing
    peer: str
    helo: str

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), else None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """Every header called ``name`` (case-insensitive), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]


def _address(argument: str, verb: str) -> str | None:
    """``FROM:<a@b> SIZE=1`` → ``a@b``; None when malformed."""
    head, sep, rest = argument.partition(":")
    if not sep or head.strip().upper() != verb:
        return None
    rest = rest.strip()
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            return None
        return rest[1:end]
    return rest.split(" ", 1)[0]


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _parse_headers(data: bytes) -> tuple[tuple[str, str], ...]:
    parsed = BytesHeaderParser(policy=compat32).parsebytes(data)
    return tuple((str(k), str(v)) for k, v in parsed.items())


class SmtpSink:
    """An asyncio SMTP server that records what it receives."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        hostname: str = DEFAULT_HOSTNAME,
        keep_data: bool = True,
        on_message: Callable[[SinkMessage], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname
        self.keep_data = keep_data
        self.messages: list[SinkMessage] = []
        self.connections = 0
        self._on_message = on_message
        self._replies: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------ control

    def set_reply(self, domain: str, reply: str | None) -> None:
        """Answer ``reply`` (e.g. ``421 4.7.0 Try again later``) to RCPT TO for ``domain``;
        ``None`` restores normal acceptance."""
        key = domain.lower().lstrip("@")
        if reply is None:
            self._replies.pop(key, None)
            return
        code = reply[:3]
        if not (code.isdigit() and code[0] in "2345" and (len(reply) == 3 or reply[3] == " ")):
            raise ValueError(f"not an SMTP reply: {reply!r}")
        self._replies[key] = reply

    def clear_replies(self) -> None:
        self._replies.clear()

    async def start(self) -> int:
        """Listen; return the bound port."""
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=MAX_LINE, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and close every connection (sessions see end of file)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if server is not None:
            await server.wait_closed()

    # ------------------------------------------------------------ protocol

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        try:
            await self._session(reader, writer, peer_text)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        def reply(text: str) -> None:
            writer.write(text.encode("utf-8") + b"\r\n")

        reply(f"220 {self.hostname} ESMTP mqpolicy sink")
        await writer.drain()
        helo = ""
        mail_from: str | None = None
        rcpts: list[str] = []
        while True:
            line = await reader.readline()
            if not line:
                return
            text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
            verb, _, argument = text.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                helo, mail_from, rcpts = argument.strip(), None, []
                reply(
                    f"250-{self.hostname}\r\n250-PIPELINING\r\n250-SIZE {MAX_MESSAGE}\r\n"
                    "250-8BITMIME\r\n250 ENHANCEDSTATUSCODES"
                )
            elif verb == "HELO":
                helo, mail_from, rcpts = argument.strip(), None, []
                reply(f"250 {self.hostname}")
            elif verb == "MAIL":
                address = _address(argument, "FROM")
                if address is None:
                    reply("501 5.5.4 Syntax: MAIL FROM:<address>")
                elif mail_from is not None:
                    reply("503 5.5.1 Error: nested MAIL command")
                else:
                    mail_from, rcpts = address, []
                    reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                address = _address(argument, "TO")
                if mail_from is None:
                    reply("503 5.5.1 Error: need MAIL command")
                elif address is None:
                    reply("501 5.5.4 Syntax: RCPT TO:<address>")
                else:
                    special = self._replies.get(_domain(address))
                    if special is None:
                        rcpts.append(address)
                        reply("250 2.1.5 Ok")
                    else:
                        reply(special)
                        if special.startswith("421"):
                            await writer.drain()
                            return
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    reply("554 5.5.1 Error: no valid recipients")
                    await writer.drain()
                    continue
                reply("354 End data with <CR><LF>.<CR><LF>")
                await writer.drain()
                data = await self._read_data(reader)
                if data is None:
                    reply("552 5.3.4 Message too big")
                else:
                    sink_id = self._record(mail_from, rcpts, data, peer, helo)
                    reply(f"250 2.0.0 Ok: queued as {sink_id}")
                mail_from, rcpts = None, []
            elif verb == "RSET":
                mail_from, rcpts = None, []
                reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                reply("221 2.0.0 Bye")
                await writer.drain()
                return
            elif verb == "VRFY":
                reply("252 2.0.0 Cannot VRFY user")
            else:
                reply("502 5.5.2 Error: command not recognized")
            await writer.drain()

    async def _read_data(self, reader: asyncio.StreamReader) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        too_big = False
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("connection closed in DATA")
            if line in (b".\r\n", b".\n"):
                break
            if line.startswith(b"."):
                line = line[1:]
            size += len(line)
            if size > MAX_MESSAGE:
                too_big = True
                chunks.clear()
            elif not too_big:
                chunks.append(line)
        return None if too_big else b"".join(chunks)

    def _record(
        self, mail_from: str, rcpts: Iterable[str], data: bytes, peer: str, helo: str
    ) -> str:
        sink_id = f"S{next(self._ids):06d}"
        message = SinkMessage(
            sink_id=sink_id,
            mail_from=mail_from,
            rcpt_tos=tuple(rcpts),
            headers=_parse_headers(data) if self.keep_data else (),
            data=data if self.keep_data else b"",
            received_at=time.time(),
            size=len(data),
            peer=peer,
            helo=helo,
        )
        self.messages.append(message)
        if self._on_message is not None:
            self._on_message(message)
        return sink_id


class ThreadedSmtpSink:
    """A :class:`SmtpSink` on its own thread and event loop, for synchronous code.

    Usable as a context manager; :meth:`stop` is idempotent.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, hostname: str = DEFAULT_HOSTNAME,
        keep_data: bool = True,
    ) -> None:
        self._lock = threading.Condition()
        self._messages: list[SinkMessage] = []
        self._sink = SmtpSink(host, port, hostname=hostname, keep_data=keep_data,
                              on_message=self._arrived)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def host(self) -> str:
        return self._sink.host

    @property
    def port(self) -> int:
        return self._sink.port

    @property
    def hostname(self) -> str:
        return self._sink.hostname

    def _arrived(self, message: SinkMessage) -> None:
        with self._lock:
            self._messages.append(message)
            self._lock.notify_all()

    def start(self, timeout_s: float = 10.0) -> int:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._stopped = asyncio.Event()
            try:
                await self._sink.start()
            except OSError as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            await self._stopped.wait()
            await self._sink.close()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(main())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="smtp-sink", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise RuntimeError("SMTP sink did not start")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self._sink.port

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopped.set)
        thread.join(timeout=10)

    def __enter__(self) -> ThreadedSmtpSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the sink's loop and wait for it."""
        loop = self._loop
        if loop is None:
            fn()
            return
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        loop.call_soon_threadsafe(run)
        done.wait(5)

    def set_reply(self, domain: str, reply: str | None) -> None:
        """See :meth:`SmtpSink.set_reply`."""
        self._call(lambda: self._sink.set_reply(domain, reply))

    def clear_replies(self) -> None:
        self._call(self._sink.clear_replies)

    def messages(self) -> list[SinkMessage]:
        with self._lock:
            return list(self._messages)

    def count(self) -> int:
        with self._lock:
            return len(self._messages)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def wait_for_subject(self, subject: str, timeout_s: float) -> SinkMessage:
        """The one message with this ``Subject``, once it has arrived (raise on timeout)."""

        def mine(messages: list[SinkMessage]) -> list[SinkMessage]:
            return [m for m in messages if m.header("Subject") == subject]

        (message,) = mine(self.wait_for(lambda messages: bool(mine(messages)), timeout_s))
        return message

    def wait_for(
        self, predicate: Callable[[list[SinkMessage]], bool], timeout_s: float
    ) -> list[SinkMessage]:
        """Wait until ``predicate(messages)`` holds; return the messages (raise on timeout)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not predicate(self._messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"sink: condition not met within {timeout_s}s "
                        f"({len(self._messages)} message(s) received)"
                    )
                self._lock.wait(left)
            return list(self._messages)

