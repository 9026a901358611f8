"""The release agent's protocol (``mqpolicy release-agent``). Pure: bytes in, values out.

One request per line, one answer per line; a line is a JSON object in UTF-8 ending in
``\\n``. A request line is at most :data:`MAX_REQUEST_BYTES` long, an answer line (it may
carry a whole Sendmail listing) at most :data:`MAX_ANSWER_BYTES`::

    {"op": "release", "ids": ["4BqT2x0yKZz3", "A1B2C3D4E5"]}
    {"ok": true, "outcomes": {"4BqT2x0yKZz3": "released", "A1B2C3D4E5": "not-held"}}

    {"op": "list"}
    {"ok": true, "entries": [{"id": ..., "queue": "hold", "arrival": 1764000000,
                              "size": 312, "sender": ..., "recipients": [...]}],
     "counts": {"hold": 1}, "problems": []}

    {"ok": false, "error": "why the whole request was refused"}

A release answer says per id what happened (:class:`Outcome`); ``error`` (when present)
tells why some ids ``failed``. Queue ids are checked strictly (:func:`queue_id_ok`) before
anything runs: the agent is root, and an id ends up on a command line or in a file name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mqpolicy.policy.model import MtaKind
from mqpolicy.scheduler.mta_queue import QueueEntry, QueueSnapshot

__all__ = ["LIST_REQUEST", "MAX_ANSWER_BYTES", "MAX_IDS", "MAX_REQUEST_BYTES", "LineDecoder",
           "ListRequest", "Outcome", "ReleaseProtocolError", "ReleaseRequest", "Request",
           "encode", "listing_answer", "parse_listing_answer", "parse_release_answer",
           "parse_request", "queue_id_ok", "refusal", "release_answer", "release_request"]

MAX_IDS = 10_000
MAX_REQUEST_BYTES = 1 << 20
MAX_ANSWER_BYTES = 64 << 20

# Postfix (src/global/mail_queue.h). Short ids: the microseconds in exactly five upper-case
# hex digits, then the inode number in hex. Long ids (enable_long_queue_ids): seconds (six
# or more) and microseconds (four) in a base-52 alphabet without vowels, "z", then the
# inode number in base 51 (the same alphabet without "z").
_POSTFIX_SHORT = re.compile(r"[0-9A-F]{6,21}")
_SAFE = "0-9BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxy"
_POSTFIX_LONG = re.compile(rf"[{_SAFE}z]{{10,16}}z[{_SAFE}]{{1,13}}")
# Sendmail (sendmail/queue.c, assign_queueid): year, month, day, hour, minute, second and
# two sequence characters from a 60-character alphabet, then the process id, 6+ digits.
_SENDMAIL = re.compile(r"[0-9A-Za-x]{8}[0-9]{5,10}")


def queue_id_ok(mta: MtaKind, queue_id: str) -> bool:
    """Whether ``queue_id`` is a queue id ``mta`` can have given (and nothing else)."""
    if mta is MtaKind.SENDMAIL:
        return _SENDMAIL.fullmatch(queue_id) is not None
    return (_POSTFIX_SHORT.fullmatch(queue_id) is not None
            or _POSTFIX_LONG.fullmatch(queue_id) is not None)


class ReleaseProtocolError(ValueError):
    """A line that is not a well-formed request or answer."""


class Outcome(StrEnum):
    """What the agent did with one queue id."""

    RELEASED = "released"  # out of hold, immediate delivery asked for
    RELEASED_NO_FLUSH = "released-no-flush"  # out of hold; leaves at the next queue run
    NOT_HELD = "not-held"  # the MTA released nothing by that id (not on hold, or gone)
    INVALID = "invalid"  # not a queue id of this MTA: nothing was run
    FAILED = "failed"  # the release command failed (see the answer's error)


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ListRequest:
    pass


Request = ReleaseRequest | ListRequest


class LineDecoder:
    """Splits a byte stream into JSON objects, one per line; a line longer than
    ``max_bytes`` (or one that is not a JSON object) raises ReleaseProtocolError."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished line are waiting."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        objects: list[dict[str, Any]] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_bytes:
                    raise ReleaseProtocolError(f"line longer than {self.max_bytes} bytes")
                return objects
            if end > self.max_bytes:
                raise ReleaseProtocolError(f"line longer than {self.max_bytes} bytes")
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            objects.append(_object(line))


def _object(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ReleaseProtocolError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ReleaseProtocolError("not a JSON object")
    return value


def encode(value: dict[str, Any]) -> bytes:
    """One line of the protocol (a request or an answer)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


# ---------------------------------------------------------------- requests


def parse_request(value: dict[str, Any]) -> Request:
    op = value.get("op")
    if op == "list":
        if set(value) != {"op"}:
            raise ReleaseProtocolError("list takes no arguments")
        return ListRequest()
    if op != "release":
        raise ReleaseProtocolError(f"unknown op {op!r} (release, list)")
    if set(value) != {"op", "ids"}:
        raise ReleaseProtocolError("release takes ids, nothing else")
    ids = value["ids"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ReleaseProtocolError("ids is a list of strings")
    if not 0 < len(ids) <= MAX_IDS:
        raise ReleaseProtocolError(f"1 to {MAX_IDS} ids per request, not {len(ids)}")
    return ReleaseRequest(tuple(ids))


def release_request(ids: list[str]) -> dict[str, Any]:
    return {"op": "release", "ids": ids}


LIST_REQUEST: dict[str, Any] = {"op": "list"}


# ---------------------------------------------------------------- answers


def refusal(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


def release_answer(outcomes: dict[str, Outcome], error: str = "") -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": True, "outcomes": {q: str(o) for q, o in outcomes.items()}}
    if error:
        answer["error"] = error
    return answer


def _checked(value: dict[str, Any]) -> dict[str, Any]:
    if value.get("ok") is not True:
        error = value.get("error")
        raise ReleaseProtocolError(f"refused: {error if isinstance(error, str) else value!r}")
    return value


def parse_release_answer(value: dict[str, Any]) -> tuple[dict[str, Outcome], str]:
    """(outcome per id, error text or '')."""
    outcomes = _checked(value).get("outcomes")
    if not isinstance(outcomes, dict):
        raise ReleaseProtocolError("a release answer has outcomes")
    try:
        parsed = {str(q): Outcome(o) for q, o in outcomes.items()}
    except ValueError as exc:
        raise ReleaseProtocolError(str(exc)) from None
    error = value.get("error", "")
    return parsed, error if isinstance(error, str) else repr(error)


def listing_answer(snapshot: QueueSnapshot) -> dict[str, Any]:
    return {"ok": True,
            "entries": [{"id": e.queue_id, "queue": e.queue_name, "arrival": e.arrival_time,
                         "size": e.size, "sender": e.sender, "recipients": list(e.recipients)}
                        for e in snapshot.entries],
            "counts": snapshot.counts, "problems": snapshot.problems}


def parse_listing_answer(value: dict[str, Any]) -> QueueSnapshot:
    value = _checked(value)
    try:
        entries = [QueueEntry(_str(e["id"]), _str(e["queue"]), _int(e["arrival"]),
                              _int(e["size"]), _str(e["sender"]),
                              tuple(_str(r) for r in e["recipients"]))
                   for e in value["entries"]]
        counts = {_str(k): _int(v) for k, v in value["counts"].items()}
        problems = [_str(p) for p in value["problems"]]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ReleaseProtocolError(f"a listing answer of another layout: {exc!r}") from None
    return QueueSnapshot(entries, counts, problems)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    return value
