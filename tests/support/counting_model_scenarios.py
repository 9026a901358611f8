"""The policy and the random mail of the counting model test
(tests/contract/test_counting_model.py): the limits as :class:`LimitSpec` (the oracle reads
them, the policy file is written from them) and hypothesis strategies for sequences of
messages with clock steps."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from tests.support.counting_oracle import CountingOracle, LimitSpec, Message

BULK = frozenset({"bulk"})

LIMITS = (
    # spent per recipient at RCPT by whoever decides RCPT
    LimitSpec("per-domain", ("recipient_domain",), "recipients", 4, "1m", 4, "defer"),
    LimitSpec("sender-to-domain", ("sender", "recipient_domain"), "recipients", 3, "1m", 3,
              "defer"),
    # checked at RCPT, spent once per message at the end
    LimitSpec("sender-recipients", ("sender",), "recipients", 10, "1m", 10, "defer"),
    LimitSpec("sender-bytes", ("sender",), "bytes", 1500, "1m", 1500, "defer"),
    LimitSpec("sender-demote", ("sender",), "messages", 2, "1m", 2, "demote",
              demote_to="bulk"),
    # seen by the milter only
    LimitSpec("campaigns", ("sender",), "messages", 2, "1m", 2, "defer", header="X-Campaign"),
    # the bulk lane's (classified by List-Id, or demoted there)
    LimitSpec("bulk-hold", ("sender",), "recipients", 3, "1m", 3, "hold", lanes=BULK),
    LimitSpec("bulk-domain", ("recipient_domain",), "recipients", 4, "1m", 4, "defer",
              lanes=BULK),
)

LANES = ("normal", "bulk")

POLICY = """\
store: {timeout_ms: 5000}
lanes:
  - name: normal
  - name: bulk
    transport: mq-bulk
default_lane: normal
classify:
  - name: lists
    when: {bulk_signals: true}
    lane: bulk
"""


def policy_text(wiring: str) -> str:
    """The policy file of a wiring: P has no ``milter:`` section; M and B have one, the
    milter deciding RCPT (M) or Postfix's policy server (B)."""
    text = POLICY + "limits:\n" + "".join(
        "  " + line + "\n" for spec in LIMITS for line in spec.yaml().splitlines())
    if wiring == "M":
        text += "milter:\n  rcpt_limits: milter\n  timeout: 10s\n"
    elif wiring == "B":
        text += "milter:\n  rcpt_limits: policy_server\n  timeout: 10s\n"
    return text


def new_oracle() -> CountingOracle:
    return CountingOracle(limits=LIMITS, default_lane="normal",
                          header_lanes={"List-Id": "bulk"}, lane_order=LANES)


# Keys that must never share a bucket: a `|` in a part (sender, domain), `%`, a raw byte
# that is not UTF-8 (kept as a lone surrogate), and their escaped look-alikes.
SENDERS = (
    "alice@ex.com",
    "alice@ex.com|victim.org",
    "bob@ex.com",
    "100%@ex.com",
    "100%25@ex.com",
    "\udcffuser@ex.com",
    "%udcffuser@ex.com",
    "",  # the null sender: no sender key
)
DOMAINS = ("victim.org", "target.net", "victim.org|target.net", "pct%.example",
           "caf\udce9.example")
LOCALS = ("ann", "joe", "sue", "max", "kim", "lee", "tom", "eve")


@dataclass(frozen=True)
class Features:
    """What the random mail may contain (all by default); turning one off shows which
    part of the contract an implementation misses."""

    headers: bool = True  # List-Id (the bulk lane) and X-Campaign (a header limit)
    oversize: bool = True  # mail that can never fit: 11 recipients, bodies over 1500 bytes
    clock_back: bool = True  # the clock stepping back
    retries: bool = True  # END-OF-MESSAGE asked twice (P, B)
    overlap: bool = True  # B: the next message's policy requests before this one's milter end


ALL = Features()


@dataclass(frozen=True)
class Step:
    """One message after the clock moved by ``clock_step_ms`` (negative: a step back).

    ``retry_end``: Postfix sends the END-OF-MESSAGE request again (P, B); ``overlap``
    (B): the next message's policy requests come between this message's END-OF-MESSAGE
    and its milter end of message (two connections at once)."""

    clock_step_ms: int
    message: Message
    retry_end: bool = False
    overlap: bool = False


def _fits_always(pairs: list[tuple[str, str]]) -> bool:
    """At most 3 recipients (the bulk lane's per-sender burst)."""
    return len(pairs) <= 3


@st.composite
def messages(draw: st.DrawFn, features: Features = ALL) -> Message:
    # one sender most of the time: its budgets run out, its mail is demoted and held
    sender = draw(st.one_of(st.just(SENDERS[0]), st.sampled_from(SENDERS)))
    many = features.oversize and draw(st.integers(0, 4)) == 0  # up to 11, else up to 3
    pairs = draw(st.lists(st.tuples(st.sampled_from(LOCALS), st.sampled_from(DOMAINS)),
                          min_size=1, max_size=11 if many else 3, unique=True)
                 .filter(lambda p: features.oversize or _fits_always(p)))
    headers: list[tuple[str, bytes]] = [("Subject", b"hello")]
    if features.headers and draw(st.booleans()):
        headers.append(("List-Id", b"<news.ex.com>"))
    if features.headers and draw(st.booleans()):
        headers.append(("X-Campaign", draw(st.sampled_from([b"spring", b"r\xe9sum\xe9",
                                                            b"\xff\xfe"]))))
    largest = 1700 if features.oversize else 1400  # 1500 bytes: the burst of sender-bytes
    big = draw(st.integers(0, 4)) == 0
    body_size = draw(st.integers(1300, largest) if big else st.integers(0, 400))
    return Message(sender, tuple(f"{local}@{domain}" for local, domain in pairs),
                   tuple(headers), body_size)


def clock_steps(features: Features) -> st.SearchStrategy[int]:
    # refill from one unit in 1/10 s to whole budgets
    forward = st.one_of(st.just(0), st.integers(1, 5_000), st.integers(1, 45_000))
    if not features.clock_back:
        return forward
    return st.one_of(forward, st.integers(-30_000, -1))  # back (NTP)


def steps(wiring: str, features: Features = ALL) -> st.SearchStrategy[list[Step]]:
    retries = features.retries and wiring in ("P", "B")
    overlap = features.overlap and wiring == "B"
    step = st.builds(
        Step,
        clock_step_ms=clock_steps(features),
        message=messages(features),
        retry_end=st.booleans() if retries else st.just(False),
        overlap=st.booleans() if overlap else st.just(False),
    )
    return st.lists(step, min_size=1, max_size=10)


# ---------------------------------------------------------------- named scenarios

_PLAIN = (("Subject", b"hello"),)
_LIST = (("Subject", b"hello"), ("List-Id", b"<news.ex.com>"))


def _message(sender: str, recipients: tuple[str, ...], headers: tuple[tuple[str, bytes], ...]
             = _PLAIN, body_size: int = 0) -> Message:
    return Message(sender, recipients, headers, body_size)


SCENARIOS: dict[str, tuple[str, list[Step]]] = {
    # B: a newsletter the milter refuses (6 recipients, the bulk lane's hold limit takes 3
    # at most) ends after another message's RCPT at the same domain: the give-back leaves
    # the domain's budget as if the newsletter never came (the other message's unit stays)
    "give-back-under-a-later-spend": ("B", [
        Step(0, _message("alice@ex.com", (
            "ann@victim.org", "ann@target.net", "ann@victim.org|target.net",
            "joe@victim.org", "joe@target.net", "sue@victim.org"), _LIST), overlap=True),
        Step(1, _message("alice@ex.com|victim.org", ("ann@victim.org",))),
        Step(1, _message("alice@ex.com", ("ann@victim.org",))),
        Step(14_998, _message("alice@ex.com", ("ann@victim.org",))),
    ]),
    # B: the refused newsletter's RCPT spends have all refilled when the milter refuses it
    # 45 s later; the give-back counts the buckets up to then (full), and a clock that then
    # steps back 7 s must find them full, as the memory store does
    "give-back-after-full-refill-then-clock-back": ("B", [
        Step(0, _message("bob@ex.com", (
            "a@target.net", "b@target.net", "c@target.net",
            "a@victim.org", "b@victim.org", "c@victim.org"), _LIST), overlap=True),
        Step(45_000, _message("alice@ex.com", ("x@pct%.example",))),
        Step(-7_000, _message("alice@ex.com", ("y@pct%.example",))),
    ]),
    # B: a message the milter defers (bytes) after the clock stepped back 21 s: the
    # give-back of its RCPT spends does not turn the buckets' clock back
    "give-back-then-clock-back": ("B", [
        Step(0, _message("100%@ex.com", ("ann@target.net",), _LIST, 529)),
        Step(0, _message("alice@ex.com", ("ann@victim.org",), _PLAIN, 1301), overlap=True),
        Step(0, _message("alice@ex.com", ("tom@victim.org|target.net",), _PLAIN, 226),
             retry_end=True, overlap=True),
        Step(-21_253, _message("alice@ex.com", ("ann@victim.org|target.net",))),
    ]),
    # keys that only differ by a `|` moved between their parts, or by an escape's look-alike
    "keys-never-shared": ("P", [
        Step(0, _message("alice@ex.com|victim.org", ("ann@target.net",))),
        Step(0, _message("alice@ex.com", ("ann@victim.org|target.net",))),
        Step(0, _message("100%@ex.com", ("ann@target.net",))),
        Step(0, _message("100%25@ex.com", ("ann@target.net",))),
        Step(0, _message("\udcffuser@ex.com", ("ann@caf\udce9.example",))),
        Step(0, _message("%udcffuser@ex.com", ("ann@caf\udce9.example",))),
    ]),
    # P: demoted to bulk from its third message in a minute (FILTER mq-bulk:), a sender's
    # mail counts in the bulk lane's limits (3 recipients a minute there, then hold; 4 per
    # domain): the fifth message is held by the bulk lane's limit in the same decision, and
    # its RCPT spend is given back
    "demoted-mail-counts-in-the-target-lane": ("P", [
        Step(0, _message("bob@ex.com", ("ann@target.net", "joe@target.net"))),
        Step(0, _message("bob@ex.com", ("ann@victim.org",))),
        Step(0, _message("bob@ex.com", ("joe@victim.org",))),
        Step(0, _message("bob@ex.com", ("sue@victim.org", "max@pct%.example"))),
        Step(0, _message("bob@ex.com", ("kim@pct%.example",))),
    ]),
}
