"""The milter's callbacks (pymilter): libmilter's calls in, a Request out, a verdict applied.

Translates only: :class:`PolicyMilter` asks the
:class:`~mqpolicy.milter.gateway.DecisionGateway` for every decision; one that does not come
(deadline, loop gone, an error in policy code) is the configured ``on_error`` action, and a
callback never raises into libmilter. libmilter calls one instance per MTA connection, from
one thread at a time; :mod:`mqpolicy.milter.runner` runs libmilter.

What the milter decides, per message:

* RCPT: limits keyed on the recipient are spent per recipient (the others only checked, so
  an exhausted sender is refused at RCPT already); defer -> ``451 4.7.1 <text>`` for this
  recipient only, reject -> ``550 5.7.1 <text>``; hold -> the message is quarantined at the
  end. With ``rcpt_limits: policy_server`` Postfix's policy server already decides RCPT for
  SMTP mail, so the milter only remembers the recipient (locally submitted mail, which
  never meets the policy server, is still decided here).
* END-OF-MESSAGE: classification with headers and envelope (all recipients, size), message
  limits (and recipient-keyed ones with lanes or header conditions, per recipient) spent in
  the final lane once per queue id (the once key; with ``rcpt_limits: policy_server`` the
  policy server's END-OF-MESSAGE only checks); a message refused or held here gets its RCPT
  spends back (the transaction's ledger, and the policy server's under the queue id); the
  decision's log line says the action taken; the message leaves with one ``X-MQ-Lane: <lane>``,
  ours, whatever lane headers the client sent; hold -> a hold record is written for the
  scheduler (not before the deciding limit's budget admits the message, with the budgets
  the held decision did not spend, for the release to spend), then
  ``quarantine(reason)``; defer -> ``451 4.7.1``; reject -> ``550 5.7.1``.
* Scheduled delivery (:mod:`mqpolicy.milter.scheduled_delivery`): ``X-MQ-Deliver-After`` or
  ``Deferred-Delivery`` is honoured when ``scheduler.schedule.allow`` matches the
  END-OF-MESSAGE request: a time in the future (capped at ``max_delay``) writes a record
  with that not-before time and quarantines the message. Both headers are removed from every
  message, honoured or not. A record that cannot be written means ``on_error`` for a
  message that was to be held: held mail without a record would never be released. Without
  a queue id (an MTA that does not send the ``i`` macro) a hold is a plain quarantine that
  no scheduler knows about, and a scheduled time is ignored.
* Mail submitted locally to Postfix (``non_smtpd_milters``: connect from ``localhost``
  ``127.0.0.1`` port 0) cannot refuse one recipient; a recipient decision that refuses is
  kept and applied to the whole message at END-OF-MESSAGE.

Only CHGHDRS and QUARANTINE are negotiated (a header change past the last occurrence adds
the header); the MTA skips DATA, EOH and unknown
commands, and HELO and the body when no rule, limit or schedule of the policy looks at the
HELO name or the message size; it does not wait for replies to connect, HELO, MAIL, headers
and body chunks.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import Milter

from mqpolicy.daemon.structured_log import connection_id_var, queue_id_var
from mqpolicy.decision.engine import Action, Verdict, classify, ledger_key
from mqpolicy.decision.hold_terms import held_until, unspent_budgets
from mqpolicy.decision.service import decision_fields, wall_clock_ms
from mqpolicy.milter.gateway import DecisionGateway, DecisionUnavailable
from mqpolicy.milter.scheduled_delivery import SCHEDULE_HEADERS, requested_time, schedule_hold_text
from mqpolicy.policy.model import ErrorAction, Lane, RcptLimits
from mqpolicy.policy.request import STAGE_END_OF_MESSAGE, STAGE_RCPT, Request, domain_of
from mqpolicy.store.hold_records import HoldRecord, hold_destinations

__all__ = ["PolicyMilter"]

log = logging.getLogger("mqpolicy.milter")
decision_log = logging.getLogger("mqpolicy.decision")  # the decisions' line, as the service's

# Bounds on what one message may make the milter keep (the MTA bounds the rest).
MAX_HEADER_VALUE = 8192  # characters of one header value kept for classification
MAX_HEADERS = 1000  # headers kept for classification (lane headers are always counted)
MAX_RECIPIENTS = 10000  # recipients kept for conditions (all are counted)
MAX_REPLY_TEXT = 400  # characters of an SMTP reply text

ERROR_TEXT = "Policy service error, try again later"
_SCHEDULE_NAMES = {name.lower(): name for name in SCHEDULE_HEADERS}


_F = TypeVar("_F", bound=Callable[..., int])
# pymilter is untyped: give its decorator a type. @noreply callbacks answer nothing when the
# MTA agrees (always CONTINUE); the protocol steps of callbacks not overridden are skipped.
_noreply: Callable[[_F], _F] = Milter.noreply
CONTINUE: int = Milter.CONTINUE
TEMPFAIL: int = Milter.TEMPFAIL
REJECT: int = Milter.REJECT


def _strip_brackets(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def _one_line(text: str) -> str:
    """One ASCII line: controls blanked, bounded."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else " " for c in text)[:MAX_REPLY_TEXT]


def _reply_text(text: str) -> str:
    """One ASCII line for setreply, '%' doubled (the MTA formats the reply with it)."""
    return _one_line(text).replace("%", "%%")


def _delete_headers(msg: _Message, name: str, count: int, down_to: int = 1) -> None:
    """Plan the deletion of occurrences ``count`` .. ``down_to`` of header ``name``, last
    first: the indexes of the earlier ones stay valid."""
    for index in range(count, down_to - 1, -1):
        msg.changes.append(("change", name, index, ""))


@dataclass(slots=True)
class _Message:
    """What one transaction (MAIL FROM ... end of message) accumulates."""

    instance: str = ""  # this transaction's id: its RCPT spends' ledger (see eom)
    sender: str = ""
    sasl_username: str = ""
    queue_id: str = ""
    recipients: list[str] = field(default_factory=list)
    recipient_total: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    header_bytes: int = 0
    lane_headers: int = 0  # client-sent lane headers seen (replaced by ours at the end)
    # scheduled-delivery headers: (canonical name, value) in order; all deleted at the end
    schedule_headers: list[tuple[str, str]] = field(default_factory=list)
    body_bytes: int = 0
    refusal: Verdict | None = None  # a recipient refusal kept for the end (local submission)
    hold: Verdict | None = None  # a hold decided at RCPT, applied at the end
    demoted_to: Lane | None = None  # the lowest lane a RCPT decision demoted to
    failed: str = ""  # a callback without a reply failed: apply on_error at the next reply
    # the end-of-message decision, logged once its action is taken (see PolicyMilter.eom)
    decided: tuple[Request, Verdict] | None = None
    # header changes and the quarantine, sent last (see PolicyMilter._send_changes):
    # (kind, header name, index, value or reason), kind "change" or "quarantine"
    changes: list[tuple[str, str, int, str]] = field(default_factory=list)


_CONNECTION_IDS = itertools.count(1)  # next() on it is atomic under the GIL
_TRANSACTION_IDS = itertools.count(1)
# apart from every other milter process's (they may share one Redis store)
_PROCESS_TAG = f"milter.{secrets.token_hex(6)}"


class PolicyMilter(Milter.Base):  # type: ignore[misc]  # pymilter is untyped
    """One MTA connection. libmilter calls one instance from one thread at a time."""

    def __init__(self, gateway: DecisionGateway) -> None:
        super().__init__()
        self.gateway = gateway
        self.settings = gateway.settings
        self._lane_header = gateway.settings.lane_header.lower()
        self.client_address = ""
        self.client_name = ""
        self.helo_name = ""
        self.local_submission = False
        self.protocol_name = ""
        self.msg: _Message | None = None
        self.conn_id = f"m{next(_CONNECTION_IDS):x}"
        # what MAIL and header callbacks answer: NOREPLY once the MTA agreed to expect none
        self._mail_rc = self._header_rc = CONTINUE
        gateway.counters.add("connections_active")

    # --- negotiation ------------------------------------------------------------------

    def negotiate(self, opts: list[int]) -> Any:
        offered = opts[1]
        rc = super().negotiate(opts)  # protocol steps from the decorators below
        if rc == CONTINUE:
            wanted = Milter.CHGHDRS | Milter.QUARANTINE
            opts[0] = self._actions = opts[0] & wanted
            # HELO and the body only when a decision looks at them (per connection: a
            # reload that starts using them applies to connections made after it)
            policy = self.gateway.policy
            skip = ((0 if policy.uses_helo else Milter.P_NOHELO)
                    | (0 if policy.uses_size else Milter.P_NOBODY))
            opts[1] = self._protocol = opts[1] | (offered & skip)
            no_reply: int = Milter.NOREPLY  # read now: pymilter's test module changes it
            self._mail_rc = no_reply if self._protocol & Milter.P_NR_MAIL else CONTINUE
            self._header_rc = no_reply if self._protocol & Milter.P_NR_HDR else CONTINUE
        return rc

    # --- connection -------------------------------------------------------------------

    @_noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        try:
            address, port = "", -1
            if family in (socket.AF_INET, socket.AF_INET6):
                if isinstance(hostaddr, tuple):
                    address, port = str(hostaddr[0]), int(hostaddr[1])
                elif isinstance(hostaddr, str):
                    address = hostaddr
            if not address:
                macro = self.getsymval("{client_addr}")
                address = str(macro) if macro else ""
            self.client_address = address
            name = str(hostname or "")
            self.client_name = "unknown" if name.startswith("[") or not name else name
            # Postfix's cleanup announces locally submitted mail as localhost/127.0.0.1/port 0.
            self.local_submission = (port == 0 and address == "127.0.0.1"
                                     and name.lower() == "localhost")
        except Exception as exc:
            self.gateway.failed("CONNECT", f"{type(exc).__name__}: {exc}", exc)
        return CONTINUE

    @_noreply
    def hello(self, hostname: str) -> int:
        self.helo_name = str(hostname or "")
        return CONTINUE

    # --- message ----------------------------------------------------------------------

    def _begin(self) -> _Message:
        if self.msg is not None:
            self.gateway.counters.add("messages_active", -1)
        self.msg = _Message(instance=f"{_PROCESS_TAG}.{next(_TRANSACTION_IDS):x}")
        self.gateway.counters.add("messages_active")
        return self.msg

    def _end(self) -> None:
        if self.msg is not None:
            self.msg = None
            self.gateway.counters.add("messages_active", -1)

    # libmilter's MAIL, RCPT and header callbacks reach the *_bytes methods below (pymilter
    # hands addresses and header values over as bytes); they do the work themselves rather
    # than through pymilter's decoding wrappers: these run for every message.

    def envfrom_bytes(self, mailfrom: bytes, *params: bytes) -> int:
        msg = self._begin()  # a new transaction: nothing of the previous one survives
        try:
            msg.sender = _strip_brackets(mailfrom.decode("utf-8", "surrogateescape"))
            getsymval = self._ctx.getsymval
            msg.sasl_username = str(getsymval("{auth_authen}") or "")
            msg.queue_id = str(getsymval("i") or "")
            self.protocol_name = str(getsymval("r") or self.protocol_name)
        except Exception as exc:
            msg.failed = f"MAIL: {type(exc).__name__}: {exc}"
        return self._mail_rc

    @_noreply
    def envfrom(self, mailfrom: str, *params: str) -> int:
        """MAIL with a decoded address (pymilter's test context calls this one)."""
        self.envfrom_bytes(str(mailfrom).encode("utf-8", "surrogateescape"))
        return CONTINUE

    def envrcpt_bytes(self, to: bytes, *params: bytes) -> int:
        return self.envrcpt(to.decode("utf-8", "surrogateescape"))

    def envrcpt(self, to: str, *params: str) -> int:
        msg = self.msg if self.msg is not None else self._begin()
        recipient = _strip_brackets(str(to))
        try:
            return self._envrcpt(msg, recipient)
        except Exception as exc:
            self.gateway.failed(STAGE_RCPT, f"{type(exc).__name__}: {exc}", exc)
            return self._rcpt_error(msg, recipient, "")

    def _envrcpt(self, msg: _Message, recipient: str) -> int:
        msg.recipient_total += 1
        if len(msg.recipients) < MAX_RECIPIENTS:
            msg.recipients.append(recipient)
        if msg.failed:
            return self._rcpt_error(msg, recipient, msg.failed)
        if (self.settings.rcpt_limits is RcptLimits.POLICY_SERVER
                and not self.local_submission):
            return CONTINUE
        msg.queue_id = str(self.getsymval("i") or msg.queue_id)
        queue_id_var.set(msg.queue_id)
        connection_id_var.set(self.conn_id)
        request = self._request(msg, STAGE_RCPT, recipient=recipient)
        try:
            verdict = self.gateway.decide(request)
        except DecisionUnavailable:
            return self._rcpt_error(msg, recipient, "")
        if verdict.demoted and (msg.demoted_to is None
                                or verdict.lane.priority > msg.demoted_to.priority):
            msg.demoted_to = verdict.lane
        action = verdict.action
        if action is Action.HOLD:
            msg.hold = msg.hold or verdict
        elif action in (Action.DEFER, Action.REJECT):
            if self.local_submission:
                msg.refusal = msg.refusal or verdict
                return CONTINUE
            self._forget(msg, recipient)
            return self._refuse(verdict)
        return CONTINUE

    def _rcpt_error(self, msg: _Message, recipient: str, why: str) -> int:
        """on_error at RCPT (``why``: a failure not logged yet). Locally submitted mail
        cannot refuse one recipient: the failure is kept for the end of the message."""
        if why:
            self.gateway.failed(STAGE_RCPT, why)
        if self.local_submission:
            msg.failed = msg.failed or "RCPT: no decision"
            return CONTINUE
        rc = self._on_error()
        if rc != CONTINUE:
            self._forget(msg, recipient)
        return rc

    @staticmethod
    def _forget(msg: _Message, recipient: str) -> None:
        """A refused recipient is no recipient of the message."""
        msg.recipient_total -= 1
        if msg.recipients and msg.recipients[-1] == recipient:
            msg.recipients.pop()

    def header_bytes(self, name: str, raw: bytes) -> int:
        msg = self.msg
        if msg is None:
            return self._header_rc
        try:
            lowered = name.lower()
            if lowered == self._lane_header:
                msg.lane_headers += 1  # a client may not choose its lane: never classified
                return self._header_rc
            msg.header_bytes += len(name) + len(raw) + 4
            value = raw[:MAX_HEADER_VALUE * 4].decode("utf-8", "surrogateescape")
            value = value[:MAX_HEADER_VALUE]
            schedule_name = _SCHEDULE_NAMES.get(lowered)
            if schedule_name is not None:
                msg.schedule_headers.append((schedule_name, value))
            if len(msg.headers) < MAX_HEADERS:
                msg.headers.append((name, value))
        except Exception as exc:
            msg.failed = f"header: {type(exc).__name__}: {exc}"
        return self._header_rc

    @_noreply
    def header(self, name: str, value: str) -> int:
        """A header with a decoded value (pymilter's test context may call this one)."""
        self.header_bytes(str(name), str(value).encode("utf-8", "surrogateescape"))
        return CONTINUE

    @_noreply
    def body(self, chunk: bytes) -> int:
        if self.msg is not None:
            self.msg.body_bytes += len(chunk)
        return CONTINUE

    def eom(self) -> int:
        msg = self.msg if self.msg is not None else self._begin()
        try:
            try:
                rc = self._eom(msg)
            except Exception as exc:
                self.gateway.failed(STAGE_END_OF_MESSAGE, f"{type(exc).__name__}: {exc}", exc)
                rc = self._on_error(msg)
            rc = self._send_changes(msg, rc)
            if msg.decided is not None:
                self._log_decision(msg, rc)
            if rc != CONTINUE or any(kind == "quarantine" for kind, _, _, _ in msg.changes):
                self._give_back(msg)
            return rc
        finally:
            self._end()  # after the changes: a drain waits for them too

    def _send_changes(self, msg: _Message, rc: int) -> int:
        """Send the message's header changes and quarantine, then answer ``rc``.

        libmilter writes each change to the MTA the moment it is asked for, the answer
        after the callback returns: asked for last, they reach the MTA together with the
        answer, which reads them in one wake-up instead of one each. A refusal needs
        none."""
        if rc != CONTINUE:
            return rc
        try:
            for kind, name, index, value in msg.changes:
                if kind == "change":
                    self.chgheader(name, index, value)
                else:
                    self.quarantine(value)
        except Exception as exc:
            self.gateway.failed(STAGE_END_OF_MESSAGE, f"{type(exc).__name__}: {exc}", exc)
            return self._on_error()
        return rc

    def _eom(self, msg: _Message) -> int:
        msg.queue_id = str(self.getsymval("i") or msg.queue_id)
        queue_id_var.set(msg.queue_id)
        connection_id_var.set(self.conn_id)
        if msg.failed:
            self.gateway.failed(STAGE_END_OF_MESSAGE, msg.failed)
            return self._on_error(msg)
        if msg.refusal is not None:
            return self._refuse(msg.refusal)
        request = self._request(msg, STAGE_END_OF_MESSAGE)
        try:
            verdict = self.gateway.decide(request, logged=False)
        except DecisionUnavailable:
            return self._on_error(msg, request)
        msg.decided = (request, verdict)
        action = verdict.action
        if action in (Action.DEFER, Action.REJECT):
            return self._refuse(verdict)
        lane = verdict.lane
        if msg.demoted_to is not None and msg.demoted_to.priority > lane.priority:
            lane = msg.demoted_to
        self._set_lane(msg, lane.name)
        hold = verdict if action is Action.HOLD else msg.hold
        if hold is None and not msg.schedule_headers:
            return CONTINUE  # the usual message: nothing to hold, record or strip
        self._strip_schedule_headers(msg)
        now = wall_clock_ms()
        not_before, scheduled_by = self._scheduled(msg, request, now)
        if hold is None and not scheduled_by:
            return CONTINUE
        if self.gateway.records is not None and not msg.queue_id:
            # no {i} macro: nothing to key a record on; the MTA's own hold, no schedule
            log.warning("hold without a queue id (macro i): held without a record",
                        extra={"fields": {"sender": msg.sender or "<>"}})
            if hold is None:
                return CONTINUE
        elif self.gateway.records is not None:
            reason = hold.hold_reason if hold is not None else f"schedule:{scheduled_by}"
            if hold is not None:  # not before the deciding limit's budget admits it
                not_before = max(not_before, held_until(now, hold))
            # a hold decided here spent nothing: the release spends it (one decided at RCPT
            # and accepted here was spent here)
            record = HoldRecord(queue_id=msg.queue_id, lane=lane.name, not_before_ms=not_before,
                                created_ms=now, reason=reason,
                                destinations=hold_destinations(map(domain_of, msg.recipients)),
                                sender=msg.sender,
                                spends=unspent_budgets(verdict) if hold is verdict else ())
            if not self.gateway.put_record(record):
                return self._on_error(msg, request)
        text = (hold.text.strip() if hold is not None
                else schedule_hold_text(not_before, scheduled_by))
        # the reason is kept as given (Sendmail lists it with -bp -qQ): no '%' doubling
        msg.changes.append(("quarantine", "", 0, _one_line(text or "held by mqpolicy")))
        return CONTINUE

    def _give_back(self, msg: _Message) -> None:
        """A message refused or held at its end costs nothing: the RCPT spends made for it
        are given back, the milter's own (its transaction's ledger) and, in wiring B, the
        policy server's (left under the queue id by its END-OF-MESSAGE decision). Held
        mail is spent when the scheduler releases it."""
        try:
            self.gateway.give_back(ledger_key("i:" + msg.instance))
            if msg.queue_id and self.settings.rcpt_limits is RcptLimits.POLICY_SERVER:
                self.gateway.give_back(ledger_key("q:" + msg.queue_id))
        except Exception as exc:
            self.gateway.failed(STAGE_END_OF_MESSAGE, f"give-back: {exc}", exc)

    def _log_decision(self, msg: _Message, rc: int) -> None:
        """The end-of-message decision's log line, with the action taken: ``hold`` when
        the message is quarantined (a limit, a lane, a RCPT hold or a schedule),
        ``defer`` or ``reject`` when refused, else ``accept``."""
        assert msg.decided is not None
        request, verdict = msg.decided
        if rc == TEMPFAIL:
            taken = "defer"
        elif rc == REJECT:
            taken = "reject"
        elif any(kind == "quarantine" for kind, _, _, _ in msg.changes):
            taken = "hold"
        else:
            taken = "accept"
        fields = decision_fields(request, verdict, self.gateway.policy.logged_headers)
        fields["action"] = taken
        decision_log.info("decision", extra={"fields": fields})

    def _scheduled(self, msg: _Message, request: Request, now: int) -> tuple[int, str]:
        """(not-before time, the header that asked) when the message asked for a later
        delivery and may; (now, "") otherwise."""
        if not msg.schedule_headers:
            return now, ""
        scheduler = self.gateway.policy.scheduler
        fields: dict[str, object] = {"qid": msg.queue_id, "sender": msg.sender or "<>"}
        allow = scheduler.schedule.allow if scheduler is not None else None
        if scheduler is None or allow is None or not allow(request):
            log.info("scheduled delivery not allowed: header ignored and removed",
                     extra={"fields": fields})
            return now, ""
        if self.gateway.records is None:
            log.warning("scheduled delivery needs the scheduler's record store: ignored",
                        extra={"fields": fields})
            return now, ""
        asked = requested_time(msg.schedule_headers, now, scheduler.schedule.max_delay_ms)
        if asked is None or asked.not_before_ms is None:
            fields["problem"] = asked.problem if asked is not None else "no header"
            log.info("scheduled delivery header unreadable: ignored and removed",
                     extra={"fields": fields})
            return now, ""
        if asked.not_before_ms <= now:
            return now, ""
        return asked.not_before_ms, asked.header

    def _strip_schedule_headers(self, msg: _Message) -> None:
        """Delete every scheduled-delivery header."""
        counts: dict[str, int] = {}
        for name, _ in msg.schedule_headers:
            counts[name] = counts.get(name, 0) + 1
        for name, count in counts.items():
            _delete_headers(msg, name, count)

    def abort(self) -> int:
        self._end()
        return CONTINUE

    def close(self) -> int:
        self._end()
        self.gateway.counters.add("connections_active", -1)
        return CONTINUE

    # --- helpers ----------------------------------------------------------------------

    def _request(self, msg: _Message, stage: str, recipient: str = "") -> Request:
        at_end = stage == STAGE_END_OF_MESSAGE
        if at_end and msg.recipient_total == 1 and msg.recipients:
            recipient = msg.recipients[0]  # as Postfix's policy server sees a single recipient
        return Request(
            stage=stage,
            client_address=self.client_address,
            client_name=self.client_name,
            reverse_client_name=self.client_name,
            helo_name=self.helo_name,
            sasl_username=msg.sasl_username,
            sender=msg.sender,
            recipient=recipient,
            recipient_count=msg.recipient_total if at_end else 0,
            size=msg.header_bytes + 2 + msg.body_bytes if at_end else 0,
            queue_id=msg.queue_id,
            instance=msg.instance,
            protocol_name=self.protocol_name,
            recipients=tuple(msg.recipients) if at_end else (),
            headers=tuple(msg.headers) if at_end else None,
        )

    def _set_lane(self, msg: _Message, lane: str | None) -> None:
        """Leave the message with one lane header, ours (none when ``lane`` is None).

        Client-sent lane headers after the first are deleted, last first (the indexes of
        the others stay valid); the first is changed to our lane, which adds the header
        when the client sent none: in libmilter's contract a change past the last
        occurrence adds the header (Postfix's cleanup and Sendmail both do). One change
        per message, also when a client forged one, where a delete and an add would be
        two packets to the MTA."""
        name = self.settings.lane_header
        _delete_headers(msg, name, msg.lane_headers, down_to=2)
        if lane is not None:
            msg.changes.append(("change", name, 1, lane))
        elif msg.lane_headers:
            msg.changes.append(("change", name, 1, ""))

    def _refuse(self, verdict: Verdict) -> int:
        text = _reply_text(verdict.text)
        if verdict.action is Action.REJECT:
            self.setreply("550", "5.7.1", text)
            return REJECT
        self.setreply("451", "4.3.0" if verdict.store_error else "4.7.1", text)
        return TEMPFAIL

    def _on_error(self, msg: _Message | None = None, request: Request | None = None) -> int:
        """The configured failure action. At the end of a message that is accepted anyway,
        forged lane headers and scheduled-delivery headers still go (whatever changes were
        planned before the failure are dropped), and the lane is classified without the
        store."""
        if self.settings.on_error is ErrorAction.TEMPFAIL:
            self.setreply("451", "4.3.0", ERROR_TEXT)
            return TEMPFAIL
        if msg is not None:
            lane: str | None = None
            try:
                if request is not None:
                    lane = classify(request, self.gateway.policy)[0].name
            except Exception as exc:
                self.gateway.failed(STAGE_END_OF_MESSAGE, f"classify: {exc}", exc)
            msg.changes.clear()
            self._set_lane(msg, lane)
            self._strip_schedule_headers(msg)
        return CONTINUE
