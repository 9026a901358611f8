"""The cells of the counting contract (issue 16), as scenarios any MTA wiring runs: a
header limit, lane-scoped limits, demotion, hold, the give-back of a message refused at the
end of data, and a message that can never fit.

One policy holds every cell's limits (:data:`CELLS`); each cell's limits apply only to mail
whose HELO name ends in the cell's domain (``*.header.cells.test``...), and each run of a
cell sends with a HELO name (the key of its limits) and a recipient domain of its own, so
one running MTA and one ``mqpolicy serve`` serve every cell, in any order.

Expected values come from the contract (/work/prompts/counting_contract.md, the README's
"How counting works"), never from the code: a wiring only says whether its front-ends see
the headers (a milter is wired) and what its MTA shows (the lane a message left in, the
hold queue, the budgets left). Three witness limits, with budgets no cell reaches, count
every cell's mail: messages and recipients per HELO name (spent once per message that
leaves, in any wiring) and a destination budget per recipient domain (spent per recipient
at RCPT, given back when the message is refused or held).

Every rate refills a unit in minutes at the fastest, so that a budget read a little after
a decision on a loaded machine is still what the decision left.
"""

from __future__ import annotations

import smtplib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import yaml

from mqpolicy.lab.readiness import poll
from mqpolicy.lab.smtp_client import Reply, Submission, make_message, submit_on

WITNESS = 1000  # the witnesses' budget: no cell spends it

CELLS = f"""\
classify:
  - name: bulk-by-envelope
    when: {{sender: "@.bulk.cells.test"}}
    lane: bulk
  - name: bulk-by-headers
    when: {{bulk_signals: true}}
    lane: bulk
limits:
  # witnesses: every cell's mail
  - name: cell-messages
    rate: {WITNESS}/1w
    key: helo_name
    count: messages
    when: {{helo_name: "*.cells.test"}}
  - name: cell-recipients
    rate: {WITNESS}/1w
    key: helo_name
    count: recipients
    when: {{helo_name: "*.cells.test"}}
  - name: cell-destination
    rate: {WITNESS}/1w
    key: recipient_domain
    when: {{helo_name: "*.cells.test"}}
  # recipient-keyed, spent at RCPT: one message an hour per recipient
  - name: per-recipient
    rate: 1/1h
    key: recipient
    when: {{helo_name: "*.rcpt.cells.test"}}
  # a header limit: one campaign message an hour
  - name: header-once
    rate: 1/1h
    key: helo_name
    count: messages
    when: {{helo_name: "*.header.cells.test", header: {{name: X-Campaign, regex: spring}}}}
  - name: header-destination
    rate: 2/1h
    key: recipient_domain
    when: {{helo_name: "*.header.cells.test", header: {{name: X-Campaign, regex: spring}}}}
  # lane-scoped: recipients of the normal lane only
  - name: normal-recipients
    rate: 10/1h
    key: helo_name
    count: recipients
    lanes: [normal]
    when: {{helo_name: "*.lane.cells.test"}}
  - name: normal-destination
    rate: 10/1h
    key: recipient_domain
    lanes: [normal]
    when: {{helo_name: "*.lane.cells.test"}}
  # lane-scoped, held: recipients of the bulk lane
  - name: bulk-hold
    rate: 10/1h
    key: helo_name
    count: recipients
    lanes: [bulk]
    action: hold
    when: {{helo_name: "*.hold.cells.test"}}
  # demotion: the second message and later go to bulk, where a hold limit waits
  - name: demote-after-one
    rate: 1/1h
    key: helo_name
    count: messages
    action: {{demote: bulk}}
    when: {{helo_name: "*.demote.cells.test"}}
  - name: demoted-bulk-hold
    rate: 5/1h
    key: helo_name
    count: recipients
    lanes: [bulk]
    action: hold
    when: {{helo_name: "*.demote.cells.test"}}
  - name: demoted-normal-recipients
    rate: 100/1d
    key: helo_name
    count: recipients
    lanes: [normal]
    when: {{helo_name: "*.demote.cells.test"}}
  # give-back: a bytes budget refuses at the end of data; a destination budget spent at RCPT
  - name: giveback-bytes
    rate: 5000/1d
    key: helo_name
    count: bytes
    when: {{helo_name: "*.giveback.cells.test"}}
  - name: giveback-destination
    rate: 5/1h
    key: recipient_domain
    when: {{helo_name: "*.giveback.cells.test"}}
  # never fits: 51 recipients against a burst of 50
  - name: per-user
    rate: 200/1d
    burst: 50
    key: helo_name
    count: recipients
    when: {{helo_name: "*.oversize.cells.test"}}
  - name: per-user-held
    rate: 200/1d
    burst: 50
    key: helo_name
    count: recipients
    oversize: hold
    when: {{helo_name: "*.bighold.cells.test"}}
"""


def _bursts() -> dict[str, int]:
    """Each limit of :data:`CELLS` and its burst (the rate's count unless given)."""
    limits = yaml.safe_load(CELLS)["limits"]
    return {lim["name"]: int(lim.get("burst", str(lim["rate"]).split("/")[0]))
            for lim in limits}


BURSTS = _bursts()
# what wiring P never matches
HEADER_CONDITIONED = ("bulk-by-headers", "header-once", "header-destination")

LIST_HEADERS = {"List-Id": "<weekly.news.cells.test>", "Precedence": "list"}
BULK_BY = ("envelope", "headers")  # how a cell's bulk mail is classified


class Wiring(Protocol):
    """An MTA wired to mqpolicy, running :data:`CELLS`."""

    name: str

    @property
    def sees_headers(self) -> bool:
        """A milter is wired: header conditions and header lanes apply."""

    def send(self, helo: str, sender: str, recipients: Sequence[str], subject: str,
             headers: Mapping[str, str] | None = None, body: str = "") -> Submission:
        """One message over SMTP, greeting with ``helo``."""

    def lane_left_in(self, subject: str) -> str:
        """The lane the message with this subject left in, once it has arrived."""

    def wait_held(self, sent: Submission, subject: str) -> None:
        """Until the message is in the MTA's hold queue (quarantine); AssertionError when
        it is delivered instead."""

    def held_records(self, destination: str) -> list[tuple[str, int]]:
        """(lane, held) of the hold records the server holds for this destination."""

    def remaining(self, limit: str, key: str) -> int:
        """The budget left of ``limit`` for ``key`` (a full one when never used)."""

    def queue_id(self, sent: Submission) -> str:
        """The MTA's queue id of an accepted message."""

    def recipients_of(self, subject: str) -> tuple[str, ...]:
        """The recipients the message with this subject was delivered to."""

    def serve_log(self) -> str:
        """What ``mqpolicy serve`` logged so far."""


@dataclass(frozen=True, slots=True)
class Run:
    """One run of a cell: its HELO name (the key of its limits), a recipient domain and a
    sender domain of its own."""

    helo: str
    domain: str
    tag: str

    @classmethod
    def of(cls, cell: str) -> Run:
        tag = uuid.uuid4().hex[:10]
        return cls(f"c{tag}.{cell}.cells.test", f"d{tag}.{cell}.rcpt.test", tag)

    def rcpts(self, count: int, start: int = 0) -> list[str]:
        return [f"r{i}@{self.domain}" for i in range(start, start + count)]

    def subject(self, what: str) -> str:
        return f"{what} {self.tag}"


def send_with_helo(port: int, helo: str, sender: str, recipients: Sequence[str],
                   subject: str, headers: Mapping[str, str] | None = None,
                   body: str = "", timeout_s: float = 60.0) -> Submission:
    """One message to 127.0.0.1:``port`` after ``EHLO helo`` (the key of the cells'
    limits: smtplib sends no greeting of its own before MAIL)."""
    message = make_message(sender, recipients, subject, body, headers)
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=timeout_s) as conn:
        code, text = conn.ehlo()
        assert code == 250, (code, text)
        return submit_on(conn, sender, recipients, message)


def refused_at_end(sent: Submission) -> Reply:
    """Every recipient accepted, the message refused after DATA: that reply."""
    assert all(reply.ok for _, reply in sent.rcpts), sent.replies()
    assert sent.data is not None and not sent.data.ok, sent.replies()
    return sent.data


def budget(wiring: Wiring, limit: str, key: str, expected: int) -> None:
    """``limit``'s budget left for ``key`` is ``expected``."""
    left = wiring.remaining(limit, key)
    assert left == expected, (f"wiring {wiring.name}: {limit} has {left} left for {key}, "
                              f"expected {expected}")


def witnesses(wiring: Wiring, run: Run, *, messages: int, recipients: int) -> None:
    """The witnesses count ``messages`` messages and ``recipients`` recipients for this
    run: what left (held mail and refused mail cost nothing), each once."""
    spent = {
        "cell-messages": WITNESS - wiring.remaining("cell-messages", run.helo),
        "cell-recipients": WITNESS - wiring.remaining("cell-recipients", run.helo),
        "cell-destination": WITNESS - wiring.remaining("cell-destination", run.domain),
    }
    expected = {"cell-messages": messages, "cell-recipients": recipients,
                "cell-destination": recipients}
    assert spent == expected, f"wiring {wiring.name}: spent {spent}, expected {expected}"


# ---------------------------------------------------------------- the cells


def refused_recipient(wiring: Wiring) -> None:
    """``per-recipient`` (1/1h, key recipient) is spent at RCPT: a second message to the
    same recipient and a new one defers only the first (4xx at its RCPT), goes to the new
    one, and counts one recipient, not two."""
    run = Run.of("rcpt")
    sender = f"r@{run.tag}.cells.test"
    old, new = run.rcpts(2)
    first = wiring.send(run.helo, sender, [old], run.subject("first"))
    assert first.queued, first.replies()
    second = wiring.send(run.helo, sender, [old, new], run.subject("second"))
    replies = dict(second.rcpts)
    assert 400 <= replies[old].code < 500, second.replies()
    assert replies[new].ok and second.queued, second.replies()
    assert wiring.lane_left_in(run.subject("second")) == "normal"
    assert wiring.recipients_of(run.subject("second")) == (new,)
    budget(wiring, "per-recipient", old, 0)
    budget(wiring, "per-recipient", new, 0)
    witnesses(wiring, run, messages=2, recipients=2)


def header_limit(wiring: Wiring) -> None:
    """``header-once`` (1/1h, ``when: {header: ...}``): exactly 1 of 3 campaign messages
    passes where a milter sees the headers; without one the limit never matches. The
    recipient-keyed ``header-destination`` (2/1h, the same header condition) is spent at
    the end of the message that passes, once per recipient, and by nothing else."""
    run = Run.of("header")
    sent = [wiring.send(run.helo, f"s@{run.tag}.cells.test", run.rcpts(1),
                        run.subject(f"campaign-{i}"), {"X-Campaign": "spring"})
            for i in range(3)]
    if wiring.sees_headers:
        assert sent[0].queued, sent[0].replies()
        for later in sent[1:]:
            reply = refused_at_end(later)
            assert 400 <= reply.code < 500, later.replies()  # a budget refills: try later
        assert wiring.lane_left_in(run.subject("campaign-0")) == "normal"
        budget(wiring, "header-once", run.helo, 0)
        budget(wiring, "header-destination", run.domain, 1)
        witnesses(wiring, run, messages=1, recipients=1)
    else:
        for i, each in enumerate(sent):
            assert each.queued, each.replies()
            assert wiring.lane_left_in(run.subject(f"campaign-{i}")) == "normal"
        budget(wiring, "header-once", run.helo, 1)  # never matched, never spent
        budget(wiring, "header-destination", run.domain, 2)
        witnesses(wiring, run, messages=3, recipients=3)


def lane_scoped_limit(wiring: Wiring, bulk_by: str) -> None:
    """``normal-recipients`` (10/1h, ``lanes: [normal]``) is not charged by a 10-recipient
    newsletter that leaves in bulk: the next plain 10-recipient message passes; nor is the
    recipient-keyed ``normal-destination`` (10/1h per recipient domain, ``lanes:
    [normal]``), spent at the end of the message in the lane it leaves in. Bulk by
    the envelope (a sender domain) in every wiring; by the headers (``List-Id``,
    ``Precedence: list``) only where a milter sees them: else the newsletter leaves in
    normal, is charged there, and the plain message is deferred."""
    run = Run.of("lane")
    news_sender, headers = _bulk_mail(run, bulk_by)
    news = wiring.send(run.helo, news_sender, run.rcpts(10), run.subject("newsletter"),
                       headers)
    assert news.queued, news.replies()
    in_bulk = bulk_by == "envelope" or wiring.sees_headers
    assert wiring.lane_left_in(run.subject("newsletter")) == ("bulk" if in_bulk else "normal")
    budget(wiring, "normal-recipients", run.helo, 10 if in_bulk else 0)
    budget(wiring, "normal-destination", run.domain, 10 if in_bulk else 0)

    plain = wiring.send(run.helo, f"plain@{run.tag}.cells.test", run.rcpts(10, 10),
                        run.subject("plain"))
    if in_bulk:
        assert plain.queued and len(plain.accepted) == 10, plain.replies()
        assert wiring.lane_left_in(run.subject("plain")) == "normal"
        witnesses(wiring, run, messages=2, recipients=20)
    else:
        assert not plain.queued, plain.replies()
        assert all(400 <= reply.code < 500 for _, reply in plain.rcpts), plain.replies()
        witnesses(wiring, run, messages=1, recipients=10)
    budget(wiring, "normal-recipients", run.helo, 0)
    budget(wiring, "normal-destination", run.domain, 0)


def hold(wiring: Wiring, bulk_by: str) -> None:
    """``bulk-hold`` (10/1h, ``lanes: [bulk]``, ``action: hold``): of two 10-recipient bulk
    messages the first leaves in bulk, the second waits in the MTA's hold queue with a
    hold record in lane bulk, and is not counted until it is released. Bulk by the headers
    without a milter: both leave in normal, nothing is held."""
    run = Run.of("hold")
    sender, headers = _bulk_mail(run, bulk_by)
    first = wiring.send(run.helo, sender, run.rcpts(10), run.subject("first"), headers)
    assert first.queued, first.replies()
    second = wiring.send(run.helo, sender, run.rcpts(10, 10), run.subject("second"), headers)
    assert second.queued, second.replies()  # 250: a held message is accepted
    if bulk_by == "envelope" or wiring.sees_headers:
        assert wiring.lane_left_in(run.subject("first")) == "bulk"
        wiring.wait_held(second, run.subject("second"))
        assert wiring.held_records(run.domain) == [("bulk", 1)]
        budget(wiring, "bulk-hold", run.helo, 0)
        witnesses(wiring, run, messages=1, recipients=10)
    else:
        for what in ("first", "second"):
            assert wiring.lane_left_in(run.subject(what)) == "normal"
        assert wiring.held_records(run.domain) == []
        budget(wiring, "bulk-hold", run.helo, 10)
        witnesses(wiring, run, messages=2, recipients=20)


def demotion(wiring: Wiring) -> None:
    """``demote-after-one`` (1/1h, ``demote: bulk``): the second message is demoted to bulk
    and meets bulk's ``demoted-bulk-hold`` (5 recipients/1h, hold), which it spends; the
    third, demoted too, finds it spent and is held. Demoted mail counts in bulk, not in
    normal (``demoted-normal-recipients`` sees the first message only)."""
    run = Run.of("demote")
    sender = f"d@{run.tag}.cells.test"
    sent = [wiring.send(run.helo, sender, run.rcpts(5, 5 * i), run.subject(f"demote-{i}"))
            for i in range(3)]
    for each in sent:
        assert each.queued, each.replies()
    assert wiring.lane_left_in(run.subject("demote-0")) == "normal"
    assert wiring.lane_left_in(run.subject("demote-1")) == "bulk"
    wiring.wait_held(sent[2], run.subject("demote-2"))
    assert wiring.held_records(run.domain) == [("bulk", 1)]
    budget(wiring, "demoted-bulk-hold", run.helo, 0)
    budget(wiring, "demoted-normal-recipients", run.helo, 95)
    witnesses(wiring, run, messages=2, recipients=10)


def give_back(wiring: Wiring) -> None:
    """A message refused at the end of data (``giveback-bytes``: 5000 bytes/1d; the first
    message takes about 3500) costs nothing: the RCPT spends of its 2 recipients on
    ``giveback-destination`` (5/1h) are given back, so a third message's 4 recipients are
    all accepted, and the domain's budget is then spent exactly."""
    run = Run.of("giveback")
    sender = f"g@{run.tag}.cells.test"
    big = "x" * 72 + "\r\n"  # Sendmail refuses bare line feeds
    first = wiring.send(run.helo, sender, run.rcpts(1), run.subject("big-1"), body=big * 42)
    assert first.queued, first.replies()
    refused = wiring.send(run.helo, sender, run.rcpts(2, 1), run.subject("big-2"),
                          body=big * 42)
    reply = refused_at_end(refused)
    assert 400 <= reply.code < 500, refused.replies()  # the budget refills: it fits later
    budget(wiring, "giveback-destination", run.domain, 4)
    witnesses(wiring, run, messages=1, recipients=1)

    small = wiring.send(run.helo, sender, run.rcpts(4, 3), run.subject("small"))
    assert small.queued and len(small.accepted) == 4, small.replies()
    budget(wiring, "giveback-destination", run.domain, 0)
    witnesses(wiring, run, messages=2, recipients=5)
    for what in ("big-1", "small"):
        assert wiring.lane_left_in(run.subject(what)) == "normal"


ONE_TOO_MANY = "message exceeds limit per-user: 51 recipients, at most 50 at once"


def never_fits(wiring: Wiring) -> None:
    """51 recipients against ``per-user``'s burst of 50: a permanent ``550 5.7.1`` at the
    end of data with the contract's text, never a 4xx (retrying cannot help), and nothing
    spent; 50 recipients then pass."""
    run = Run.of("oversize")
    sender = f"o@{run.tag}.cells.test"
    sent = wiring.send(run.helo, sender, run.rcpts(51), run.subject("too-many"))
    assert not any(400 <= r.code < 500 for r in sent.replies()), sent.replies()
    reply = refused_at_end(sent)
    assert reply.code == 550, sent.replies()
    assert reply.text.startswith("5.7.1 "), sent.replies()
    assert ONE_TOO_MANY in reply.text, sent.replies()
    budget(wiring, "per-user", run.helo, 50)
    witnesses(wiring, run, messages=0, recipients=0)

    fits = wiring.send(run.helo, sender, run.rcpts(50), run.subject("fits"))
    assert fits.queued and len(fits.accepted) == 50, fits.replies()
    assert wiring.lane_left_in(run.subject("fits")) == "normal"
    budget(wiring, "per-user", run.helo, 0)
    witnesses(wiring, run, messages=1, recipients=50)


def never_fits_held(wiring: Wiring) -> None:
    """51 recipients against ``per-user-held``'s burst of 50 with ``oversize: hold``:
    accepted (never a 4xx) into the hold queue with a hold record, nothing spent until the
    scheduler releases it."""
    run = Run.of("bighold")
    sent = wiring.send(run.helo, f"o@{run.tag}.cells.test", run.rcpts(51),
                       run.subject("too-many"))
    assert not any(400 <= r.code < 500 for r in sent.replies()), sent.replies()
    assert sent.queued and len(sent.accepted) == 51, sent.replies()
    wiring.wait_held(sent, run.subject("too-many"))
    assert wiring.held_records(run.domain) == [("normal", 1)]
    budget(wiring, "per-user-held", run.helo, 50)
    witnesses(wiring, run, messages=0, recipients=0)


def logged(wiring: Wiring, wanted: Callable[[str], bool], what: str) -> list[str]:
    """The decision lines of serve's log that ``wanted`` accepts, once there is one; []
    when none comes (serve writes its log from a thread of its own: a line comes a moment
    after its decision)."""
    found: list[str] = []

    def seen() -> bool:
        found[:] = [line for line in wiring.serve_log().splitlines()
                    if "msg=decision" in line and wanted(f"{line} ")]
        return bool(found)

    try:
        poll(seen, 10.0, what, interval_s=0.05)
    except TimeoutError:
        return []
    return found


def decision_log(wiring: Wiring) -> None:
    """The decision log says what was done: a held message ``action=hold`` (never
    ``action=accept ... duplicate=yes``); one that can never fit ``action=reject`` with
    the reason oversize."""
    run = Run.of("hold")
    sender = f"news@{run.tag}.bulk.cells.test"
    first = wiring.send(run.helo, sender, run.rcpts(10), run.subject("first"))
    assert first.queued, first.replies()
    second = wiring.send(run.helo, sender, run.rcpts(10, 10), run.subject("second"))
    wiring.wait_held(second, run.subject("second"))
    qid = f"qid={wiring.queue_id(second)} "
    assert logged(wiring, lambda line: qid in line and " action=hold " in line,
                  f"the decision that held {qid}"), f"no decision line action=hold with {qid}"
    about = [line for line in wiring.serve_log().splitlines() if qid in f"{line} "]
    assert not any(" action=accept " in line and "duplicate=yes" in line for line in about), \
        about

    big = Run.of("oversize")
    sender = f"o@{big.tag}.cells.test"
    too_many = wiring.send(big.helo, sender, big.rcpts(51), big.subject("too-many"))
    assert not too_many.queued, too_many.replies()
    refused = logged(wiring, lambda line: f"sender={sender} " in line
                     and " action=reject " in line and "oversize" in line,
                     "the decision that refused the message that can never fit")
    assert refused, [line for line in wiring.serve_log().splitlines() if sender in line]


def _bulk_mail(run: Run, bulk_by: str) -> tuple[str, Mapping[str, str] | None]:
    """A sender and headers that make bulk mail: by the envelope or by the headers."""
    if bulk_by == "envelope":
        return f"news@{run.tag}.bulk.cells.test", None
    if bulk_by == "headers":
        return f"news@{run.tag}.cells.test", LIST_HEADERS
    raise ValueError(f"bulk_by is one of {BULK_BY}, not {bulk_by!r}")
