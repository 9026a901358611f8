"""An oracle of the counting contract (README "How counting works", issue 16), written from
the promise and nothing else: it imports nothing of mqpolicy.

Budgets are token buckets in exact rational arithmetic (:class:`fractions.Fraction`): a
budget of N admits N at one instant, refills COUNT every PERIOD continuously, and a clock
that steps back neither refills nor drains. A bucket is its *debt* (units missing from
full) at its time; no bucket is a full one. Only a decision that spends from a bucket or
gives back to it counts it up to the decision's time; a check or a read moves nothing. A
refused message's give-back leaves every bucket as if the message had never come (its
spends taken out of the bucket's history, later ones kept), counted up to the give-back.

What is spent, where and when, per wiring (P: the policy server alone; M: the milter alone;
B: the policy server's RCPT and END-OF-MESSAGE hooks and the milter, ``rcpt_limits:
policy_server``):

* a recipient-keyed limit (``recipient``, ``recipient_domain``, ``destination``) with no lane
  scope and no header condition costs 1 per recipient, spent at RCPT by whoever decides RCPT
  (P, B: the policy server; M: the milter); a refused RCPT refuses only that recipient;
* every other limit is checked at RCPT (a budget holding less than one unit refuses the
  recipient) and spent once per message at the end in the lane the message leaves in
  (P: END-OF-MESSAGE with the envelope lane; M, B: the milter's end of message); a
  recipient-keyed one (lane-scoped or with a header condition) costs one unit per recipient;
* header conditions and header lanes are seen by the milter only;
* one decision is all-or-nothing; the most severe blocking action answers
  (reject > defer > hold); a spent ``demote: L`` limit moves the message to L, whose
  lane-scoped limits it meets in the same decision, and the first lane's do not count it;
* refused mail (deferred, rejected, held) costs nothing: the RCPT spends made for it are
  given back;
* a cost larger than a blocking limit's burst can never fit: a permanent reject saying
  ``message exceeds limit NAME: N UNITS, at most BURST at once``;
* in B the policy server's END-OF-MESSAGE only checks: it may refuse when sure (a limit that
  applies whatever the headers say and cannot fit the message now), spends nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

RECIPIENT_PARTS = frozenset({"recipient", "recipient_domain", "destination"})
SEVERITY = {"reject": 3, "defer": 2, "hold": 1}
UNITS = {"messages": "messages", "recipients": "recipients", "bytes": "bytes"}
PERIODS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def domain_of(address: str) -> str:
    """The part after the last ``@``, lower-cased (README: a recipient's domain)."""
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""


def shown_part(part: str) -> str:
    """A key part as logs and ``counters`` show it: ``%``, ``|`` and bytes that are not
    UTF-8 (kept as lone surrogates) written ``%25``, ``%7c`` and ``%udcNN``."""
    out = []
    for ch in part:
        if ch == "%":
            out.append("%25")
        elif ch == "|":
            out.append("%7c")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"%u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class LimitSpec:
    """One limit of the policy, as its YAML says it."""

    name: str
    key: tuple[str, ...]
    count: str  # messages | recipients | bytes
    rate: int  # units ...
    period: str  # ... every period ("1m")
    burst: int
    action: str  # defer | hold | reject | demote
    demote_to: str | None = None
    lanes: frozenset[str] | None = None
    header: str | None = None  # a header that must be present (and not empty)

    @property
    def period_ms(self) -> int:
        return int(self.period[:-1]) * PERIODS_MS[self.period[-1]]

    @property
    def refill_per_ms(self) -> Fraction:
        return Fraction(self.rate, self.period_ms)

    @property
    def recipient_keyed(self) -> bool:
        return any(part in RECIPIENT_PARTS for part in self.key)

    @property
    def spent_at_rcpt(self) -> bool:
        """Spent per recipient at RCPT: recipient-keyed, with no lane scope nor header."""
        return self.recipient_keyed and self.lanes is None and self.header is None

    @property
    def blocking(self) -> bool:
        return self.action in SEVERITY

    def yaml(self) -> str:
        key = self.key[0] if len(self.key) == 1 else "[" + ", ".join(self.key) + "]"
        lines = [f"- name: {self.name}", f"  rate: {self.rate}/{self.period}",
                 f"  burst: {self.burst}", f"  key: {key}", f"  count: {self.count}"]
        if self.action == "demote":
            lines.append(f"  action: {{demote: {self.demote_to}}}")
        else:
            lines.append(f"  action: {self.action}")
        if self.lanes is not None:
            lines.append(f"  lanes: [{', '.join(sorted(self.lanes))}]")
        if self.header is not None:
            lines.append(f'  when: {{header: {{name: {self.header}, regex: "."}}}}')
        return "\n".join(lines) + "\n"


@dataclass
class Bucket:
    """A bucket as its history: what each decision took (time, units, message), and the
    writes of give-backs (0 units, no message). Its state is the history replayed without
    the units of messages that were refused: a refused message is as if it never came,
    except for the time its decisions moved the bucket to (a clock behind it refills
    nothing, before and after the give-back)."""

    events: list[tuple[int, Fraction, str | None]] = field(default_factory=list)

    def state(self, refill: Fraction, refused: set[str]) -> tuple[Fraction, int | None]:
        """(debt, time) after the history: each event counts the bucket up to its time (a
        clock behind the bucket's time refills nothing), then adds its units."""
        debt, at = Fraction(0), None
        for time, spent, message in self.events:
            # a refused message's spends are taken back, not the time they moved the
            # bucket to: a give-back never turns a bucket's clock back
            units = Fraction(0) if message is not None and message in refused else spent
            if at is None:
                at = time
            elif time > at:
                debt = max(Fraction(0), debt - refill * (time - at))
                at = time
            debt += units
        return debt, at

    def debt_at(self, refill: Fraction, refused: set[str], now_ms: int) -> Fraction:
        """The debt at ``now_ms``: refilled since the bucket's time, nothing refilled nor
        taken by a clock behind it."""
        debt, at = self.state(refill, refused)
        if at is None or now_ms <= at:
            return debt
        return max(Fraction(0), debt - refill * (now_ms - at))


@dataclass(frozen=True)
class Message:
    """One message's facts as the MTA has them."""

    sender: str
    recipients: tuple[str, ...]
    headers: tuple[tuple[str, bytes], ...]
    body_size: int  # the body: this many bytes

    @property
    def body(self) -> bytes:
        return b"x" * self.body_size

    @property
    def size(self) -> int:
        """Its bytes as received: each header ``Name: value\\r\\n``, a blank line, the body."""
        return (sum(len(name) + len(value) + 4 for name, value in self.headers) + 2
                + self.body_size)

    def header_value(self, name: str) -> str | None:
        for field_name, value in self.headers:
            if field_name.lower() == name.lower():
                return value.decode("utf-8", "surrogateescape")
        return None


@dataclass(frozen=True)
class Outcome:
    """What a decision answers: ``action`` (accept, defer, reject, hold), the lane the
    message leaves in, and for an oversize reject the limits that can never fit it
    (name, cost, burst)."""

    action: str
    lane: str
    oversize: tuple[tuple[str, int, int], ...] = ()

    @property
    def refused(self) -> bool:
        return self.action != "accept"


Check = tuple[LimitSpec, str, int]  # limit, key (as shown), cost


@dataclass
class CountingOracle:
    """The budgets of a policy and what each decision answers and spends."""

    limits: Sequence[LimitSpec]
    default_lane: str
    header_lanes: Mapping[str, str]  # a header present -> the lane (the milter's rules)
    lane_order: Sequence[str]  # first = highest priority
    buckets: dict[tuple[str, str], Bucket] = field(default_factory=dict)
    refused_messages: set[str] = field(default_factory=set)  # their spends given back
    counted: set[str] = field(default_factory=set)  # queue ids counted once
    rcpt_spends: dict[str, list[Check]] = field(default_factory=dict)  # per message

    # ---------------------------------------------------------------- buckets

    def _debt(self, limit: LimitSpec, key: str, now_ms: int) -> Fraction:
        bucket = self.buckets.get((limit.name, key))
        if bucket is None:
            return Fraction(0)
        return bucket.debt_at(limit.refill_per_ms, self.refused_messages, now_ms)

    def _fits(self, check: Check, now_ms: int) -> bool:
        limit, key, cost = check
        return cost <= limit.burst - self._debt(limit, key, now_ms)

    def _spend(self, check: Check, now_ms: int, message_id: str) -> None:
        limit, key, cost = check
        bucket = self.buckets.setdefault((limit.name, key), Bucket())
        bucket.events.append((now_ms, Fraction(cost), message_id))

    def _give_back(self, message_id: str, checks: Sequence[Check], now_ms: int) -> None:
        """Everything ``message_id`` took is given back at ``now_ms``: each bucket it spent
        from is as if the message never came, counted up to the give-back's time (or its
        own, when the clock is behind it); one that is full again is no bucket."""
        touched = {(limit.name, key): limit for limit, key, _ in checks
                   if (limit.name, key) in self.buckets}  # else full already: nothing to give
        times = {}
        for (name, key), limit in touched.items():
            _, at = self.buckets[(name, key)].state(limit.refill_per_ms,
                                                    self.refused_messages)
            times[(name, key)] = now_ms if at is None else max(at, now_ms)
        self.refused_messages.add(message_id)
        for (name, key), limit in touched.items():
            bucket = self.buckets[(name, key)]
            bucket.events.append((times[(name, key)], Fraction(0), None))
            debt, _ = bucket.state(limit.refill_per_ms, self.refused_messages)
            if not debt:  # full again: a full bucket is no bucket (it keeps no time)
                del self.buckets[(name, key)]

    def remaining(self, now_ms: int) -> dict[tuple[str, str], int]:
        """Whole units left in every bucket that is not full, by (limit, key as shown)."""
        by_name = {limit.name: limit for limit in self.limits}
        left: dict[tuple[str, str], int] = {}
        for (name, key), bucket in self.buckets.items():
            limit = by_name[name]
            units = limit.burst - bucket.debt_at(limit.refill_per_ms, self.refused_messages,
                                                 now_ms)
            if units < limit.burst:
                left[(name, key)] = int(units // 1)
        return left

    def burst_of(self, name: str) -> int:
        return next(limit.burst for limit in self.limits if limit.name == name)

    # ---------------------------------------------------------------- keys and lanes

    @staticmethod
    def _key(limit: LimitSpec, sender: str, recipient: str) -> str | None:
        parts = []
        for part in limit.key:
            if part == "sender":
                value = sender.lower()
            elif part == "recipient":
                value = recipient.lower()
            elif part in ("recipient_domain", "destination"):
                value = domain_of(recipient)
            else:
                raise ValueError(f"the oracle does not know key part {part}")
            if not value:
                return None  # a key that is missing: the limit does not apply
            parts.append(shown_part(value))
        return "|".join(parts)

    def lane_of(self, message: Message, headers_seen: bool) -> str:
        """The first rule that matches: header rules only where headers are seen."""
        if headers_seen:
            for header, lane in self.header_lanes.items():
                if message.header_value(header):
                    return lane
        return self.default_lane

    def _applies(self, limit: LimitSpec, lane: str, message: Message,
                 headers_seen: bool) -> bool:
        if limit.lanes is not None and lane not in limit.lanes:
            return False
        if limit.header is not None:
            return headers_seen and bool(message.header_value(limit.header))
        return True

    # ---------------------------------------------------------------- RCPT

    def rcpt(self, message_id: str, message: Message, recipient: str, now_ms: int) -> str:
        """The RCPT decision for one recipient (by whoever decides RCPT): ``accept``, or the
        refusal of this recipient (``defer``/``reject``). Recipient-keyed limits spent
        here cost 1; the others that apply with the envelope (its lane, no headers) are only
        checked for one unit."""
        lane = self.lane_of(message, headers_seen=False)
        spends: list[Check] = []
        failing: list[str] = []
        for limit in self.limits:
            if not self._applies(limit, lane, message, headers_seen=False):
                continue
            if limit.recipient_keyed and not limit.spent_at_rcpt:
                continue  # spent at the end, one unit per recipient
            key = self._key(limit, message.sender, recipient)
            if key is None:
                continue
            check = (limit, key, 1)
            if limit.spent_at_rcpt:
                spends.append(check)
            if limit.blocking and not self._fits(check, now_ms):
                failing.append(limit.action)
        if failing:
            return max(failing, key=SEVERITY.__getitem__)
        for check in spends:
            self._spend(check, now_ms, message_id)
        self.rcpt_spends.setdefault(message_id, []).extend(spends)
        return "accept"

    # ---------------------------------------------------------------- the end

    def _end_checks(self, message: Message, recipients: Sequence[str], lane: str,
                    headers_seen: bool, only: Iterable[LimitSpec] | None = None) -> list[Check]:
        checks: dict[tuple[str, str], Check] = {}
        for limit in (self.limits if only is None else only):
            if limit.spent_at_rcpt:
                continue
            if not self._applies(limit, lane, message, headers_seen):
                continue
            if limit.recipient_keyed:  # one unit per recipient, each its own key
                for recipient in recipients:
                    key = self._key(limit, message.sender, recipient)
                    if key is None:
                        continue
                    _, _, cost = checks.get((limit.name, key), (limit, key, 0))
                    checks[(limit.name, key)] = (limit, key, cost + 1)
                continue
            key = self._key(limit, message.sender, recipients[0] if recipients else "")
            if key is None:
                continue
            cost = {"messages": 1, "recipients": len(recipients),
                    "bytes": message.size}[limit.count]
            checks[(limit.name, key)] = (limit, key, cost)
        return list(checks.values())

    def _lower(self, a: str, b: str) -> str:
        return a if self.lane_order.index(a) >= self.lane_order.index(b) else b

    def _judge(self, checks: Sequence[Check], lane: str, now_ms: int) -> Outcome:
        oversize = tuple((limit.name, cost, limit.burst) for limit, _, cost in checks
                         if limit.blocking and cost > limit.burst)
        if oversize:
            return Outcome("reject", lane, oversize)
        failing = [limit.action for limit, key, cost in checks
                   if limit.blocking and not self._fits((limit, key, cost), now_ms)]
        if failing:
            return Outcome(max(failing, key=SEVERITY.__getitem__), lane)
        return Outcome("accept", lane)

    def end(self, message_id: str, queue_id: str, message: Message,
            recipients: Sequence[str], now_ms: int, *, headers_seen: bool) -> Outcome:
        """The deciding end-of-message decision (P: END-OF-MESSAGE; M, B: the milter's):
        the lane (headers where seen, then demotion), all or nothing, counted once per
        queue id; a refusal gives back the message's RCPT spends."""
        first = self.lane_of(message, headers_seen)
        if queue_id in self.counted:  # counted already: nothing tested, nothing spent
            return Outcome("accept", first)
        lane = first
        for limit, key, cost in self._end_checks(message, recipients, first, headers_seen):
            if limit.action == "demote" and not self._fits((limit, key, cost), now_ms):
                assert limit.demote_to is not None
                lane = self._lower(lane, limit.demote_to)
        checks = self._end_checks(message, recipients, lane, headers_seen)
        outcome = self._judge(checks, lane, now_ms)
        if outcome.refused:
            self.refused(message_id, now_ms)
            return outcome
        for check in checks:
            if check[0].blocking or self._fits(check, now_ms):  # a spent demote: not spent
                self._spend(check, now_ms, message_id)
        self.counted.add(queue_id)
        self.rcpt_spends.pop(message_id, None)
        return outcome

    def sure_refusal(self, message: Message, recipients: Sequence[str],
                     now_ms: int) -> Outcome | None:
        """B's END-OF-MESSAGE at the policy server: the refusal it may answer, from the
        limits that apply whatever the headers say (no lane scope, no header condition),
        or None when it must let the milter decide. Spends nothing."""
        sure = [limit for limit in self.limits if limit.lanes is None and limit.header is None]
        lane = self.lane_of(message, headers_seen=False)
        checks = self._end_checks(message, recipients, lane, False, only=sure)
        outcome = self._judge(checks, lane, now_ms)
        return outcome if outcome.refused else None

    def refused(self, message_id: str, now_ms: int) -> None:
        """The message was refused (or abandoned): its RCPT spends are given back."""
        spends = self.rcpt_spends.pop(message_id, [])
        if spends:
            self._give_back(message_id, spends, now_ms)

    def forget(self, message_id: str) -> None:
        """The message ended with no end-of-message decision to make (no recipient left)."""
        self.rcpt_spends.pop(message_id, None)
