"""The admin socket's protocol: one JSON object per line each way. Pure.

A request is one line, ``{"op": "counters.show", "args": {...}, "id": 7}`` (``args`` and
``id`` optional; ``id`` is any JSON string, integer or null and comes back in the answer).
The answer is one line too: ``{"id": 7, "ok": true, "result": ...}``, or
``{"id": 7, "ok": false, "error": "bad_arguments", "message": "..."}``. A connection
carries any number of them, answered in order.

Decisions made here (each one tested):

* A line ends with ``\\n``; a ``\\r`` before it is dropped, blank lines are skipped (a
  person typing into ``socat`` gets answers as a program does).
* A line longer than ``max_line_bytes`` (its end not counted) is one
  :class:`RequestTooLarge`, given as soon as more than that is buffered; the rest of
  that line is dropped as it arrives, and the lines after it are read as usual.
* Every other fault of one line (not UTF-8, not JSON, nested too deep, not an object, no
  ``op``, a field of the wrong type or unknown) is a :class:`MalformedRequest` for that
  line only. :meth:`AdminDecoder.feed` returns each line's request or its error in order,
  rather than raising: the server answers the error and reads on, so that one bad
  request never ends a connection.
* Both ways are ASCII (``ensure_ascii``): JSON escapes every control character, so the
  only line end is the last byte, and a string holding bytes that were not UTF-8 (kept
  as ``surrogateescape`` by the policy codec) travels as ``\\udcNN`` and comes back
  the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "AdminAnswer",
    "AdminDecoder",
    "AdminRequest",
    "AdminRequestError",
    "BadArguments",
    "LineDecoder",
    "LineTooLong",
    "MalformedAnswer",
    "MalformedRequest",
    "OperationFailed",
    "RequestTooLarge",
    "UnknownOperation",
    "decode_answer",
    "decode_request",
    "encode_answer",
    "encode_error",
    "encode_request",
]

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024

RequestId = str | int | None


class AdminRequestError(Exception):
    """Why one request gets an error answer; ``kind`` is the answer's ``error`` field."""

    kind: ClassVar[str] = "error"


class RequestTooLarge(AdminRequestError):
    kind = "too_large"


class MalformedRequest(AdminRequestError):
    kind = "malformed"


class UnknownOperation(AdminRequestError):
    kind = "unknown_operation"


class BadArguments(AdminRequestError):
    """The operation exists; its arguments do not fit it (an unknown limit, a wrong type)."""

    kind = "bad_arguments"


class OperationFailed(AdminRequestError):
    """The operation could not be done (the store or the MTA's queue did not answer)."""

    kind = "failed"


class MalformedAnswer(ValueError):
    """An answer line that is not what a server sends."""


class LineTooLong(NamedTuple):
    """A line over the limit, in place of its bytes."""

    limit: int


class AdminRequest(NamedTuple):
    op: str
    args: Mapping[str, Any]
    id: RequestId = None


class AdminAnswer(NamedTuple):
    """One answer: ``result`` when ``ok``, else ``error`` (a kind) and ``message``."""

    ok: bool
    result: Any = None
    error: str = ""
    message: str = ""
    id: RequestId = None


class LineDecoder:
    """Splits a byte stream into lines, incrementally and within a bound per line."""

    __slots__ = ("_buf", "_dropping", "_max")

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be at least 1")
        self._max = max_line_bytes
        self._buf = bytearray()  # the line begun, not ended yet
        self._dropping = False  # the line begun is too long: its bytes are dropped

    @property
    def pending_bytes(self) -> int:
        """Bytes of a line begun and not ended (kept back until its end arrives)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | LineTooLong]:
        """Every line ``data`` ends, in order (without its line end; blank lines skipped),
        with a :class:`LineTooLong` in place of each line over the bound."""
        out: list[bytes | LineTooLong] = []
        data = bytes(data)
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if self._dropping:
                self._dropping = False
            else:
                self._buf += data[start:end]
                self._line(out)
            self._buf.clear()
            start = end + 1
        if not self._dropping:
            buf = self._buf
            buf += data[start:]
            # over the bound, or at it plus one byte that cannot be the \r of a \r\n
            if len(buf) > self._max + 1 or (len(buf) == self._max + 1
                                            and not buf.endswith(b"\r")):
                out.append(LineTooLong(self._max))
                buf.clear()
                self._dropping = True
        return out

    def _line(self, out: list[bytes | LineTooLong]) -> None:
        line = self._buf[:-1] if self._buf.endswith(b"\r") else self._buf
        if len(line) > self._max:
            out.append(LineTooLong(self._max))
        elif line.strip():
            out.append(bytes(line))


class AdminDecoder:
    """Requests from a byte stream: each line's :class:`AdminRequest`, or the
    :class:`AdminRequestError` that line is."""

    __slots__ = ("_lines",)

    def __init__(self, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        self._lines = LineDecoder(max_request_bytes)

    @property
    def pending_bytes(self) -> int:
        return self._lines.pending_bytes

    def feed(self, data: bytes | bytearray | memoryview
             ) -> list[AdminRequest | AdminRequestError]:
        out: list[AdminRequest | AdminRequestError] = []
        for line in self._lines.feed(data):
            if isinstance(line, LineTooLong):
                out.append(RequestTooLarge(f"request longer than {line.limit} bytes"))
                continue
            try:
                out.append(decode_request(line))
            except MalformedRequest as exc:
                out.append(exc)
        return out


_REQUEST_FIELDS = frozenset({"op", "args", "id"})


def _load_object(line: bytes, what: str) -> dict[str, Any]:
    """One JSON object from ``line``; ValueError saying what is wrong."""
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deep") from None
    except ValueError as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


def _request_id(value: Any) -> RequestId:
    if value is None or isinstance(value, str) or (
            isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError("id: a string, an integer or null")


def decode_request(line: bytes) -> AdminRequest:
    """The request on one line (its end removed); :class:`MalformedRequest` otherwise."""
    try:
        fields = _load_object(line, "the request")
    except ValueError as exc:
        raise MalformedRequest(str(exc)) from None
    unknown = sorted(set(fields) - _REQUEST_FIELDS)
    if unknown:
        raise MalformedRequest(f"unknown field(s) {', '.join(map(repr, unknown))} "
                               "(a request has op, args, id)")
    op = fields.get("op")
    if not isinstance(op, str) or not op:
        raise MalformedRequest("op: the operation's name, a string")
    args = fields.get("args", {})
    if not isinstance(args, dict):
        raise MalformedRequest("args: a JSON object")
    try:
        request_id = _request_id(fields.get("id"))
    except ValueError as exc:
        raise MalformedRequest(str(exc)) from None
    return AdminRequest(op, args, request_id)


def _line(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def encode_request(op: str, args: Mapping[str, Any] | None = None,
                   request_id: RequestId = None) -> bytes:
    request: dict[str, Any] = {"op": op, "args": dict(args or {})}
    if request_id is not None:
        request["id"] = request_id
    return _line(request)


def encode_answer(result: Any, request_id: RequestId = None) -> bytes:
    """A successful answer; TypeError or ValueError for a result JSON cannot carry."""
    return _line({"id": request_id, "ok": True, "result": result})


def encode_error(error: AdminRequestError, request_id: RequestId = None) -> bytes:
    return _line({"id": request_id, "ok": False, "error": error.kind, "message": str(error)})


def decode_answer(line: bytes) -> AdminAnswer:
    """The answer on one line (its end removed); :class:`MalformedAnswer` otherwise."""
    try:
        fields = _load_object(line, "the answer")
        request_id = _request_id(fields.get("id"))
    except ValueError as exc:
        raise MalformedAnswer(str(exc)) from None
    ok = fields.get("ok")
    if ok is True:
        return AdminAnswer(True, fields.get("result"), id=request_id)
    error, message = fields.get("error"), fields.get("message")
    if ok is not False or not isinstance(error, str) or not isinstance(message, str):
        raise MalformedAnswer("an answer has ok true and a result, or ok false, an error "
                              "and a message")
    return AdminAnswer(False, error=error, message=message, id=request_id)
