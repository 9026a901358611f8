"""mqpolicy's own decision log, read back: the messages its decisions saw.

With ``log.decisions: all`` every decision is logged at info with every fact a policy can
read (:func:`mqpolicy.decision.service.decision_fields`): the envelope, the client, the
size, and at the milter's end of message the headers the policy's conditions read, with
the lane and action the live policy chose. Lines are key=value or JSON, bare (a file
``serve`` wrote to) or behind a syslog or journal prefix (``/var/log/syslog``,
``journalctl -o short-iso``); a line's time is its ``ts`` field, else its prefix's.

:func:`read_decision_line` reads one line (pure: text in, a :class:`DecisionLine` out).
:class:`DecisionMessages` puts the lines of one SMTP transaction together: the RCPT
decisions by their ``instance`` (the policy server's, or the milter's own), the
end-of-message decisions by ``instance``, then by queue id (in wiring B the milter's
end-of-message line names its own instance and the queue id the policy server's lines
carry). Of two end-of-message decisions for one message, the one with headers (the
milter's, which spends and decides the lane) is the message's.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mqpolicy.feedback.delivery_log import syslog_datetime
from mqpolicy.policy.request import STAGE_END_OF_MESSAGE, STAGE_RCPT, Request

_KV_MARK = " msg=decision"
_JSON_MARK = '"msg": "decision"'
_KV_PAIR = re.compile(r'(?:^| )([a-z_]+)=("(?:[^"\\]|\\.)*"|[^ "]*)')
_KV_START = re.compile(r"(?:^|(?<= ))(?:ts|level)=")  # where a kv line starts
_PREFIX_TIME = re.compile(
    r"(?:(?P<iso>\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?)"
    r"|(?P<mon>(?i:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)) {1,2}(?P<day>\d{1,2}) "
    r"(?P<clock>\d\d):(?P<min>\d\d):(?P<sec>\d\d)(?:\.(?P<frac>\d{1,9}))?) "
)
# the code a refused RCPT's client saw, for merging its retries (the live reply's own code
# is not logged: these are the defaults of defer and reject)
REFUSED_CODES = {"defer": 450, "reject": 550}


class NotADecision(ValueError):
    """A line that says it is a decision but cannot be read as one."""


@dataclass(frozen=True, slots=True)
class DecisionLine:
    """One logged decision: the request as the line gives it back (what a policy can read
    of it; ``headers`` None where the front-end had none, the policy server), and what the
    live policy decided."""

    ms: int  # its time, ms since the epoch
    action: str  # accept, defer, hold, reject (the milter's: the action it took)
    lane: str
    request: Request
    demoted_from: str = ""


def is_decision_line(line: str) -> bool:
    """Whether a line is (or says it is) one of mqpolicy's decision lines."""
    return _KV_MARK in line or _JSON_MARK in line


def read_decision_line(line: str, reference: datetime | None = None) -> DecisionLine:
    """The decision a line logs. ``reference`` completes a syslog prefix's time (no year,
    no zone). :class:`NotADecision` for a line that is not a readable decision line."""
    line = line.rstrip("\r\n")
    brace = line.find("{")
    if _JSON_MARK in line and brace >= 0:
        try:
            data = json.loads(line[brace:])
        except ValueError:
            raise NotADecision("a JSON decision line that is not JSON") from None
        if not isinstance(data, dict):
            raise NotADecision("a JSON decision line that is not an object")
        fields: dict[str, Any] = data
        start = brace
    else:
        mark = line.find(_KV_MARK)
        if mark < 0:
            raise NotADecision("not a decision line")
        fields = {}
        found = _KV_START.search(line, 0, mark)
        start = found.start() if found is not None else mark
        for match in _KV_PAIR.finditer(line, start):
            name, value = match.groups()
            if value.startswith('"'):
                try:
                    value = json.loads(value)
                except ValueError:
                    raise NotADecision(f"{name}: a quoted value that is not JSON") from None
            fields[name] = value
    if fields.get("msg") != "decision":
        raise NotADecision("not a decision line")
    ms = _time_ms(fields.get("ts"), line[:start], reference)
    stage = str(fields.get("stage", ""))
    if stage not in (STAGE_RCPT, STAGE_END_OF_MESSAGE):
        raise NotADecision(f"stage {stage!r}")
    action = str(fields.get("action", ""))
    if action not in ("accept", "defer", "hold", "reject"):
        raise NotADecision(f"action {action!r}")
    sender = str(fields.get("sender", ""))
    request = Request(
        stage=stage, client_address=str(fields.get("client", "")),
        client_name=str(fields.get("client_name", "")),
        reverse_client_name=str(fields.get("reverse_client_name", "")),
        helo_name=str(fields.get("helo", "")), sasl_username=str(fields.get("user", "")),
        sender="" if sender == "<>" else sender, recipient=str(fields.get("rcpt", "")),
        recipient_count=_count(fields, "nrcpt"), size=_count(fields, "size"),
        queue_id=str(fields.get("qid", "")), instance=str(fields.get("instance", "")),
        protocol_name=str(fields.get("proto", "")), headers=_headers(fields.get("headers")))
    return DecisionLine(ms, action, str(fields.get("lane", "")), request,
                        str(fields.get("demoted_from", "")))


def _time_ms(ts: Any, prefix: str, reference: datetime | None) -> int:
    if isinstance(ts, int | float) and not isinstance(ts, bool):
        return int(ts * 1000)  # JSON: seconds since the epoch
    when: datetime | None = None
    if isinstance(ts, str):
        try:
            when = datetime.fromisoformat(ts)
        except ValueError:
            raise NotADecision(f"ts {ts!r}") from None
    else:
        found = _PREFIX_TIME.match(prefix)
        if found is not None and found["iso"]:
            try:
                when = datetime.fromisoformat(found["iso"])
            except ValueError:
                when = None
        elif found is not None and reference is not None:
            when = syslog_datetime(found["mon"], found["day"], found["clock"], found["min"],
                                   found["sec"], found["frac"] or "0", reference)
    if when is None:
        raise NotADecision("no time: neither a ts field nor a syslog or journal prefix")
    if when.tzinfo is None and reference is not None:
        when = when.replace(tzinfo=reference.tzinfo)
    return int(when.timestamp() * 1000)


def _count(fields: dict[str, Any], name: str) -> int:
    value = fields.get(name, 0)
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        raise NotADecision(f"{name} {value!r}") from None


def _headers(value: Any) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise NotADecision("headers: not JSON") from None
    if not isinstance(value, list) or not all(
            isinstance(pair, list) and len(pair) == 2
            and isinstance(pair[0], str) and isinstance(pair[1], str) for pair in value):
        raise NotADecision("headers: expected [[name, value], ...]")
    return tuple((name, text) for name, text in value)


@dataclass
class LoggedMessage:
    """One SMTP transaction as its decisions show it."""

    first_ms: int
    order: int  # the line number of its first decision: log order within a millisecond
    rcpts: list[DecisionLine] = field(default_factory=list)
    end: DecisionLine | None = None  # the end-of-message decision that counts
    queue_id: str = ""

    @property
    def recipients(self) -> dict[str, str]:
        """Each recipient and what the live run did with it: ``refused defer`` or
        ``refused reject`` at RCPT; else the message's end: ``accepted``, ``held``,
        ``deferred``, ``rejected`` (``accepted`` when no end was logged: the client
        gave up, or the log was cut)."""
        at_end = {"accept": "accepted", "hold": "held", "defer": "deferred",
                  "reject": "rejected"}[self.end.action] if self.end else "accepted"
        statuses: dict[str, str] = {}
        for d in self.rcpts:
            if d.action in REFUSED_CODES:
                statuses[d.request.recipient] = f"refused {d.action}"
            else:
                statuses[d.request.recipient] = "held" if d.action == "hold" else at_end
        return statuses


class DecisionMessages:
    """The transactions of decision lines fed in any order (several files, several
    processes)."""

    def __init__(self) -> None:
        self._by_instance: dict[str, LoggedMessage] = {}  # the RCPT decisions
        self._ends: list[tuple[int, DecisionLine]] = []
        self.lines = 0

    def add(self, decision: DecisionLine, order: int) -> None:
        self.lines += 1
        request = decision.request
        if request.stage == STAGE_END_OF_MESSAGE:
            self._ends.append((order, decision))  # joined at the end
            return
        key = request.instance or f"#{order}"
        message = self._by_instance.get(key)
        if message is None:
            message = self._by_instance[key] = LoggedMessage(decision.ms, order)
        elif decision.ms < message.first_ms:
            message.first_ms, message.order = decision.ms, order
        if request.queue_id:
            message.queue_id = request.queue_id
        message.rcpts.append(decision)

    def messages(self) -> list[LoggedMessage]:
        """Every transaction, with the end-of-message decision that counts for it: its
        own (the same instance) or, by queue id, the milter's. An end-of-message decision
        with no RCPT decision (a log cut off, or not ``log.decisions: all``) is a message
        of its own, without recipients."""
        by_instance = self._by_instance
        for _, end in self._ends:  # an end names the queue id its RCPTs may not have
            message = by_instance.get(end.request.instance)
            if message is not None and end.request.queue_id and not message.queue_id:
                message.queue_id = end.request.queue_id
        # Postfix reuses a queue id once its message is gone: the transaction it names is
        # the last one to have begun before the end
        by_queue_id: dict[str, list[LoggedMessage]] = {}
        for message in sorted(by_instance.values(), key=lambda m: (m.first_ms, m.order)):
            if message.queue_id:
                by_queue_id.setdefault(message.queue_id, []).append(message)
        found = list(by_instance.values())
        alone: dict[str, LoggedMessage] = {}
        for order, end in sorted(self._ends, key=lambda e: e[0]):
            queue_id, instance = end.request.queue_id, end.request.instance
            message = by_instance.get(instance) or _began_last(
                by_queue_id.get(queue_id, ()), end.ms)
            if message is None:
                key = queue_id or instance or f"#{order}"
                message = alone.get(key)
                if message is None:
                    message = alone[key] = LoggedMessage(end.ms, order, queue_id=queue_id)
                    found.append(message)
            if _better_end(end, message.end):
                message.end = end
        return found


def _began_last(messages: Sequence[LoggedMessage], ms: int) -> LoggedMessage | None:
    """Of the transactions with one queue id (in time order), the last to begin by ``ms``
    (the first, when all began later: clocks of two hosts)."""
    if not messages:
        return None
    at = bisect.bisect_right([m.first_ms for m in messages], ms)
    return messages[max(0, at - 1)]


def _better_end(new: DecisionLine, old: DecisionLine | None) -> bool:
    """Whether ``new`` is the message's end rather than ``old``: the one that saw the
    headers (the milter's), else the later."""
    if old is None:
        return True
    if (new.request.headers is None) != (old.request.headers is None):
        return new.request.headers is not None
    return new.ms >= old.ms


__all__ = ["REFUSED_CODES", "DecisionLine", "DecisionMessages", "LoggedMessage",
           "NotADecision", "is_decision_line", "read_decision_line"]
