"""Postfix policy delegation protocol: an incremental, bounded decoder and the encoders. Pure.

Wire format (Postfix ``SMTPD_POLICY_README``): a request is ``name=value`` lines, each ended
by ``\\n``, and the request is ended by an empty line. The reply is ``action=TEXT\\n\\n``.
Postfix keeps the connection open and sends the next request on it.

Decisions made here (each one tested):

* ``\\r\\n`` is accepted wherever ``\\n`` is (a ``\\r`` directly before a ``\\n`` is dropped);
  a lone ``\\r`` elsewhere is kept as part of the value.
* Bytes are decoded as UTF-8 with ``surrogateescape``: Postfix sends UTF-8 for SMTPUTF8 mail,
  but a client may put raw 8-bit bytes in HELO or an address. Rejecting them would close the
  connection and make Postfix answer ``451`` forever for that mail; instead every byte is kept
  losslessly and deterministically (an invalid byte ``0xNN`` becomes ``U+DCNN``). Code that
  re-encodes a value must use ``errors="surrogateescape"`` (as :func:`encode_request` does).
* A duplicate attribute name: the last one wins.
* An empty line where a request starts (a request without attributes: Postfix never sends
  one) raises :class:`EmptyRequest`. A stream of bare line ends is a flood, not requests.
* A request larger than ``max_request_bytes`` (counting every byte including the line ends
  and the empty line) raises :class:`RequestTooLarge` as soon as that many bytes are
  buffered, even before any line end. More than ``max_lines`` attribute lines raises
  :class:`TooManyLines`. A line without ``=`` or with an empty name raises
  :class:`MalformedLine`.
* After any error the decoder is unusable: every later :meth:`PolicyDecoder.feed` raises
  :class:`DecoderFailed`. Requests completed in the same chunk before the error are
  discarded with it (the caller closes the connection; Postfix treats that as a temporary
  failure).
* ``feed(data, max_requests=N)`` returns at most N requests and examines nothing after the
  N-th: the rest stays buffered (:attr:`PolicyDecoder.backlogged`) until a later
  :meth:`PolicyDecoder.feed`, which may bring no data (``b""``). A caller thus decodes a
  large pipelined read a few requests at a time, and an error further on is raised by the
  feed that reaches it.
* Bytes after the last empty line are kept until more data arrives; at EOF they are simply
  an incomplete request (:attr:`PolicyDecoder.pending_bytes` tells how many).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = [
    "DEFAULT_MAX_LINES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DecoderFailed",
    "EmptyRequest",
    "MalformedLine",
    "PolicyDecoder",
    "PolicyProtocolError",
    "RequestTooLarge",
    "TooManyLines",
    "encode_reply",
    "encode_request",
]

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024
# Postfix sends about 30 attributes; leave ample room for future ones.
DEFAULT_MAX_LINES = 1000

# The empty line that ends a request, when it follows an attribute line.
_END = re.compile(rb"\n\r?\n")
# A request that starts with one of these may be an empty request first: the long way.
_LINE_END_BYTES = frozenset(b"\r\n")
# Every byte but '=' and the line end: deleting them leaves a request's separators.
_NOT_SEPARATORS = bytes(b for b in range(256) if b not in b"=\n")


class PolicyProtocolError(Exception):
    """The peer broke the policy delegation protocol; the connection must be closed."""


class RequestTooLarge(PolicyProtocolError):
    """A request exceeded the maximum size in bytes."""


class TooManyLines(PolicyProtocolError):
    """A request had more attribute lines than allowed."""


class MalformedLine(PolicyProtocolError):
    """An attribute line without ``=`` or with an empty name."""


class EmptyRequest(PolicyProtocolError):
    """An empty line where a request starts: a request without attributes."""


class DecoderFailed(PolicyProtocolError):
    """``feed()`` was called again after the decoder had raised an error."""


class PolicyDecoder:
    """Turns a byte stream into policy requests, incrementally and within bounds.

    ``feed()`` may be given any slicing of the stream (one byte at a time or many requests
    at once) and returns, in order, every request completed by that data.
    """

    __slots__ = ("_backlogged", "_buf", "_error", "_lines", "_max_lines", "_max_request_bytes",
                 "_scan")

    def __init__(
        self,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_lines: int = DEFAULT_MAX_LINES,
    ) -> None:
        if max_request_bytes < 2:
            raise ValueError("max_request_bytes must be at least 2")
        if max_lines < 1:
            raise ValueError("max_lines must be at least 1")
        self._max_request_bytes = max_request_bytes
        self._max_lines = max_lines
        # Bytes of the incomplete request (always starts at a request boundary).
        self._buf = bytearray()
        # Where to resume searching ``_buf`` for the end of the request.
        self._scan = 0
        # Line ends in ``_buf[:_scan]`` (every one ends an attribute line).
        self._lines = 0
        # The last feed stopped at ``max_requests`` with bytes after the last request.
        self._backlogged = False
        self._error: PolicyProtocolError | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes held back: an incomplete request (non-zero at EOF: a truncated request),
        and, after a feed stopped at ``max_requests``, the bytes it did not examine."""
        return len(self._buf)

    @property
    def backlogged(self) -> bool:
        """The last :meth:`feed` stopped at ``max_requests`` with bytes left after the last
        request it returned: they may hold complete requests. Feed again (``b""`` will do)
        before waiting for more data."""
        return self._backlogged

    @property
    def failed(self) -> bool:
        return self._error is not None

    def feed(
        self, data: bytes | bytearray | memoryview, max_requests: int | None = None
    ) -> list[dict[str, str]]:
        """Add ``data``; return the requests it completes (possibly none), at most
        ``max_requests`` of them (all when None; 0 only buffers ``data``).

        Raises a :class:`PolicyProtocolError` subclass when the stream is invalid.
        """
        if self._error is not None:
            raise DecoderFailed("decoder unusable after an earlier protocol error") from (
                self._error
            )
        try:
            return self._feed(data, -1 if max_requests is None else max_requests)
        except PolicyProtocolError as exc:
            self._error = exc
            self._buf.clear()
            self._backlogged = False
            raise

    def _feed(self, data: bytes | bytearray | memoryview, room: int) -> list[dict[str, str]]:
        """``room``: how many requests to return at most (-1: all)."""
        # The usual chunk: exactly one whole request and nothing held back (Postfix sends
        # one request and waits for the answer). One search finds its end; nothing to keep.
        if not self._buf and type(data) is bytes and data.endswith(b"\n\n") and room:
            match = _END.search(data)
            if (match is not None and match.end() == len(data) and len(data) > 2
                    and data[0] not in _LINE_END_BYTES
                    and len(data) <= self._max_request_bytes):
                return [self._parse(data[: match.start() + 1])]
        buf = self._buf
        stream: bytes | bytearray
        if buf:
            buf += data
            stream = buf
        else:
            # Nothing held back (the usual case): work on the chunk itself, no copy.
            stream = data if isinstance(data, bytes) else bytes(data)
        limit = self._max_request_bytes
        requests: list[dict[str, str]] = []
        start = 0
        scan = self._scan
        stopped = False
        while True:
            if len(requests) == room:
                stopped = True
                break
            # An empty line right at the start of a request: a request with no attributes.
            if stream.startswith(b"\n", start) or stream.startswith(b"\r\n", start):
                raise EmptyRequest("empty line where a request starts (no attributes)")
            match = _END.search(stream, scan)
            if match is None:
                break
            end = match.end()
            if end - start > limit:
                raise RequestTooLarge(f"request of {end - start} bytes exceeds {limit}")
            # The attribute lines, each with its line end.
            requests.append(self._parse(bytes(stream[start : match.start() + 1])))
            start = scan = end
        if stream is buf:
            if start:
                del buf[:start]
        elif start < len(stream):
            buf += stream[start:]
        if start:
            scan = 0
            self._lines = 0
        if stopped:
            # What follows the last request returned is not examined yet: no limit applies
            # to it until a feed decodes it.
            self._scan = scan
            self._backlogged = bool(buf)
            return requests
        self._backlogged = False
        if len(buf) > limit:
            raise RequestTooLarge(f"incomplete request of {len(buf)} bytes exceeds {limit}")
        # Resume two bytes back: the end marker (``\n\r\n``) may straddle the next chunk.
        new_scan = max(len(buf) - 2, 0)
        if new_scan > scan:
            self._lines += buf.count(b"\n", scan, new_scan)
        self._scan = new_scan
        if self._lines + buf.count(b"\n", new_scan) > self._max_lines:
            raise TooManyLines(f"request has more than {self._max_lines} lines")
        return requests

    def _parse(self, block: bytes) -> dict[str, str]:
        """``block``: the attribute lines of one request, each ended by ``\\n``."""
        nlines = block.count(b"\n")
        if nlines > self._max_lines:
            raise TooManyLines(f"request has {nlines} lines, more than {self._max_lines}")
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n")
        text = block.decode("utf-8", "surrogateescape")
        # '=' and line ends are ASCII, so they sit at the same places in bytes and text.
        if block.translate(None, _NOT_SEPARATORS) == b"=\n" * nlines:
            # Every line has exactly one '=' (no value contains one): split all at once.
            fields = iter(text.replace("\n", "=").split("="))
            attrs = dict(zip(fields, fields, strict=False))  # drops the '' after the last line
            if "" in attrs:
                raise MalformedLine("attribute line with an empty name")
            return attrs
        attrs = {}
        for line in text[:-1].split("\n"):
            name, sep, value = line.partition("=")
            if not sep:
                raise MalformedLine(f"attribute line without '=': {line[:80]!r}")
            if not name:
                raise MalformedLine(f"attribute line with an empty name: {line[:80]!r}")
            attrs[name] = value
        return attrs


_REPLY_FORBIDDEN = ("\n", "\r", "\x00")


def encode_reply(action: str) -> bytes:
    """``action=<action>\\n\\n``.

    Raises ValueError for an empty action or one containing a line break or NUL (the text
    often carries data from the request: a line break would inject attributes or replies).
    """
    for char in _REPLY_FORBIDDEN:
        if char in action:
            raise ValueError(f"policy action contains {char!r}: {action[:80]!r}")
    if not action.strip():
        raise ValueError("policy action is empty")
    return b"action=" + action.encode("utf-8", "surrogateescape") + b"\n\n"


def encode_request(attrs: Mapping[str, str]) -> bytes:
    """Encode one request as Postfix sends it (for tests and load generators).

    Raises ValueError for no attribute at all (an empty request is a protocol error), a
    name that is empty or contains ``=``, or a name or value containing ``\\r``, ``\\n`` or
    NUL, since those cannot round-trip.
    """
    if not attrs:
        raise ValueError("a request needs at least one attribute")
    parts: list[str] = []
    for name, value in attrs.items():
        if not name or "=" in name:
            raise ValueError(f"invalid attribute name {name!r}")
        for char in _REPLY_FORBIDDEN:
            if char in name or char in value:
                raise ValueError(f"attribute {name!r} contains {char!r}")
        parts.append(f"{name}={value}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8", "surrogateescape")
