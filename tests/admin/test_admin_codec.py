"""The admin socket's codec: pure tests, every stream fed at several read sizes."""

from __future__ import annotations

import json

import pytest

from mqpolicy.admin.codec import (
    AdminAnswer,
    AdminDecoder,
    AdminRequest,
    AdminRequestError,
    BadArguments,
    LineDecoder,
    LineTooLong,
    MalformedAnswer,
    MalformedRequest,
    RequestTooLarge,
    decode_answer,
    decode_request,
    encode_answer,
    encode_error,
    encode_request,
)
from tests.support.read_sizes import READ_SIZES, chunked

REQUESTS = [
    AdminRequest("counters.show", {"limit": "per-sender", "key": "a@example.com"}, 1),
    AdminRequest("explain", {"request": "protocol_state=RCPT\nsender=jöran@exämple.de\n",
                             "consume": True}, "two"),
    AdminRequest("queue", {}, None),
    AdminRequest("counters.reset", {"limit": "per-sender", "all": True}, 4),
]
STREAM = b"".join(encode_request(r.op, r.args, r.id) for r in REQUESTS)


def feed_at(data: bytes, size: int, limit: int = 64 * 1024
            ) -> tuple[list[AdminRequest | AdminRequestError], int]:
    decoder = AdminDecoder(limit)
    out: list[AdminRequest | AdminRequestError] = []
    for chunk in chunked(data, size):
        out.extend(decoder.feed(chunk))
    return out, decoder.pending_bytes


def kinds(items: list[AdminRequest | AdminRequestError]) -> list[str]:
    return [item.kind if isinstance(item, AdminRequestError) else item.op for item in items]


@pytest.mark.parametrize("size", READ_SIZES)
def test_stream_split_at_every_read_size_gives_same_requests(size: int) -> None:
    assert feed_at(STREAM, size) == (REQUESTS, 0)


def test_stream_split_at_every_single_offset() -> None:
    for cut in range(len(STREAM) + 1):
        decoder = AdminDecoder()
        assert decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:]) == REQUESTS, cut


def test_an_incomplete_line_waits_for_its_end() -> None:
    decoder = AdminDecoder()
    line = encode_request("queue")
    assert decoder.feed(line[:-1]) == []
    assert decoder.pending_bytes == len(line) - 1
    assert decoder.feed(b"\n") == [AdminRequest("queue", {})]
    assert decoder.pending_bytes == 0


@pytest.mark.parametrize("size", READ_SIZES)
def test_crlf_and_blank_lines_as_a_person_types_them(size: int) -> None:
    typed = b'\r\n\n{"op": "queue"}\r\n  \r\n{"op":"counters.show","args":{"limit":"x"}}\n'
    requests, pending = feed_at(typed, size)
    assert requests == [AdminRequest("queue", {}), AdminRequest("counters.show", {"limit": "x"})]
    assert pending == 0


@pytest.mark.parametrize("size", READ_SIZES)
def test_a_line_over_the_bound_is_one_error_and_the_stream_goes_on(size: int) -> None:
    limit = 100
    big = encode_request("explain", {"request": "x" * 500})
    first, last = encode_request("queue", request_id=1), encode_request("queue", request_id=3)
    requests, pending = feed_at(first + big + last + big, size, limit)
    assert kinds(requests) == ["queue", "too_large", "queue", "too_large"]
    assert requests[2] == AdminRequest("queue", {}, 3)
    assert pending == 0  # the second long line's bytes were dropped, not kept


@pytest.mark.parametrize("size", READ_SIZES)
def test_the_bound_counts_the_line_without_its_end(size: int) -> None:
    limit = 40
    line = encode_request("queue", {"k": "v" * 100})[:limit]  # cut: limit bytes, no end
    for end in (b"\n", b"\r\n"):
        requests, _ = feed_at(line + end + line + b"x" + end, size, limit)
        assert kinds(requests) == ["malformed", "too_large"], end  # at the bound, over it


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"not json", "the request is not JSON"),
        (b"\xff\xfe{}", "the request is not UTF-8"),
        (b"[1, 2]", "the request is not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "the request is nested too deep"),
        (b"{}", "op: the operation's name"),
        (b'{"op": ""}', "op: the operation's name"),
        (b'{"op": 7}', "op: the operation's name"),
        (b'{"op": "queue", "args": [1]}', "args: a JSON object"),
        (b'{"op": "queue", "id": 1.5}', "id: a string, an integer or null"),
        (b'{"op": "queue", "id": true}', "id: a string, an integer or null"),
        (b'{"op": "queue", "argz": {}}', "unknown field(s) 'argz'"),
    ],
)
def test_malformed_requests_say_what_is_wrong(line: bytes, message: str) -> None:
    with pytest.raises(MalformedRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_request(line)


@pytest.mark.parametrize("size", READ_SIZES)
def test_a_malformed_line_is_an_error_in_its_place(size: int) -> None:
    stream = encode_request("queue", request_id=1) + b"{oops\n" + encode_request(
        "queue", request_id=2)
    requests, _ = feed_at(stream, size)
    assert kinds(requests) == ["queue", "malformed", "queue"]


def test_answers_round_trip_and_are_one_ascii_line() -> None:
    result = {"rows": [{"key": "jöran@exämple.de\nx", "raw": "b\udcffyte", "n": 3}]}
    line = encode_answer(result, "id-1")
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
    assert decode_answer(line[:-1]) == AdminAnswer(True, result, id="id-1")
    error = encode_error(BadArguments("no limit named 'x'"), 5)
    assert json.loads(error) == {"id": 5, "ok": False, "error": "bad_arguments",
                                 "message": "no limit named 'x'"}
    assert decode_answer(error[:-1]) == AdminAnswer(False, error="bad_arguments",
                                                    message="no limit named 'x'", id=5)
    assert json.loads(encode_error(RequestTooLarge("big")))["error"] == "too_large"


@pytest.mark.parametrize("line", [b"nope", b'{"ok": "yes"}', b'{"ok": false}',
                                  b'{"ok": false, "error": 1, "message": "m"}'])
def test_malformed_answers(line: bytes) -> None:
    with pytest.raises(MalformedAnswer):
        decode_answer(line)


def test_line_decoder_bound() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LineDecoder(0)
    decoder = LineDecoder(3)
    assert decoder.feed(b"abc\nabcd") == [b"abc", LineTooLong(3)]
    assert decoder.feed(b"efgh\nok\n") == [b"ok"]
