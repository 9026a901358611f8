"""The release agent's protocol (pure): queue ids as the MTAs make them, lines split
anywhere, sizes bounded, answers read back as sent."""

from __future__ import annotations

import json

import pytest

from mqpolicy.policy.model import MtaKind
from mqpolicy.scheduler.mta_queue import QueueEntry, QueueSnapshot
from mqpolicy.scheduler.release_protocol import (
    MAX_IDS,
    LineDecoder,
    ListRequest,
    Outcome,
    ReleaseProtocolError,
    ReleaseRequest,
    encode,
    listing_answer,
    parse_listing_answer,
    parse_release_answer,
    parse_request,
    queue_id_ok,
    refusal,
    release_answer,
    release_request,
)

# Seen: Postfix 3.7 short ids and, with enable_long_queue_ids = yes, long ones; Sendmail
# 8.17 ids from its mailq output (tests/scheduler/test_queue_parsing.py).
POSTFIX_IDS = ["3C72720E2D1", "60D3820C733", "4jjYK03PYdzJ9Wd", "4jjYK03SwFzJ9DF"]
SENDMAIL_IDS = ["5ARLf1a4012345", "5ARLf2b4012346"]
NEVER_IDS = ["", "-", "ALL", "../hold/3C72720E2D1", "3C72720E2D1/", "3C72720E2D1\n",
             "3c72720e2d1", "-d", " 3C72720E2D1", "3C72720E2D1 ALL", "x" * 200,
             "4jjYK03PYdzJ9Wdz",  # the inode part never holds a "z"
             "4jjYK03PYdzJ9W-d"]


@pytest.mark.parametrize("queue_id", POSTFIX_IDS)
def test_postfix_ids_are_accepted_for_postfix_only(queue_id: str) -> None:
    assert queue_id_ok(MtaKind.POSTFIX, queue_id)
    assert not queue_id_ok(MtaKind.SENDMAIL, queue_id)


@pytest.mark.parametrize("queue_id", SENDMAIL_IDS)
def test_sendmail_ids_are_accepted_for_sendmail_only(queue_id: str) -> None:
    assert queue_id_ok(MtaKind.SENDMAIL, queue_id)
    assert not queue_id_ok(MtaKind.POSTFIX, queue_id)


@pytest.mark.parametrize("queue_id", NEVER_IDS)
@pytest.mark.parametrize("mta", list(MtaKind))
def test_what_is_no_queue_id_is_refused(mta: MtaKind, queue_id: str) -> None:
    assert not queue_id_ok(mta, queue_id)


def test_vowels_are_not_in_long_postfix_ids() -> None:
    assert not queue_id_ok(MtaKind.POSTFIX, "4jjYK03PAdzJ9Wd")


@pytest.mark.parametrize("step", [4096, 7, 3, 1])
def test_lines_split_anywhere_decode_the_same(step: int) -> None:
    stream = (encode(release_request(["3C72720E2D1", "4jjYK03PYdzJ9Wd"]))
              + encode({"op": "list"}) + encode(release_request(["60D3820C733"])))
    decoder = LineDecoder(1 << 16)
    got = []
    for i in range(0, len(stream), step):
        got.extend(decoder.feed(stream[i:i + step]))
    assert [parse_request(v) for v in got] == [
        ReleaseRequest(("3C72720E2D1", "4jjYK03PYdzJ9Wd")), ListRequest(),
        ReleaseRequest(("60D3820C733",))]
    assert not decoder.pending


def test_a_line_longer_than_the_bound_is_refused_before_its_end() -> None:
    decoder = LineDecoder(100)
    decoder.feed(b"{" + b" " * 90)
    with pytest.raises(ReleaseProtocolError, match="longer than 100"):
        decoder.feed(b" " * 20)


def test_a_complete_line_longer_than_the_bound_is_refused() -> None:
    with pytest.raises(ReleaseProtocolError, match="longer than 10"):
        LineDecoder(10).feed(encode(release_request(["3C72720E2D1"])))


@pytest.mark.parametrize("line", [b"[1]\n", b"nope\n", b"\xff\n", b"\n", b"[" * 100_000 + b"\n"])
def test_what_is_not_a_json_object_is_refused(line: bytes) -> None:
    with pytest.raises(ReleaseProtocolError):
        LineDecoder(1 << 20).feed(line)


@pytest.mark.parametrize(("request_value", "problem"), [
    ({"op": "delete", "ids": ["3C72720E2D1"]}, "unknown op"),
    ({"op": "hold", "ids": ["3C72720E2D1"]}, "unknown op"),
    ({"ids": ["3C72720E2D1"]}, "unknown op"),
    ({"op": "release"}, "takes ids"),
    ({"op": "release", "ids": ["3C72720E2D1"], "queue": "deferred"}, "takes ids"),
    ({"op": "release", "ids": "3C72720E2D1"}, "list of strings"),
    ({"op": "release", "ids": [1]}, "list of strings"),
    ({"op": "release", "ids": []}, "1 to"),
    ({"op": "release", "ids": ["3C72720E2D1"] * (MAX_IDS + 1)}, "1 to"),
    ({"op": "list", "all": True}, "no arguments"),
])
def test_malformed_requests_are_refused(request_value: dict[str, object], problem: str) -> None:
    with pytest.raises(ReleaseProtocolError, match=problem):
        parse_request(request_value)


def test_a_release_answer_reads_back_per_id() -> None:
    outcomes = {"3C72720E2D1": Outcome.RELEASED, "60D3820C733": Outcome.NOT_HELD,
                "../x": Outcome.INVALID}
    line = encode(release_answer(outcomes, "postsuper exited 1"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    (value,) = LineDecoder(1 << 16).feed(line)
    assert parse_release_answer(value) == (outcomes, "postsuper exited 1")


def test_a_refusal_is_an_error_for_the_reader() -> None:
    with pytest.raises(ReleaseProtocolError, match="no scheduler"):
        parse_release_answer(refusal("no scheduler"))
    with pytest.raises(ReleaseProtocolError, match="no scheduler"):
        parse_listing_answer(refusal("no scheduler"))


def test_an_unknown_outcome_is_an_error() -> None:
    with pytest.raises(ReleaseProtocolError):
        parse_release_answer({"ok": True, "outcomes": {"3C72720E2D1": "deleted"}})


def test_a_listing_reads_back_as_the_snapshot_sent() -> None:
    snapshot = QueueSnapshot(
        [QueueEntry("5ARLf1a4012345", "hold", 1_764_000_000, 312, "a@x.test",
                    ("b@y.test", "c@z.test")),
         QueueEntry("5ARLf2b4012346", "deferred", 1_764_000_060, 400, "", ())],
        {"hold": 1, "deferred": 1}, ["unexpected line: 'x'"])
    (value,) = LineDecoder(1 << 16).feed(encode(listing_answer(snapshot)))
    assert parse_listing_answer(value) == snapshot


@pytest.mark.parametrize("change", [
    {"entries": [{"id": "5ARLf1a4012345"}]},
    {"entries": [{"id": 5, "queue": "hold", "arrival": 0, "size": 0, "sender": "",
                  "recipients": []}]},
    {"counts": {"hold": "1"}},
    {"problems": None},
])
def test_a_listing_of_another_layout_is_an_error(change: dict[str, object]) -> None:
    value = json.loads(encode(listing_answer(QueueSnapshot([], {}, []))))
    value.update(change)
    with pytest.raises(ReleaseProtocolError, match="layout"):
        parse_listing_answer(value)
