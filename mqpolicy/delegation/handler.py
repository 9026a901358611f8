"""Postfix policy delegation front-end: attributes in, a Postfix action out.

Translates only; every decision is made by :class:`~mqpolicy.decision.service.DecisionService`.

Holding is a message-level act done at END-OF-MESSAGE, where the queue id is known and a
hold record can be written for the scheduler (:mod:`mqpolicy.store.hold_records`):

* a HOLD verdict before END-OF-MESSAGE (at RCPT) is answered as if accepted (``DUNNO``, or
  ``FILTER <transport>:`` for the lane) and remembered under the request's ``instance``
  (stable for a whole message; a bounded map, oldest forgotten first);
* at END-OF-MESSAGE, a HOLD verdict or a remembered one writes the record (queue id, lane,
  not-before = when the deciding limit's budget admits the message, or now for a lane or
  load hold; reason = the deciding limit or ``lane:<name>``; the budgets the held decision
  did not spend, for the release to spend) and only then answers ``HOLD``; a DEFER or
  REJECT there wins over a remembered hold. When the record cannot be written the answer
  is a temporary failure (``451 4.3.0``, the ``store_error`` text): a message held without
  a record would never be released.

Give-backs: a message refused or held at END-OF-MESSAGE gets back what its RCPT decisions
spent (the ledger named by ``instance``); with a milter that decides the end
(``Policy.end_checks_only``, wiring B) END-OF-MESSAGE only checks, answers ``DUNNO`` unless
it refuses, and leaves the ledger under the queue id for the milter.

Known limit: a message that END-OF-MESSAGE both moves to another lane (e.g. by recipient
count) and holds leaves, once released, through the transport its RCPT answers chose
(Postfix takes one action per answer); the record's lane (the END-OF-MESSAGE one) still
orders the release. Header-based lanes belong to the milter, whose lane header works with
holds.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mqpolicy.daemon.structured_log import queue_id_var
from mqpolicy.decision.engine import Action, Verdict, ledger_key, store_error_text
from mqpolicy.decision.hold_terms import held_until, unspent_budgets
from mqpolicy.decision.service import DecisionService, wall_clock_ms
from mqpolicy.policy.model import Lane
from mqpolicy.policy.request import STAGE_END_OF_MESSAGE, Request, domain_of
from mqpolicy.store.budget import StoreError
from mqpolicy.store.hold_records import (
    MAX_DESTINATIONS,
    HoldRecord,
    HoldRecordStore,
    hold_destinations,
    record_ttl_for,
)

log = logging.getLogger("mqpolicy.hold")

MAX_PENDING_HOLDS = 50_000
"""Messages with a hold decided before END-OF-MESSAGE, remembered at once (the oldest is
forgotten first: a client that never finishes its message must not grow the map)."""


MAX_REMEMBERED_RECIPIENTS = 10_000
"""Recipients of one message remembered for its END-OF-MESSAGE (as the milter keeps)."""
MAX_REMEMBERED_IN_ALL = 1_000_000
"""Recipients remembered for all messages in flight (about 100 MB at most)."""


def postfix_action(verdict: Verdict) -> str:
    """The ``action=`` value Postfix understands for a verdict."""
    action = verdict.action
    if action is Action.ACCEPT:
        if verdict.lane.uses_default_transport:
            return "DUNNO"
        return f"FILTER {verdict.lane.transport}:"
    if action is Action.DEFER:
        if verdict.store_error:
            return f"451 4.3.0 {verdict.text}"
        return f"450 4.7.1 {verdict.text}"
    if action is Action.HOLD:
        return f"HOLD {verdict.text}"
    return f"550 5.7.1 {verdict.text}"


def refused(answer: str) -> bool:
    """Whether a Postfix action refuses (4xx, 5xx) or holds the message."""
    return answer[:1] in ("4", "5") or answer.startswith("HOLD")


def accepted_action(verdict: Verdict) -> str:
    """The answer to a verdict as if it accepted (the lane's FILTER, else DUNNO)."""
    return postfix_action(verdict._replace(action=Action.ACCEPT))


@dataclass(slots=True)
class _PendingHold:
    verdict: Verdict
    # the recipients' domains in order, at most MAX_DESTINATIONS (what a record keeps)
    domains: dict[str, None] = field(default_factory=dict)

    def add(self, recipient: str) -> None:
        """Remember the recipient's domain (none: nothing), up to what a record keeps."""
        domain = domain_of(recipient)
        if domain and len(self.domains) < MAX_DESTINATIONS:
            self.domains[domain] = None


class PostfixPolicyHandler:
    """The handler the policy server calls for each complete request.

    ``records``: where holds are recorded; None keeps Postfix's plain ``HOLD`` at every
    stage (no scheduler will know about those messages)."""

    def __init__(self, service: DecisionService, records: HoldRecordStore | None = None, *,
                 clock_ms: Callable[[], int] = wall_clock_ms,
                 max_pending: int = MAX_PENDING_HOLDS) -> None:
        self.service = service
        self.records = records
        self.clock_ms = clock_ms
        self._pending: OrderedDict[str, _PendingHold] = OrderedDict()
        # instance -> the recipients accepted so far (Policy.recipients_at_end only)
        self._recipients: OrderedDict[str, list[str]] = OrderedDict()
        self._remembered = 0  # recipients in it
        self._max_pending = max_pending
        self.holds_recorded = 0
        self.record_failures = 0

    @property
    def pending_holds(self) -> int:
        return len(self._pending)

    @property
    def remembered_recipients(self) -> int:
        """Recipients remembered for messages whose END-OF-MESSAGE has not come."""
        return self._remembered

    async def handle(self, attrs: dict[str, str]) -> str:
        answer = self.handle_now(attrs)
        return answer if isinstance(answer, str) else await answer

    def handle_now(self, attrs: dict[str, str]) -> str | Awaitable[str]:
        """The answer at once when the decision needs no I/O (the embedded store, no hold
        record to write); else an awaitable of it. The policy server calls this."""
        request = Request.from_policy_attributes(attrs)
        queue_id_var.set(request.queue_id)
        remember = self.service.policy.recipients_at_end and request.instance
        if remember and request.stage == STAGE_END_OF_MESSAGE and not request.recipients:
            recipients = self._recipients.pop(request.instance, None)
            if recipients:
                self._remembered -= len(recipients)
                request = request._replace(recipients=tuple(recipients))
        verdict = self.service.decide_now(request)
        if verdict is None:
            return self._decide_and_answer(request)
        return self._answer(request, verdict)

    def _remember(self, request: Request, verdict: Verdict) -> None:
        """A recipient accepted at RCPT, for the limits spent per recipient at the end of
        the message (Postfix's END-OF-MESSAGE request lists none)."""
        if verdict.action not in (Action.ACCEPT, Action.HOLD) or not request.recipient:
            return
        remembered = self._recipients
        recipients = remembered.get(request.instance)
        if recipients is None:
            recipients = remembered[request.instance] = []
        if len(recipients) < MAX_REMEMBERED_RECIPIENTS:
            recipients.append(request.recipient)
            self._remembered += 1
        # transactions that never reach END-OF-MESSAGE are forgotten, oldest first
        while (len(remembered) > self._max_pending
               or self._remembered > MAX_REMEMBERED_IN_ALL) and len(remembered) > 1:
            self._remembered -= len(remembered.popitem(last=False)[1])

    async def _decide_and_answer(self, request: Request) -> str:
        answer = self._answer(request, await self.service.decide(request))
        return answer if isinstance(answer, str) else await answer

    def _answer(self, request: Request, verdict: Verdict) -> str | Awaitable[str]:
        records = self.records
        if request.stage != STAGE_END_OF_MESSAGE:
            if request.instance and self.service.policy.recipients_at_end:
                self._remember(request, verdict)
            if records is None:
                return postfix_action(verdict)
            return self._before_end(request, verdict)
        if records is None:
            if verdict.action is Action.ACCEPT and self.service.policy.end_checks_only:
                answer: str | Awaitable[str] = "DUNNO"  # wiring B: the milter gives the lane
            else:
                answer = postfix_action(verdict)
        else:
            answer = self._at_end(request, verdict, records)
        if not request.instance or (isinstance(answer, str) and not refused(answer)
                                    and not self.service.policy.end_checks_only):
            return answer  # accepted: its RCPT spends stay, its ledger expires
        return self._settle(request, answer)

    async def _settle(self, request: Request, answer: str | Awaitable[str]) -> str:
        """After the answer at END-OF-MESSAGE: a message refused or held gets its RCPT
        spends back (held mail is spent when released); in wiring B an accepted one's
        ledger is left under its queue id, for the milter to give back if it refuses."""
        if not isinstance(answer, str):
            answer = await answer
        ledger = ledger_key("i:" + request.instance)
        if refused(answer):
            await self.service.give_back(ledger)
        elif self.service.policy.end_checks_only and request.queue_id:
            await self.service.move_ledger(ledger, ledger_key("q:" + request.queue_id))
        return answer

    def _before_end(self, request: Request, verdict: Verdict) -> str:
        key = request.instance
        if not key:  # Postfix always sends one; without it the hold cannot be followed
            return postfix_action(verdict)
        pending = self._pending.get(key)
        if verdict.action is Action.HOLD:
            if pending is None:
                pending = self._pending[key] = _PendingHold(verdict)
                if len(self._pending) > self._max_pending:
                    self._pending.popitem(last=False)
            pending.add(request.recipient)
            return accepted_action(verdict)
        if pending is not None and verdict.action is Action.ACCEPT:
            pending.add(request.recipient)
        return postfix_action(verdict)

    def _at_end(self, request: Request, verdict: Verdict,
                records: HoldRecordStore) -> str | Awaitable[str]:
        pending = self._pending.pop(request.instance, None) if request.instance else None
        if verdict.action in (Action.DEFER, Action.REJECT):
            return postfix_action(verdict)
        hold = verdict if verdict.action is Action.HOLD else (
            pending.verdict if pending is not None else None)
        if hold is None:
            if self.service.policy.end_checks_only:
                return "DUNNO"  # wiring B: the milter gives the lane (and holds)
            return postfix_action(verdict)
        if not request.queue_id:
            log.error("hold without a queue id: held without a record",
                      extra={"fields": {"instance": request.instance}})
            return f"HOLD {hold.text}"
        lane = verdict.lane
        if pending is not None and pending.verdict.lane.priority > lane.priority:
            lane = pending.verdict.lane  # demoted at RCPT: the lower lane
        domains = list(pending.domains) if pending is not None else []
        now = self.clock_ms()
        # a hold decided here spent nothing: the release spends it (one decided at RCPT
        # and accepted here was spent here)
        record = HoldRecord(queue_id=request.queue_id, lane=lane.name,
                            not_before_ms=held_until(now, hold),
                            created_ms=now, reason=hold.hold_reason,
                            destinations=hold_destinations(
                                [*domains, domain_of(request.recipient)]),
                            sender=request.sender,
                            spends=unspent_budgets(verdict) if hold is verdict else ())
        return self._hold(record, hold, lane, records)

    async def _hold(self, record: HoldRecord, hold: Verdict, lane: Lane,
                    records: HoldRecordStore) -> str:
        """Write the hold record, then answer HOLD (a temporary failure when it cannot be
        written: held mail without a record would never be released)."""
        policy = self.service.policy
        try:
            await records.put(record, record_ttl_for(policy))
        except StoreError as exc:
            self.record_failures += 1
            log.error("hold record not written: message refused for now",
                      extra={"fields": {"qid": record.queue_id, "error": str(exc)}})
            return f"451 4.3.0 {store_error_text(policy, lane)}"
        self.holds_recorded += 1
        log.info("held", extra={"fields": {"qid": record.queue_id, "lane": lane.name,
                                           "reason": record.reason}})
        return f"HOLD {hold.text}"
