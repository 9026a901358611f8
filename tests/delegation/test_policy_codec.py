"""Postfix policy delegation codec: pure tests, every stream fed at several read sizes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqpolicy.delegation.codec import (
    DecoderFailed,
    EmptyRequest,
    MalformedLine,
    PolicyDecoder,
    PolicyProtocolError,
    RequestTooLarge,
    TooManyLines,
    encode_reply,
    encode_request,
)
from mqpolicy.delegation.explanation import parse_request_text
from tests.support.read_sizes import READ_SIZES, chunked

# As Postfix 3.x sends it at RCPT TO (SMTPD_POLICY_README), in Postfix's order.
RCPT_REQUEST: dict[str, str] = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "protocol_name": "ESMTP",
    "client_address": "192.0.2.10",
    "client_name": "mail.example.com",
    "client_port": "52114",
    "reverse_client_name": "mail.example.com",
    "server_address": "192.0.2.1",
    "server_port": "25",
    "helo_name": "mail.example.com",
    "sender": "alice@example.com",
    "recipient": "bob@example.net",
    "recipient_count": "0",
    "queue_id": "",
    "instance": "1f2e.5f8a1b2c.4d3e.0",
    "size": "12345",
    "etrn_domain": "",
    "stress": "",
    "sasl_method": "plain",
    "sasl_username": "alice",
    "sasl_sender": "",
    "ccert_subject": "CN=mail.example.com,O=Example",
    "ccert_issuer": "",
    "ccert_fingerprint": "",
    "ccert_pubkey_fingerprint": "",
    "encryption_protocol": "TLSv1.3",
    "encryption_cipher": "TLS_AES_256_GCM_SHA384",
    "encryption_keysize": "256",
    "policy_context": "submission",
    "compatibility_level": "3.6",
    "mail_version": "3.7.5",
}
EOM_REQUEST: dict[str, str] = {
    **RCPT_REQUEST,
    "protocol_state": "END-OF-MESSAGE",
    "queue_id": "4XyZ1234abc",
    "recipient": "",
    "recipient_count": "3",
}
UTF8_REQUEST: dict[str, str] = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "sender": "jöran@exämple.de",
    "recipient": "用户@例子.广告",
}
STREAM_REQUESTS = [RCPT_REQUEST, EOM_REQUEST, UTF8_REQUEST, {"request": "x"}, RCPT_REQUEST]
STREAM = b"".join(encode_request(r) for r in STREAM_REQUESTS)


def feed_all(
    decoder: PolicyDecoder, chunks: Iterator[bytes] | Sequence[bytes],
    max_requests: int | None = None,
) -> list[dict[str, str]]:
    """Every request in ``chunks``; with ``max_requests``, at most that many per feed, the
    backlog decoded (feeding ``b""``) before the next chunk, as the server does."""
    out: list[dict[str, str]] = []
    for chunk in chunks:
        requests = decoder.feed(chunk, max_requests)
        while True:
            if max_requests is not None:
                assert len(requests) <= max_requests
            out.extend(requests)
            if not decoder.backlogged:
                break
            requests = decoder.feed(b"", max_requests)
    return out


def feed_at(data: bytes, size: int, max_requests: int | None = None,
            **kwargs: int) -> tuple[list[dict[str, str]], int]:
    decoder = PolicyDecoder(**kwargs)
    return feed_all(decoder, chunked(data, size), max_requests), decoder.pending_bytes


# --- decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", READ_SIZES)
def test_stream_split_at_every_read_size_gives_same_requests(size: int) -> None:
    requests, pending = feed_at(STREAM, size)
    assert requests == STREAM_REQUESTS
    assert pending == 0
    # Attribute order is kept as sent.
    assert list(requests[0]) == list(RCPT_REQUEST)


def test_stream_split_at_every_single_offset() -> None:
    data = encode_request(RCPT_REQUEST) + encode_request(UTF8_REQUEST)
    for cut in range(len(data) + 1):
        decoder = PolicyDecoder()
        out = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert out == [RCPT_REQUEST, UTF8_REQUEST], cut


def test_many_requests_in_one_chunk() -> None:
    decoder = PolicyDecoder()
    requests = [
        {"request": "smtpd_access_policy", "recipient": f"r{i}@example.net"} for i in range(50)
    ]
    assert decoder.feed(b"".join(encode_request(r) for r in requests)) == requests


def test_request_completed_across_chunks_then_more_in_same_chunk() -> None:
    decoder = PolicyDecoder()
    assert decoder.feed(b"a=1\nb=2") == []
    assert decoder.feed(b"\n\nc=3\n\nd=") == [{"a": "1", "b": "2"}, {"c": "3"}]
    assert decoder.pending_bytes == 2
    assert decoder.feed(b"4\n\n") == [{"d": "4"}]


@pytest.mark.parametrize("size", READ_SIZES)
def test_crlf_line_ends_accepted(size: int) -> None:
    data = b"request=smtpd_access_policy\r\nsender=a@example.com\r\n\r\nx=1\r\n\n"
    requests, pending = feed_at(data, size)
    assert requests == [{"request": "smtpd_access_policy", "sender": "a@example.com"}, {"x": "1"}]
    assert pending == 0


def test_lone_carriage_return_is_kept_in_value() -> None:
    assert PolicyDecoder().feed(b"a=x\ry\nb=z\r\r\n\n") == [{"a": "x\ry", "b": "z\r"}]


@pytest.mark.parametrize("size", READ_SIZES)
def test_missing_blank_line_at_eof_returns_nothing(size: int) -> None:
    data = encode_request(RCPT_REQUEST)[:-1]  # last attribute line ends, no empty line
    requests, pending = feed_at(data, size)
    assert requests == []
    assert pending == len(data)


def test_value_may_contain_equals_and_be_empty() -> None:
    assert PolicyDecoder().feed(b"a==b=c\nb=\n\n") == [{"a": "=b=c", "b": ""}]
    assert PolicyDecoder().feed(b"a=\nb=\n\n") == [{"a": "", "b": ""}]
    assert PolicyDecoder().feed(b"x=1\ns=CN=a,O=b\ny=\n\n") == [
        {"x": "1", "s": "CN=a,O=b", "y": ""}
    ]


def test_duplicate_attribute_last_wins() -> None:
    assert PolicyDecoder().feed(b"sender=a@x\nsender=b@x\n\n") == [{"sender": "b@x"}]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\n", id="lf"),
        pytest.param(b"\r\n", id="crlf"),
        pytest.param(b"\n" * 256 * 1024, id="256KiB-of-lf"),
        pytest.param(b"\r\n" * 1000, id="crlf-flood"),
        pytest.param(b"\na=b\n\n", id="before-a-request"),
        pytest.param(b"\r\na=b\n\n", id="crlf-before-a-request"),
        pytest.param(STREAM + b"\n", id="after-requests"),
        pytest.param(encode_request(RCPT_REQUEST) + b"\r\n" + encode_request(EOM_REQUEST),
                     id="crlf-between-requests"),
        pytest.param(b"a=b\n\n\n\n", id="three-line-ends"),
    ],
)
@pytest.mark.parametrize("size", READ_SIZES)
def test_empty_request_is_a_protocol_error(data: bytes, size: int) -> None:
    """A request without attributes (an empty line where one starts) is not a request:
    Postfix never sends one."""
    with pytest.raises(EmptyRequest):
        feed_at(data, size)
    with pytest.raises(EmptyRequest):
        feed_at(data, size, max_requests=1)


def test_empty_request_ends_the_decoder_without_reading_on() -> None:
    decoder = PolicyDecoder()
    with pytest.raises(EmptyRequest):
        decoder.feed(b"\n" * 256 * 1024)  # a flood is refused at its first line end
    assert decoder.failed
    assert decoder.pending_bytes == 0
    with pytest.raises(DecoderFailed):
        decoder.feed(b"a=1\n\n")


@pytest.mark.parametrize("size", READ_SIZES)
def test_requests_before_an_empty_one_in_earlier_feeds_were_returned(size: int) -> None:
    decoder = PolicyDecoder()
    data = encode_request(RCPT_REQUEST) + encode_request(UTF8_REQUEST)
    assert feed_all(decoder, chunked(data, size)) == [RCPT_REQUEST, UTF8_REQUEST]
    with pytest.raises(EmptyRequest):
        feed_all(decoder, chunked(b"\r\n" + encode_request(EOM_REQUEST), size))


@pytest.mark.parametrize(("chunk", "expected"), [
    (b"a=b\n\n", [{"a": "b"}]),
    (b"a=b\r\n\r\n", [{"a": "b"}]),
    (b"a=b\n\nc=d\n\n", [{"a": "b"}, {"c": "d"}]),
    (b"a=b\n\r\nc=d\n\n", [{"a": "b"}, {"c": "d"}]),
])
def test_whole_chunks_on_a_fresh_decoder(chunk: bytes, expected: list[dict[str, str]]) -> None:
    """A chunk that ends with a request's end, fed at once (the usual read)."""
    assert PolicyDecoder().feed(chunk) == expected


# --- at most max_requests per feed ------------------------------------------------------


@pytest.mark.parametrize("max_requests", [1, 2, 3, 100])
@pytest.mark.parametrize("size", READ_SIZES)
def test_at_most_max_requests_per_feed_the_rest_on_later_feeds(
    size: int, max_requests: int
) -> None:
    requests, pending = feed_at(STREAM, size, max_requests=max_requests)
    assert requests == STREAM_REQUESTS
    assert pending == 0


def test_a_feed_stops_at_max_requests_and_keeps_the_rest() -> None:
    decoder = PolicyDecoder()
    assert decoder.feed(STREAM, 2) == STREAM_REQUESTS[:2]
    assert decoder.backlogged
    assert decoder.pending_bytes == len(STREAM) - len(encode_request(RCPT_REQUEST)) - len(
        encode_request(EOM_REQUEST))
    assert decoder.feed(b"", 2) == STREAM_REQUESTS[2:4]
    assert decoder.backlogged
    assert decoder.feed(b"", 2) == STREAM_REQUESTS[4:]
    assert not decoder.backlogged
    assert decoder.pending_bytes == 0
    assert decoder.feed(b"", 2) == []


def test_max_requests_zero_only_buffers() -> None:
    decoder = PolicyDecoder()
    assert decoder.feed(encode_request(RCPT_REQUEST), 0) == []
    assert decoder.backlogged
    assert decoder.feed(encode_request(UTF8_REQUEST), 0) == []
    assert decoder.feed(b"") == [RCPT_REQUEST, UTF8_REQUEST]
    assert not decoder.backlogged


def test_stopping_on_an_incomplete_request_then_completing_it() -> None:
    decoder = PolicyDecoder()
    assert decoder.feed(b"a=1\n\nb=2\n", 1) == [{"a": "1"}]
    assert decoder.backlogged  # b=2 is not examined yet
    assert decoder.feed(b"", 1) == []
    assert not decoder.backlogged
    assert decoder.pending_bytes == 4
    assert decoder.feed(b"\n", 1) == [{"b": "2"}]


def test_a_backlog_of_whole_requests_is_not_one_oversized_request() -> None:
    decoder = PolicyDecoder(max_request_bytes=100, max_lines=3)
    request = b"a=" + b"x" * 50 + b"\nb=\nc=\n\n"
    assert decoder.feed(request * 20, 1) == [{"a": "x" * 50, "b": "", "c": ""}]
    assert decoder.pending_bytes == 19 * len(request)  # far more than one request's limits
    rest = feed_all(decoder, [b""], max_requests=1)
    assert rest == [{"a": "x" * 50, "b": "", "c": ""}] * 19


@pytest.mark.parametrize(
    ("after", "error"),
    [
        pytest.param(b"\n", EmptyRequest, id="empty"),
        pytest.param(b"bad line\n\n", MalformedLine, id="malformed"),
        pytest.param(b"b=" + b"x" * 200, RequestTooLarge, id="too-large-incomplete"),
        pytest.param(b"a=1\nb=2\nc=3\nd=4\n", TooManyLines, id="too-many-lines-incomplete"),
    ],
)
def test_an_error_past_max_requests_is_raised_by_the_feed_that_reaches_it(
    after: bytes, error: type[PolicyProtocolError]
) -> None:
    decoder = PolicyDecoder(max_request_bytes=100, max_lines=3)
    assert decoder.feed(b"a=1\n\n" + after, 1) == [{"a": "1"}]
    with pytest.raises(error):
        decoder.feed(b"", 1)


@pytest.mark.parametrize("size", READ_SIZES)
def test_non_utf8_bytes_decoded_with_surrogateescape(size: int) -> None:
    data = b"helo_name=\xff\xfe\x80\nsender=caf\xc3\xa9@x\n\n"
    requests, _ = feed_at(data, size)
    assert requests == [{"helo_name": "\udcff\udcfe\udc80", "sender": "café@x"}]
    # Lossless: re-encoding gives the original bytes back.
    assert encode_request(requests[0]) == data


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", READ_SIZES)
def test_request_at_the_size_limit_is_accepted(size: int) -> None:
    data = b"a=" + b"x" * 94 + b"\n\n"
    assert len(data) == 98
    requests, _ = feed_at(data, size, max_request_bytes=98)
    assert requests == [{"a": "x" * 94}]


@pytest.mark.parametrize("size", READ_SIZES)
def test_request_over_the_size_limit_raises(size: int) -> None:
    data = b"a=" + b"x" * 95 + b"\n\n"
    with pytest.raises(RequestTooLarge):
        feed_at(data, size, max_request_bytes=98)


def test_oversized_raises_before_any_newline() -> None:
    decoder = PolicyDecoder(max_request_bytes=100)
    assert decoder.feed(b"a=" + b"x" * 98) == []  # exactly the limit, still incomplete
    with pytest.raises(RequestTooLarge):
        decoder.feed(b"x")


def test_size_limit_applies_per_request_not_per_chunk() -> None:
    decoder = PolicyDecoder(max_request_bytes=100)
    request = b"a=" + b"x" * 50 + b"\n\n"
    assert decoder.feed(request * 20) == [{"a": "x" * 50}] * 20


@pytest.mark.parametrize("size", READ_SIZES)
def test_too_many_lines_raises(size: int) -> None:
    ok = b"".join(b"a%d=1\n" % i for i in range(5)) + b"\n"
    assert feed_at(ok, size, max_lines=5)[0] == [{f"a{i}": "1" for i in range(5)}]
    with pytest.raises(TooManyLines):
        feed_at(b"".join(b"a%d=1\n" % i for i in range(6)) + b"\n", size, max_lines=5)


def test_too_many_lines_raises_before_request_ends() -> None:
    decoder = PolicyDecoder(max_lines=3)
    assert decoder.feed(b"a=1\nb=2\nc=3\n") == []
    with pytest.raises(TooManyLines):
        decoder.feed(b"d=4\ne")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"no equals sign\n\n", id="no-equals"),
        pytest.param(b"a=1\n=value\n\n", id="empty-name"),
        pytest.param(b"a=1\nbare\r\n\r\n", id="crlf-no-equals"),
        # As many '=' as lines, but one line has none and another two.
        pytest.param(b"a\nb=c=d\n\n", id="equals-count-matches-lines"),
    ],
)
@pytest.mark.parametrize("size", READ_SIZES)
def test_malformed_line_raises(data: bytes, size: int) -> None:
    with pytest.raises(MalformedLine):
        feed_at(data, size)


def test_binary_garbage_raises_protocol_error() -> None:
    garbage = bytes(range(256)) * 8 + b"\n\n"
    with pytest.raises(PolicyProtocolError):
        feed_at(garbage, 16)


def test_decoder_unusable_after_error() -> None:
    decoder = PolicyDecoder()
    with pytest.raises(MalformedLine):
        decoder.feed(b"bad\n\n")
    assert decoder.failed
    with pytest.raises(DecoderFailed):
        decoder.feed(b"a=1\n\n")
    assert issubclass(DecoderFailed, PolicyProtocolError)


def test_error_types_share_the_base() -> None:
    for cls in (RequestTooLarge, TooManyLines, MalformedLine, DecoderFailed):
        assert issubclass(cls, PolicyProtocolError)


def test_constructor_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        PolicyDecoder(max_request_bytes=0)
    with pytest.raises(ValueError):
        PolicyDecoder(max_lines=0)


# --- encoders ------------------------------------------------------------------------------


def test_encode_reply() -> None:
    assert encode_reply("DUNNO") == b"action=DUNNO\n\n"
    assert encode_reply("450 4.7.1 slow down") == b"action=450 4.7.1 slow down\n\n"
    assert encode_reply("REJECT ünïcode") == "action=REJECT ünïcode\n\n".encode()


@pytest.mark.parametrize(
    "action",
    ["DUNNO\n", "REJECT x\naction=OK", "DUNNO\r", "OK\r\n\r\n", "DUNNO\x00", "", "   "],
)
def test_encode_reply_refuses_injection_and_empty(action: str) -> None:
    with pytest.raises(ValueError):
        encode_reply(action)


def test_encode_request() -> None:
    assert encode_request({"a": "1", "b": "x=y"}) == b"a=1\nb=x=y\n\n"


@pytest.mark.parametrize(
    "attrs",
    [{}, {"": "x"}, {"a=b": "x"}, {"a\n": "x"}, {"a": "x\ny"}, {"a": "x\r"}, {"a": "\x00"}],
)
def test_encode_request_refuses_what_cannot_roundtrip(attrs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        encode_request(attrs)


# --- properties ----------------------------------------------------------------------------


def split_by(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, prev = [], 0
    for point in points:
        pieces.append(data[prev:point])
        prev = point
    pieces.append(data[prev:])
    return pieces


# Bytes biased towards the protocol's structure so that both valid and invalid streams occur.
protocol_bytes = st.lists(
    st.one_of(
        st.sampled_from([b"\n", b"\r\n", b"=", b"a", b"name=value\n", b"\r", b"\xff", b"\x00"]),
        st.binary(max_size=8),
    ),
    max_size=60,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(st.binary(max_size=400), protocol_bytes), cuts=st.lists(st.integers(0, 500)))
def test_any_bytes_any_chunking_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    kwargs = {"max_request_bytes": 64, "max_lines": 6}
    whole = PolicyDecoder(**kwargs)
    try:
        whole_result: tuple[list[dict[str, str]], int] | None = (
            whole.feed(data),
            whole.pending_bytes,
        )
    except PolicyProtocolError:
        whole_result = None
    pieces = PolicyDecoder(**kwargs)
    try:
        pieces_result: tuple[list[dict[str, str]], int] | None = (
            feed_all(pieces, split_by(data, cuts)),
            pieces.pending_bytes,
        )
    except PolicyProtocolError:
        pieces_result = None
    # Chunking never changes the outcome: same requests, or an error both ways.
    assert whole_result == pieces_result
    one_at_a_time = PolicyDecoder(**kwargs)
    try:
        one_result: tuple[list[dict[str, str]], int] | None = (
            feed_all(one_at_a_time, split_by(data, cuts), max_requests=1),
            one_at_a_time.pending_bytes,
        )
    except PolicyProtocolError:
        one_result = None
    # Nor does decoding one request per feed.
    assert one_result == whole_result


names = st.text(min_size=1, max_size=20).filter(lambda s: not any(c in s for c in "=\r\n\x00"))
values = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),
).filter(lambda s: not any(c in s for c in "\r\n\x00"))


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(st.dictionaries(names, values, min_size=1, max_size=8), min_size=1,
                      max_size=5),
    cuts=st.lists(st.integers(0, 2000), max_size=30),
)
def test_wellformed_requests_roundtrip(requests: list[dict[str, str]], cuts: list[int]) -> None:
    data = b"".join(encode_request(r) for r in requests)
    decoder = PolicyDecoder()
    assert feed_all(decoder, split_by(data, cuts)) == requests
    assert decoder.pending_bytes == 0


# --- explain's reader ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["a=1", "a=1\n", "a=1\n\n", "a=1\r\n\r\n", "a=1\n\nb=2\n\n"])
def test_explain_reads_the_first_request_whatever_ends_it(text: str) -> None:
    """``mqpolicy explain`` adds a line end to what it is given: a request that already
    ends with its empty line is not followed by an empty request."""
    assert parse_request_text(text) == {"a": "1"}


@pytest.mark.parametrize("text", ["", "\n", "\na=1\n"])
def test_explain_refuses_an_empty_request(text: str) -> None:
    with pytest.raises(EmptyRequest):
        parse_request_text(text)
