"""Budget keys are unambiguous: one key text for one tuple of key parts and never for
another, whatever the parts hold (``|``, ``%``, bytes that are not UTF-8 kept as lone
surrogates), and every key is text Redis can be sent. A queue id that is not UTF-8 is a
once key like any other: it fails no decision, its own nor the others' in its batch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from mqpolicy.decision.engine import Action, Verdict, once_key_for, store_key
from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.keys import escape_key_part, join_key_parts
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import Policy
from mqpolicy.policy.request import Request
from mqpolicy.store.budget import CounterStore, StoreError, budget_check
from mqpolicy.store.redis import RedisStore
from tests.support.redis_fixture import RedisServer

T0 = 1_760_000_000_000

# any code point, lone surrogates included, with the characters the escaping is about
# drawn often
characters = st.one_of(
    st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=()),
    st.sampled_from(["|", "%", "%25", "%7c", "%u", "\udcff", "\ud800", "\\xff", "u", "7c"]),
)
parts = st.lists(characters, max_size=8).map("".join)
keys = st.lists(parts, min_size=1, max_size=4).map(tuple)


@settings(max_examples=1000, deadline=None)
@given(keys, keys)
def test_the_key_of_one_tuple_is_never_the_key_of_another(
        a: tuple[str, ...], b: tuple[str, ...]) -> None:
    if a != b:
        assert join_key_parts(a) != join_key_parts(b)
    else:
        assert join_key_parts(a) == join_key_parts(b)


@settings(max_examples=1000, deadline=None)
@given(keys)
def test_every_key_is_text_redis_can_be_sent(parts_: tuple[str, ...]) -> None:
    key = join_key_parts(parts_)
    key.encode("utf-8")  # no lone surrogate left: hiredis would raise
    assert key.count("|") == len(parts_) - 1
    once = once_key_for(Request(queue_id="".join(parts_) or "q"))
    assert once is not None
    once.encode("utf-8")


def test_usual_keys_are_kept_as_they_are() -> None:
    for text in ("alice@example.com", "192.0.2.0/24", "2001:db8::/64", "bücher.example"):
        assert escape_key_part(text) == text
    assert join_key_parts(["u", "d.example"]) == "u|d.example"
    assert escape_key_part("a|b%c\udcff") == "a%7cb%25c%udcff"


def test_long_keys_are_hashed_into_a_form_no_short_key_has() -> None:
    policy = policy_with("[sender, recipient_domain]")
    limit = policy.limits[0]
    long_key = "x" * 300
    hashed = store_key(limit, long_key)
    assert len(hashed) < len(limit.bucket_prefix) + 60
    assert hashed.startswith(limit.bucket_prefix + "%sha1:")
    # an escaped key never holds "%s": a short key cannot look like a hashed one
    assert "%s" not in join_key_parts(["%sha1:" + "0" * 40])
    assert store_key(limit, "x" * 301) != hashed


# ------------------------------------------------------------------ through the engine

StoreFactory = Callable[[], CounterStore]


def policy_with(key: str) -> Policy:
    return parse_policy(f"""\
store: {{timeout_ms: 5000}}
lanes: [{{name: normal}}]
default_lane: normal
limits:
  - {{name: pair, key: {key}, rate: 1/1h}}
""")


def decide(policy: Policy, store: CounterStore, requests: list[Request]) -> list[Verdict]:
    async def go() -> list[Verdict]:
        service = DecisionService(policy, store, clock_ms=lambda: T0)
        try:
            return [await service.decide(r) for r in requests]
        finally:
            await store.close()

    return asyncio.run(go())


def rcpt(sender: str, recipient: str) -> Request:
    return Request.from_policy_attributes({"protocol_state": "RCPT", "sender": sender,
                                           "recipient": recipient, "instance": "i1"})


def test_parts_holding_the_separator_do_not_share_a_bucket(each_store: StoreFactory) -> None:
    """(alice@ex.com|victim.org, target.net) and (alice@ex.com, victim.org|target.net) were
    one bucket: the first spent the second's budget."""
    verdicts = decide(policy_with("[sender, recipient_domain]"), each_store(), [
        rcpt("alice@ex.com|victim.org", "x@target.net"),
        rcpt("alice@ex.com", "x@victim.org|target.net"),
        rcpt("alice@ex.com", "y@victim.org|target.net"),
    ])
    assert [v.action for v in verdicts] == [Action.ACCEPT, Action.ACCEPT, Action.DEFER]
    assert verdicts[0].limits[0].key == "alice@ex.com%7cvictim.org|target.net"
    assert verdicts[1].limits[0].key == "alice@ex.com|victim.org%7ctarget.net"
    # logs, explain and counters show the key itself; the client's reply reads as sent
    assert "for alice@ex.com|victim.org|target.net," in verdicts[2].text


def test_a_raw_byte_and_its_printed_form_do_not_share_a_bucket(
        each_store: StoreFactory) -> None:
    """A sender holding the byte 0xff (kept by the codecs as the lone surrogate \\udcff)
    and one holding the four characters \\xff were one bucket."""
    raw = b"a\xff@x.example".decode("utf-8", "surrogateescape")

    def eom(sender: str, queue_id: str) -> Request:  # a sender's budget is spent here
        return Request.from_policy_attributes({
            "protocol_state": "END-OF-MESSAGE", "sender": sender, "queue_id": queue_id})

    verdicts = decide(policy_with("sender"), each_store(), [
        eom(raw, "Q1"), eom("a\\xff@x.example", "Q2"), eom(raw, "Q3")])
    assert [v.action for v in verdicts] == [Action.ACCEPT, Action.ACCEPT, Action.DEFER]
    assert verdicts[0].limits[0].key == "a%udcff@x.example"


def test_an_operator_typed_key_with_a_raw_byte_names_the_same_bucket() -> None:
    """``counters show LIMIT KEY``: a KEY given with the raw byte (as a shell passes it)
    or as printed (%udcff) is the bucket the decisions spent."""
    limit = policy_with("sender").limits[0]
    raw = b"a\xff@x.example".decode("utf-8", "surrogateescape")
    spent = store_key(limit, limit.key_of(rcpt(raw, "r@d.example")) or "")
    assert store_key(limit, raw) == spent == store_key(limit, "a%udcff@x.example")


def test_a_queue_id_that_is_not_utf8_fails_nobody_in_its_batch(redis_clean: RedisServer) -> None:
    """Eleven messages decided at once, one Redis batch: one carries a queue id with the
    byte 0xff. Before, hiredis could not encode its once key and the whole batch failed
    (a store error for all eleven clients); now every one is counted, and the odd one's
    second sighting is a duplicate like any other."""
    policy = parse_policy("""\
store: {timeout_ms: 5000}
lanes: [{name: normal}]
default_lane: normal
limits:
  - {name: per-sender, key: sender, rate: 100/1h}
""")
    odd = b"4Xq\xff1".decode("utf-8", "surrogateescape")

    def eom(queue_id: str) -> Request:
        return Request.from_policy_attributes({
            "protocol_state": "END-OF-MESSAGE", "sender": "s@example.com",
            "queue_id": queue_id, "recipient_count": "1", "size": "100"})

    async def go() -> tuple[list[Verdict], Verdict, int, int]:
        store = RedisStore(redis_clean.unix_url, timeout_ms=5000)
        service = DecisionService(policy, store, clock_ms=lambda: T0)
        try:
            batch = [eom(f"Q{i}") for i in range(5)] + [eom(odd)] + [
                eom(f"Q{i}") for i in range(5, 10)]
            verdicts = await asyncio.gather(*(service.decide(r) for r in batch))
            again = await service.decide(eom(odd))
            return list(verdicts), again, service.stats.store_errors, store.batches_sent
        finally:
            await store.close()

    verdicts, again, errors, batches = asyncio.run(go())
    assert errors == 0
    assert batches == 2  # the eleven together, then the repeat
    assert all(v.action is Action.ACCEPT and not v.store_error for v in verdicts)
    assert sorted(v.limits[0].remaining for v in verdicts) == list(range(89, 100))
    assert again.duplicate
    with redis_clean.client() as client:
        assert client.exists("mqpolicy:seen:4Xq%udcff1")


def test_redis_refuses_a_key_it_cannot_send_to_its_caller_alone(
        redis_clean: RedisServer) -> None:
    """The store's own guard, for a caller that bypasses the engine's escaping: the
    decision with the bad key fails (a StoreError, so its limits follow on_store_error, and
    a ValueError) before it joins a batch; the decisions made beside it are answered."""
    async def go() -> tuple[list[object], int]:
        store = RedisStore(redis_clean.unix_url, timeout_ms=5000)
        good = budget_check("k", 10, 1000, 10, 1)
        try:
            got = await asyncio.gather(
                store.evaluate([good], T0),
                store.evaluate([good._replace(key="bad\udcff")], T0),
                store.evaluate([good], T0, once_key="seen:\udcff"),
                store.evaluate([good], T0),
                return_exceptions=True)
            return list(got), store.batches_sent
        finally:
            await store.close()

    got, batches = asyncio.run(go())
    assert [type(g).__name__ for g in got] == ["Evaluation", "StoreKeyError",
                                               "StoreKeyError", "Evaluation"]
    assert all(isinstance(g, StoreError | ValueError) for g in got[1:3])
    assert batches == 1
