"""The milter front-end (pymilter): milter callbacks in, a Request out, a verdict applied.

Translates only; every decision is made by :class:`~mqpolicy.decision.service.DecisionService`,
which lives on ONE asyncio loop (in ``serve`` the loop of the policy server too). libmilter
runs the callbacks on its own threads. A decision that needs no I/O (the embedded memory
store) is made right there on the callback's thread; any other (Redis, a destination
found by MX) is handed to the loop and waited for at most ``milter.timeout`` (by default
50 ms above the store deadline). A decision that misses that deadline, a loop that is gone
and any exception in policy code become the configured ``on_error`` action, logged once per
burst: a milter callback never raises into libmilter.

What the milter decides, per message:

* RCPT: limits keyed on the recipient are spent per recipient (the others only checked, so
  an exhausted sender is refused at RCPT already); defer -> ``451 4.7.1 <text>`` for this
  recipient only, reject -> ``550 5.7.1 <text>``; hold -> the message is quarantined at the
  end. With ``rcpt_limits: policy_server`` Postfix's policy server already decides RCPT for
  SMTP mail, so the milter only remembers the recipient (locally submitted mail, which
  never meets the policy server, is still decided here).
* END-OF-MESSAGE: classification with headers and envelope (all recipients, size), message
  limits spent once per queue id (the once key the policy server uses at END-OF-MESSAGE, so
  a message both see is counted once); the message leaves with one ``X-MQ-Lane: <lane>``,
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

The milter binds its socket itself and hands it to libmilter as ``fd:N``: a unix socket
gets its mode before anyone can connect, and a TCP socket gets ``TCP_NODELAY``. libmilter
writes each reply (a header change, then the final answer) with its own ``writev``; without
``TCP_NODELAY`` Nagle's algorithm holds the second write until the MTA acknowledges the
first, which a waiting MTA does only when its delayed-ACK timer fires: ~40 ms per message
that changes a header.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import Milter

from mqpolicy.daemon.structured_log import LogBurst, connection_id_var, queue_id_var
from mqpolicy.daemon.unix_sockets import OwnedSocket, bind_unix
from mqpolicy.decision.engine import Action, Verdict, classify
from mqpolicy.decision.hold_terms import held_until, unspent_budgets
from mqpolicy.decision.service import DecisionService, wall_clock_ms
from mqpolicy.metrics.registry import MetricsRegistry
from mqpolicy.milter.scheduled_delivery import (
    SCHEDULE_HEADERS,
    requested_time,
    schedule_hold_text,
)
from mqpolicy.policy.endpoints import MilterEndpoint
from mqpolicy.policy.model import ErrorAction, Lane, MilterSettings, Policy, RcptLimits
from mqpolicy.policy.request import STAGE_END_OF_MESSAGE, STAGE_RCPT, Request, domain_of
from mqpolicy.store.budget import StoreError
from mqpolicy.store.hold_records import (
    HoldRecord,
    HoldRecordStore,
    hold_destinations,
    record_ttl_for,
)

__all__ = [
    "DecisionGateway",
    "DecisionUnavailable",
    "MilterRunner",
    "PolicyMilter",
    "register_milter_metrics",
]

log = logging.getLogger("mqpolicy.milter")

# Bounds on what one message may make the milter keep (the MTA bounds the rest).
MAX_HEADER_VALUE = 8192  # characters of one header value kept for classification
MAX_HEADERS = 1000  # headers kept for classification (lane headers are always counted)
MAX_RECIPIENTS = 10000  # recipients kept for conditions (all are counted)
MAX_REPLY_TEXT = 400  # characters of an SMTP reply text

ERROR_TEXT = "Policy service error, try again later"
RECORD_WAIT_S = 2.0  # how long end of message waits for a hold record to be written
_SCHEDULE_NAMES = {name.lower(): name for name in SCHEDULE_HEADERS}


# ---------------------------------------------------------------- thread -> loop


class DecisionUnavailable(Exception):
    """No verdict in time (deadline, loop gone, or an error in policy code)."""


@dataclass
class MilterCounters:
    """Monotonic counts (``messages_active`` and ``connections_active`` are gauges)."""

    connections_active: int = 0
    messages_active: int = 0
    decisions: int = 0
    failures: int = 0
    timeouts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    idle: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        self.idle.set()

    def add(self, name: str, delta: int = 1) -> None:
        with self.lock:
            value = getattr(self, name) + delta
            setattr(self, name, value)
            if name == "messages_active":
                if not value:
                    self.idle.set()
                elif value == delta:  # from none to some
                    self.idle.clear()


class DecisionGateway:
    """Decisions for libmilter's threads: made on the calling thread when they need no
    I/O, else handed to the loop that owns the DecisionService and waited for."""

    def __init__(
        self,
        service: DecisionService,
        loop: asyncio.AbstractEventLoop,
        settings: MilterSettings,
        records: HoldRecordStore | None = None,
    ) -> None:
        self.service = service
        self.loop = loop
        self.settings = settings
        self.records = records
        self.counters = MilterCounters()
        self._failure_log = LogBurst()

    @property
    def policy(self) -> Policy:
        """The policy in force (swapped whole on reload; reading it is atomic)."""
        return self.service.policy

    def decide(self, request: Request) -> Verdict:
        """The verdict, or :class:`DecisionUnavailable` after logging why.

        Made here, on libmilter's thread, when it needs no I/O (the memory store:
        :meth:`~mqpolicy.decision.service.DecisionService.decide_now`); else on the loop."""
        try:
            verdict = self.service.decide_now(request)
        except Exception as exc:
            self.failed(request.stage, f"{type(exc).__name__}: {exc}", exc)
            raise DecisionUnavailable(str(exc)) from exc
        if verdict is None:
            verdict = self._decide_on_loop(request)
        self.counters.add("decisions")
        return verdict

    def _decide_on_loop(self, request: Request) -> Verdict:
        """Like ``asyncio.run_coroutine_threadsafe``, with one callback each way instead of
        two: a thread hand-off is most of what such a decision costs the milter."""
        future: concurrent.futures.Future[Verdict] = concurrent.futures.Future()
        tasks: list[asyncio.Task[Verdict]] = []
        try:
            self.loop.call_soon_threadsafe(self._start, request, future, tasks)
        except RuntimeError as exc:  # the loop is closed or gone
            self.failed(request.stage, f"decision loop unavailable: {exc}")
            raise DecisionUnavailable(str(exc)) from None
        wait_s = self.settings.wait_s(self.service.policy.store.timeout_ms)
        try:
            verdict = future.result(timeout=wait_s)
        except concurrent.futures.TimeoutError:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._cancel, tasks)
            self.counters.add("timeouts")
            self.failed(request.stage, f"no decision within {round(wait_s * 1000)} ms")
            raise DecisionUnavailable("timeout") from None
        except concurrent.futures.CancelledError:
            self.failed(request.stage, "decision cancelled")
            raise DecisionUnavailable("cancelled") from None
        except Exception as exc:
            self.failed(request.stage, f"{type(exc).__name__}: {exc}", exc)
            raise DecisionUnavailable(str(exc)) from exc
        return verdict

    def put_record(self, record: HoldRecord) -> bool:
        """Write a hold record on the loop; False (logged) when it could not be written."""
        records = self.records
        if records is None:
            return False
        policy = self.service.policy
        ttl = record_ttl_for(policy)
        try:
            future = asyncio.run_coroutine_threadsafe(records.put(record, ttl), self.loop)
        except RuntimeError as exc:
            self.failed(STAGE_END_OF_MESSAGE, f"hold record: loop unavailable: {exc}")
            return False
        try:
            future.result(timeout=max(RECORD_WAIT_S,
                                      self.settings.wait_s(policy.store.timeout_ms)))
        except concurrent.futures.TimeoutError:
            future.cancel()
            self.failed(STAGE_END_OF_MESSAGE, "hold record: no answer in time")
            return False
        except (StoreError, concurrent.futures.CancelledError) as exc:
            self.failed(STAGE_END_OF_MESSAGE, f"hold record: {exc}")
            return False
        return True

    def _start(self, request: Request, future: concurrent.futures.Future[Verdict],
               tasks: list[asyncio.Task[Verdict]]) -> None:
        """On the loop: run the decision, hand its outcome to the waiting thread."""
        if not future.set_running_or_notify_cancel():
            return
        task = self.loop.create_task(self.service.decide(request))
        tasks.append(task)

        def done(task: asyncio.Task[Verdict]) -> None:
            if future.done():  # the milter gave up already
                return
            if task.cancelled():
                future.set_exception(concurrent.futures.CancelledError())
            elif (exc := task.exception()) is not None:
                future.set_exception(exc)
            else:
                future.set_result(task.result())

        task.add_done_callback(done)

    @staticmethod
    def _cancel(tasks: list[asyncio.Task[Verdict]]) -> None:
        for task in tasks:
            task.cancel()

    def failed(self, where: str, why: str, exc: BaseException | None = None) -> None:
        """Count and log (once per burst) a failure that applies ``on_error``."""
        self.counters.add("failures")
        suppressed = self._failure_log.take()
        if suppressed is None:
            return
        fields = {"stage": where, "error": why, "on_error": self.settings.on_error.value,
                  "suppressed": suppressed}
        log.warning("milter decision failed, applying on_error", extra={"fields": fields},
                    exc_info=exc)


# ---------------------------------------------------------------- the milter

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
    # header changes and the quarantine, sent last (see PolicyMilter._send_changes):
    # (kind, header name, index, value or reason), kind "change" or "quarantine"
    changes: list[tuple[str, str, int, str]] = field(default_factory=list)


_CONNECTION_IDS = itertools.count(1)  # next() on it is atomic under the GIL


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
        self.msg = _Message()
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
            return self._send_changes(msg, rc)
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
            verdict = self.gateway.decide(request)
        except DecisionUnavailable:
            return self._on_error(msg, request)
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


# ---------------------------------------------------------------- running it


def bind_milter_socket(endpoint: MilterEndpoint, mode: int, backlog: int = 128,
                       ) -> tuple[socket.socket, OwnedSocket | None]:
    """A listening socket for libmilter, and the socket file to remove at the end (ours;
    None for TCP and for an inherited ``fd:N``): unix sockets get ``mode`` before
    ``listen()``, TCP sockets (also inherited ones) get ``TCP_NODELAY``, which accepted
    sockets inherit."""
    if endpoint.kind == "fd":
        sock = socket.socket(fileno=endpoint.fd)
    elif endpoint.kind == "unix":
        sock, owned = bind_unix(endpoint.path, mode)
        try:
            sock.listen(backlog)
        except BaseException:
            sock.close()
            owned.remove()
            raise
        return sock, owned
    else:
        family = socket.AF_INET6 if endpoint.kind == "inet6" else socket.AF_INET
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, family, socket.SOCK_STREAM)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # before listen(): no connection can be accepted without it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(infos[0][4])
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # An inherited socket: connections already queued keep what they had (systemd's
        # NoDelay=true in the .socket unit covers those).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, None


def _describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{address}"
    if sock.family == socket.AF_INET6:
        return f"inet6:{address[1]}@[{address[0]}]"
    return f"inet:{address[1]}@{address[0]}"


class MilterRunner:
    """Runs libmilter (``Milter.runmilter``) in a thread of its own, beside the asyncio loop
    that owns the DecisionService and the signal handlers.

    The loop stays in the main thread because SIGHUP must reload: libmilter turns SIGHUP,
    SIGTERM and SIGINT into "stop" in a signal thread of its own, and a Python signal
    handler only runs in the main thread. libmilter blocks those signals in the threads it
    starts, so the kernel hands them to the main thread and its loop.
    """

    def __init__(
        self,
        service: DecisionService,
        settings: MilterSettings,
        loop: asyncio.AbstractEventLoop,
        on_exit: Callable[[], None] | None = None,
        records: HoldRecordStore | None = None,
    ) -> None:
        self.settings = settings
        self.loop = loop
        self.gateway = DecisionGateway(service, loop, settings, records)
        self.endpoint = ""
        self._on_exit = on_exit
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, Any] | None = None  # family and address to wake the listener
        self._unix: OwnedSocket | None = None  # the socket file to remove at the end
        self._stopping = False
        self.exit_error: BaseException | None = None
        #: True when libmilter stopped by itself (not asked to by :meth:`stop`).
        self.failed = False

    def start(self) -> str:
        """Bind, register with libmilter and start serving; OSError when it cannot bind."""
        settings = self.settings
        sock, self._unix = bind_milter_socket(settings.listen, settings.listen_mode)
        self.endpoint = _describe(sock)
        self._wake = (sock.family, sock.getsockname())
        fd = sock.detach()  # libmilter owns and closes it from now on
        # The one library global: libmilter creates every connection through it.
        Milter.factory = functools.partial(PolicyMilter, self.gateway)
        exception_policy = (Milter.TEMPFAIL if settings.on_error is ErrorAction.TEMPFAIL
                            else Milter.CONTINUE)
        Milter.set_exception_policy(exception_policy)
        self._thread = threading.Thread(
            target=self._run, args=(f"fd:{fd}",), name="libmilter", daemon=True
        )
        self._thread.start()
        return self.endpoint

    def _run(self, conn: str) -> None:
        try:
            Milter.runmilter(self.settings.name, conn, self.settings.mta_timeout_s,
                             rmsock=False)
        except BaseException as exc:
            self.exit_error = exc
        finally:
            if not self._stopping:
                self.failed = True
                log.error("milter stopped unexpectedly",
                          extra={"fields": {"error": repr(self.exit_error)}})
                if self._on_exit is not None:
                    with contextlib.suppress(RuntimeError):  # the loop is gone already
                        self.loop.call_soon_threadsafe(self._on_exit)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def stop(self) -> None:
        """Stop accepting, wait (at most ``drain_timeout``) for messages in flight, then
        return. The loop must keep running meanwhile: those messages need decisions."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        thread = self._thread
        if thread is not None and thread.is_alive():
            # smfi_stop() waits for the listener, which holds its lock while it polls the
            # socket for up to 5 s: connect until the listener has seen the stop flag.
            stopper = loop.run_in_executor(None, Milter.stop)
            for _ in range(500):
                done, _ = await asyncio.wait({stopper}, timeout=0.02)
                if done:
                    break
                await loop.run_in_executor(None, self._wake_listener)
            await stopper
            await loop.run_in_executor(None, thread.join, 10.0)
        self._remove_socket()
        counters = self.gateway.counters
        if not await loop.run_in_executor(None, counters.idle.wait,
                                          self.settings.drain_timeout_s):
            log.warning("milter drain timeout: messages still in flight",
                        extra={"fields": {"messages": counters.messages_active}})

    def _wake_listener(self) -> None:
        """libmilter looks at its stop flag only between accepts (or every 5 s): connect."""
        if self._wake is None:
            return
        family, address = self._wake
        if family in (socket.AF_INET, socket.AF_INET6) and address[0] in ("0.0.0.0", "::"):
            address = ("127.0.0.1", address[1]) if family == socket.AF_INET else ("::1",
                                                                                   *address[1:])
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(address)

    def _remove_socket(self) -> None:
        if self._unix is None:
            return
        owned, self._unix = self._unix, None
        owned.remove()


def register_milter_metrics(registry: MetricsRegistry, counters: MilterCounters) -> None:
    registry.gauge("mqpolicy_milter_connections", "Open MTA connections to the milter",
                   lambda: counters.connections_active)
    registry.gauge("mqpolicy_milter_messages", "Messages the milter is in the middle of",
                   lambda: counters.messages_active)
    registry.counter("mqpolicy_milter_decisions_total", "Decisions the milter applied",
                     lambda: counters.decisions)
    registry.counter("mqpolicy_milter_failures_total",
                     "Milter steps that applied milter.on_error (no decision, or an error)",
                     lambda: counters.failures)
    registry.counter("mqpolicy_milter_timeouts_total",
                     "Milter decisions handed to the event loop that missed milter.timeout",
                     lambda: counters.timeouts)
