"""Postfix and Sendmail delivery results from their logs, and which of them mean "slow
down". Pure.

:func:`parse_delivery_line` turns one log line into a :class:`DeliveryEvent` or None.
Accepted line formats (the header up to ``QUEUEID: ``):

* classic syslog and Postfix's own ``maillog_file`` (postlogd)::

      Nov 27 20:52:09 mta postfix/smtp[368]: B084820C4AA: to=<a@b>, relay=..., status=...

* RFC 3339 timestamps (rsyslog's high-precision format, ``journalctl -o short-iso``)::

      2026-11-27T20:31:02.123456+00:00 mta postfix/mq-bulk/smtp[123]: B0848...: to=<...

The program may be any Postfix syslog name (``postfix/smtp``, ``postfix/mq-bulk/smtp``
from ``-o syslog_name=postfix/mq-bulk``, ``postfix-bulk/smtp``); ``service`` keeps it
whole. Every ``QID: to=<...>, ..., status=...`` line is a delivery result, whichever
daemon wrote it (smtp, lmtp, local, virtual, pipe, discard, error, and qmgr's
``delivery temporarily suspended`` deferrals); :attr:`DeliveryEvent.program` tells them
apart. qmgr's message-level ``from=<...>, status=expired, returned to sender`` is an
event with status ``expired`` and no recipient. ``status=SOFTBOUNCE`` (``soft_bounce =
yes``) is reported as ``deferred``. Address-verification probes (``deliverable``,
``undeliverable``) and everything else (smtpd, cleanup, qmgr queue lines, warnings,
garbage) give None. The parser never raises on its input.

Sendmail's lines (program ``sendmail``, ``sm-mta`` or ``sm-msp-queue``, either timestamp)::

    Dec  7 11:31:26 mta sendmail[19641]: 6B7BVQZu019632: to=<u@yahoo.com>, delay=00:00:00,
        xdelay=00:00:00, mailer=esmtp, pri=30180, relay=mx.yahoo.com. [192.0.2.1],
        dsn=4.7.0, reply=421 4.7.0 [TSS04] Messages from ... temporarily deferred ...,
        stat=Deferred: Connection reset by mx.yahoo.com.

``stat=Sent (...)`` is ``sent``; ``stat=Deferred[: text]`` is ``deferred``; any other
``stat`` is ``bounced`` when the DSN is 5.x.x (``deferred`` when 4.x.x). The remote reply
is the ``reply=`` field (Sendmail 8.15 and later log it before ``stat=``, which may then
say only what happened to the connection), else the ``stat`` text.
A line with several recipients (``to=<a@x>,<b@x>``: one delivery to one host) is read as
its first recipient's. Other Sendmail lines (``from=``, ``stat=queued``, milter and
daemon messages) give None.

:func:`slow_down_reason` says whether a result is a receiver asking us to slow down.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from mqpolicy.policy.request import domain_of

STATUSES = frozenset({"sent", "deferred", "bounced", "expired"})
_STATUS_ALIASES = {"softbounce": "deferred"}

_MONTHS = {
    name: i + 1
    for i, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    )
}
_PROGRAM = r"(?P<host>\S+) (?P<prog>[^\s\[\]:/]+(?:/[^\s\[\]:/]+)+)(?:\[(?P<pid>\d{1,10})\])?: "
_SYSLOG_STAMP = (
    r"(?P<mon>(?i:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)) {1,2}(?P<day>\d{1,2}) "
    r"(?P<clock>\d\d):(?P<min>\d\d):(?P<sec>\d\d)(?:\.(?P<frac>\d{1,9}))?"
)
_STAMP = re.compile(_SYSLOG_STAMP)
_SYSLOG_HEADER = re.compile(f"(?P<stamp>{_SYSLOG_STAMP}) " + _PROGRAM)
_ISO_HEADER = re.compile(
    r"(?P<ts>\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?) " + _PROGRAM
)
_QUEUE_ID = re.compile(r"(?P<qid>[0-9A-Za-z]{5,20}): ")
_SM_PROGRAM = (r"(?P<host>\S+) (?P<prog>sm-mta|sendmail|sm-msp-queue)"
               r"(?:\[(?P<pid>\d{1,10})\])?: ")
_SM_SYSLOG_HEADER = re.compile(_SYSLOG_HEADER.pattern[:-len(_PROGRAM)] + _SM_PROGRAM)
_SM_ISO_HEADER = re.compile(_ISO_HEADER.pattern[:-len(_PROGRAM)] + _SM_PROGRAM)
_SM_STAT = ", stat="
_SM_REPLY_FIELD = ", reply="
_SM_REPLY = re.compile(r"(?P<status>Sent|Deferred)(?:: (?P<reply>.*)| \((?P<sent>.*)\))?$", re.S)
_FIELD = re.compile(r"(?P<name>[a-z_]{2,16})=")
_STATUS_WORD = re.compile(r"(?P<status>[A-Za-z]+)")
_RELAY_HOST = re.compile(r"(?P<host>[^\[\s]+)(?:\[[^\]]*\](?::\d+)?)?")
_DSN = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_REMOTE = re.compile(r"\bhost \S+? (?:said|refused to talk to me): ")
_IN_REPLY_TO = re.compile(r" \(in reply to [^()]*\)$")
_REPLY_CODE = re.compile(r"(?P<code>[2-5]\d\d)(?:[ -]|$)")
_ENHANCED = re.compile(r"\b(?P<class>[245])\.(?P<subject>\d{1,3})\.(?P<detail>\d{1,3})\b")
_QUEUED_AS = re.compile(r"\bqueued as (?P<id>\S+?)\)?$")
_MAX_LINE = 16_384


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    """One delivery result (one recipient) from the log.

    ``timestamp`` is aware when the line carries a zone or a ``reference`` was given,
    None for a classic syslog line parsed without ``reference`` (it has no year).
    ``reply`` is the remote server's reply as Postfix logged it (multi-line replies
    joined with spaces, without the ``(in reply to ... command)`` suffix); for results
    without a remote reply it is Postfix's own text (``connect to ...: Connection
    refused``, ``delivered to mailbox``). ``reply_code`` is the SMTP code when the text
    starts with one. ``detail`` is Postfix's whole text in the parentheses after the
    status (``delivery temporarily suspended: host ... said: ...``).
    """

    timestamp: datetime | None
    service: str
    queue_id: str
    recipient: str
    domain: str
    relay_host: str
    status: str
    dsn: str
    reply: str
    reply_code: int | None
    orig_recipient: str = ""
    relay: str = ""
    detail: str = ""
    host: str = ""
    pid: int | None = None
    line: str = ""

    @property
    def program(self) -> str:
        """The daemon: ``smtp`` for ``postfix/mq-bulk/smtp``."""
        return self.service.rpartition("/")[2]

    @property
    def syslog_name(self) -> str:
        """The ``syslog_name`` part: ``postfix/mq-bulk`` for ``postfix/mq-bulk/smtp``."""
        return self.service.rpartition("/")[0]

    @property
    def transport(self) -> str:
        """The master.cf service that delivered, as its syslog name shows it: ``mq-bulk``
        for ``postfix/mq-bulk/smtp`` (``-o syslog_name=postfix/mq-bulk``, as
        ``postfix-config`` gives each lane's transport), ``smtp`` for ``postfix/smtp``."""
        parts = self.service.split("/")
        return parts[-2] if len(parts) >= 3 else parts[-1]

    @property
    def remote_queue_id(self) -> str:
        """The receiving server's queue id when its reply names one (``250 2.0.0 Ok:
        queued as 4Xyz``), else ''."""
        match = _QUEUED_AS.search(self.reply)
        return match["id"] if match else ""

    @property
    def suspended(self) -> bool:
        """Postfix did not try: it repeats an earlier result for a dead destination."""
        return self.detail.startswith("delivery temporarily suspended")

    @property
    def message(self) -> str:
        """:attr:`reply` without the code prefixes of joined continuation lines, so
        ``... has been temporarily 421-4.7.28 rate limited`` reads
        ``... has been temporarily rate limited``."""
        return collapse_reply(self.reply, self.reply_code)


def parse_delivery_line(line: str, *, reference: datetime | None = None) -> DeliveryEvent | None:
    """A :class:`DeliveryEvent` for a delivery-result line, else None. Never raises.

    ``reference`` (an aware "now") completes syslog timestamps that have no year and
    no zone: the year that puts the line at most a week after ``reference``, and
    ``reference``'s zone.
    """
    if not isinstance(line, str):
        return None
    line = line.rstrip("\r\n")
    if len(line) > _MAX_LINE or "=" not in line:
        return None
    try:
        return _parse(line, reference)
    except (ValueError, OverflowError, IndexError):
        return None


def parse_delivery_lines(
    lines: Iterable[str], *, reference: datetime | None = None
) -> Iterable[DeliveryEvent]:
    for line in lines:
        event = parse_delivery_line(line, reference=reference)
        if event is not None:
            yield event


def _postfix_header(line: str, reference: datetime | None
                    ) -> tuple[re.Match[str], datetime | None] | None:
    """A Postfix line's header (syslog, or ``maillog_file``'s ISO time) and its time; None
    for a line with neither."""
    header = _SYSLOG_HEADER.match(line)
    if header is not None:
        return header, _syslog_time(header, reference)
    header = _ISO_HEADER.match(line)
    if header is None:
        return None
    timestamp = datetime.fromisoformat(header["ts"])
    if timestamp.tzinfo is None and reference is not None:
        timestamp = timestamp.replace(tzinfo=reference.tzinfo)
    return header, timestamp


def _parse(line: str, reference: datetime | None) -> DeliveryEvent | None:
    found = _postfix_header(line, reference)
    if found is None:
        return _parse_sendmail(line, reference)
    header, timestamp = found
    qid = _QUEUE_ID.match(line, header.end())
    if qid is None:
        return None
    parsed = _fields(line, qid.end())
    if parsed is None:
        return None
    fields, status_text, detail = parsed
    status = status_text.lower()
    status = _STATUS_ALIASES.get(status, status)
    if status not in STATUSES:
        return None
    recipient = fields.get("to", "")
    if not recipient and not (status == "expired" and "from" in fields):
        return None
    relay = fields.get("relay", "")
    reply, code = _reply(detail)
    pid = header["pid"]
    return DeliveryEvent(
        timestamp=timestamp,
        service=header["prog"],
        queue_id=qid["qid"],
        recipient=recipient,
        domain=domain_of(recipient),
        relay_host=_relay_host(relay),
        status=status,
        dsn=fields.get("dsn", "") if _DSN.fullmatch(fields.get("dsn", "")) else "",
        reply=reply,
        reply_code=code,
        orig_recipient=fields.get("orig_to", ""),
        relay=relay,
        detail=detail,
        host=header["host"],
        pid=int(pid) if pid else None,
        line=line,
    )


def _parse_sendmail(line: str, reference: datetime | None) -> DeliveryEvent | None:
    """A Sendmail delivery line (see the module's docstring), else None."""
    header = _SM_SYSLOG_HEADER.match(line)
    if header is not None:
        timestamp = _syslog_time(header, reference)
    else:
        header = _SM_ISO_HEADER.match(line)
        if header is None:
            return None
        timestamp = datetime.fromisoformat(header["ts"])
        if timestamp.tzinfo is None and reference is not None:
            timestamp = timestamp.replace(tzinfo=reference.tzinfo)
    qid = _QUEUE_ID.match(line, header.end())
    if qid is None or not line.startswith("to=", qid.end()):
        return None
    rest = line[qid.end():]
    cut = rest.find(_SM_STAT)
    if cut < 0:
        return None
    body = rest[:cut]
    at = body.find(_SM_REPLY_FIELD)
    remote = ""
    if at >= 0:  # the reply may hold ", ": it runs to stat=
        body, remote = body[:at], body[at + len(_SM_REPLY_FIELD):]
    fields: dict[str, str] = {}
    for part in body.split(", "):
        name, equals, value = part.partition("=")
        if equals:
            fields.setdefault(name, value)
    first = fields.get("to", "").split(",")[0].strip()
    recipient = first[1:-1] if first.startswith("<") and first.endswith(">") else first
    if not recipient:
        return None
    dsn = fields.get("dsn", "") if _DSN.fullmatch(fields.get("dsn", "")) else ""
    stat = rest[cut + len(_SM_STAT):]
    known = _SM_REPLY.match(stat)
    if known is not None:
        sent = known["status"] == "Sent"
        status = "sent" if sent else "deferred"
        reply = (known["sent"] or "") if sent else (remote or known["reply"] or "")
    elif dsn.startswith("5."):
        status, reply = "bounced", remote or stat
    elif dsn.startswith("4."):
        status, reply = "deferred", remote or stat
    else:
        return None  # queued, quarantined, ...: not a delivery result
    code = _REPLY_CODE.match(reply)
    relay = fields.get("relay", "")
    pid = header["pid"]
    return DeliveryEvent(
        timestamp=timestamp,
        service=header["prog"],
        queue_id=qid["qid"],
        recipient=recipient,
        domain=domain_of(recipient),
        relay_host=_relay_host(relay).rstrip("."),
        status=status,
        dsn=dsn,
        reply=reply,
        reply_code=int(code["code"]) if code and status != "sent" else None,
        relay=relay,
        detail=f"{remote} ({stat})" if remote else stat,
        host=header["host"],
        pid=int(pid) if pid else None,
        line=line,
    )


def _fields(line: str, pos: int) -> tuple[dict[str, str], str, str] | None:
    """``name=value, `` fields up to ``status=WORD (detail)``, which ends the line.

    Addresses (``<...>``) may hold quoted parts with commas, ``>`` or ``=`` inside.
    Returns (fields, status word, detail); None when the line is not shaped like a
    delivery result.
    """
    fields: dict[str, str] = {}
    first = True
    while True:
        m = _FIELD.match(line, pos)
        if m is None:
            return None
        name, pos = m["name"], m.end()
        if first and name not in ("to", "from"):
            return None
        first = False
        if name == "status":
            word = _STATUS_WORD.match(line, pos)
            if word is None:
                return None
            rest = line[word.end():]
            detail = ""
            if rest.startswith(" ("):
                # the detail runs to the end of the line; its closing parenthesis may be
                # missing when a syslog daemon cut the line short
                detail = rest[2:-1] if rest.endswith(")") else rest[2:]
            elif rest.startswith(", "):
                detail = rest[2:]  # "status=expired, returned to sender"
            elif rest.strip():
                return None
            return fields, word["status"], detail
        if line.startswith("<", pos):
            end = _address_end(line, pos)
            if end < 0:
                return None
            value, pos = line[pos + 1:end], end + 1
        else:
            end = line.find(", ", pos)
            if end < 0:
                return None
            value, pos = line[pos:end], end
        if not line.startswith(", ", pos):
            return None
        pos += 2
        fields.setdefault(name, value)


def _address_end(line: str, start: int) -> int:
    """Index of the ``>`` closing the address opened at ``start`` (quotes respected)."""
    end = line.find(">", start + 1)
    if end >= 0 and line.find('"', start + 1, end) < 0:
        return end  # no quoted part before the first ">": that one (the usual address)
    quoted = False
    i = start + 1
    n = len(line)
    while i < n:
        c = line[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            return i
        i += 1
    return -1


def _syslog_time(header: re.Match[str], reference: datetime | None) -> datetime | None:
    if reference is None:
        return None
    return _stamp_datetime(header["stamp"], reference)


@functools.lru_cache(maxsize=1024)  # a log's lines come many to the second
def _stamp_datetime(stamp: str, reference: datetime) -> datetime | None:
    """:func:`syslog_datetime` of a header's time, by its text (one key to hash, where
    the parts are six)."""
    parts = _STAMP.fullmatch(stamp)
    if parts is None:
        return None
    return syslog_datetime(parts["mon"], parts["day"], parts["clock"], parts["min"],
                           parts["sec"], parts["frac"] or "0", reference)


@functools.lru_cache(maxsize=1024)  # a log's lines come many to the second
def syslog_datetime(mon: str, day: str, hour: str, minute: str, sec: str, frac: str,
                    reference: datetime) -> datetime | None:
    month = _MONTHS[mon.lower()]
    micro = int(frac[:6].ljust(6, "0"))
    for year in (reference.year + 1, reference.year, reference.year - 1, reference.year - 4):
        try:
            candidate = datetime(year, month, int(day), int(hour), int(minute), int(sec),
                                 micro, tzinfo=reference.tzinfo)
        except ValueError:  # Feb 29 in a year without one
            continue
        if candidate <= reference + timedelta(days=7):
            return candidate
    return None


def _relay_host(relay: str) -> str:
    """``mx.b`` from ``mx.b[192.0.2.1]:25``; '' for ``none``."""
    if not relay or relay == "none":
        return ""
    m = _RELAY_HOST.match(relay)
    return m["host"].lower() if m else relay.lower()


def _reply(detail: str) -> tuple[str, int | None]:
    remote = _REMOTE.search(detail)
    reply = detail[remote.end():] if remote is not None else detail
    if reply.endswith(")"):  # else no "(in reply to ...)" to drop
        reply = _IN_REPLY_TO.sub("", reply)
    code = _REPLY_CODE.match(reply)
    return reply, int(code["code"]) if code else None


def collapse_reply(reply: str, code: int | None) -> str:
    """Drop the ``421-4.7.28 `` prefixes Postfix leaves inside a joined multi-line reply
    (and the leading code): the remote's words, with phrases whole again."""
    if code is None:
        return reply
    pattern = re.compile(rf"(?:^|(?<=\s)){code}[ -](?:[245]\.\d{{1,3}}\.\d{{1,3}}\s+)?")
    return " ".join(pattern.sub(" ", reply).split())


# ---------------------------------------------------------------- message facts

MESSAGE_LINE_KINDS = frozenset({"client", "queued", "removed", "refused"})
_CLIENT = re.compile(
    r"client=(?P<name>[^\[\s,]*)\[(?P<addr>[^\]\s]*)\](?::\d{1,5})?(?P<rest>(?:, .*)?)$")
_SASL_USER = re.compile(r", sasl_username=(?P<user>[^,]*)")
_QUEUED = re.compile(
    r"from=<(?P<sender>.*)>, size=(?P<size>\d{1,15}), nrcpt=(?P<nrcpt>\d{1,9}) \(queue active\)$")
_REFUSED = re.compile(
    r"(?P<act>reject|hold|milter-reject|milter-hold|discard|milter-discard): "
    r"(?P<stage>[A-Z][A-Z-]{2,20}) from (?P<name>[^\[\s]*)\[(?P<addr>[^\]\s]*)\](?::\d{1,5})?: "
    r"(?P<text>.*?); from=<(?P<sender>.*?)> to=<(?P<rcpt>.*?)>(?: proto=\S+)?(?: helo=<.*>)?$")


_REFUSALS = frozenset({"reject", "hold", "discard", "milter-reject", "milter-hold",
                       "milter-discard"})


@dataclass(frozen=True, slots=True)
class MessageLine:
    """A line with facts of a message as it came in (Postfix), for rebuilding it.

    ``kind`` is ``client`` (smtpd's ``QID: client=NAME[ADDR][, sasl_method=M,
    sasl_username=U]``), ``queued`` (qmgr's ``QID: from=<S>, size=N, nrcpt=N (queue
    active)``), ``removed`` (qmgr's ``QID: removed``: the queue file is gone, and Postfix may
    give its id to a later message) or ``refused`` (smtpd's or cleanup's ``QID|NOQUEUE:
    reject|hold|discard|milter-reject|milter-hold: STAGE from NAME[ADDR]: TEXT; from=<S>
    to=<R> ...``:
    ``action`` is the word before the colon, ``code`` the SMTP code TEXT starts with, 0
    when it has none).
    """

    kind: str
    timestamp: datetime | None
    host: str
    queue_id: str
    client_name: str = ""
    client_address: str = ""
    sasl_username: str = ""
    sender: str = ""
    size: int = 0
    nrcpt: int = 0
    recipient: str = ""
    stage: str = ""
    action: str = ""
    code: int = 0
    text: str = ""


UNPARSABLE = "unparsable"
"""What :func:`read_log_line` says of a line with no log header it knows, or a delivery or
message line it cannot read whole."""
OTHER = "other"
"""What :func:`read_log_line` says of a well-formed log line that carries no message facts
(connect, disconnect, message-id, removed, warnings, other programs)."""


def read_log_line(line: str, *, reference: datetime | None = None
                  ) -> DeliveryEvent | MessageLine | str:
    """A delivery result, a message's facts, else why the line gives neither
    (:data:`UNPARSABLE` or :data:`OTHER`). Never raises."""
    if not isinstance(line, str):
        return UNPARSABLE
    line = line.rstrip("\r\n")
    if len(line) > _MAX_LINE:
        return UNPARSABLE
    try:
        if "status=" in line:
            event = _parse(line, reference)
            if event is not None:
                return event
        return _parse_message_line(line, reference)
    except (ValueError, OverflowError, IndexError):
        return UNPARSABLE


def _parse_message_line(line: str, reference: datetime | None) -> MessageLine | str:
    found = _postfix_header(line, reference)
    if found is None:
        if _SM_SYSLOG_HEADER.match(line) or _SM_ISO_HEADER.match(line):
            return OTHER  # Sendmail: its deliveries are read, its intake is not
        return UNPARSABLE
    header, timestamp = found
    qid = _QUEUE_ID.match(line, header.end())
    if qid is None:
        return OTHER
    body = line[qid.end():]
    queue_id = qid["qid"]
    host = header["host"]
    if body.startswith("client="):
        m = _CLIENT.match(body)
        if m is None:
            return UNPARSABLE
        user = _SASL_USER.search(m["rest"])
        return MessageLine("client", timestamp, host, queue_id, client_name=m["name"],
                           client_address=m["addr"], sasl_username=user["user"] if user else "")
    if body.startswith("from=<") and body.endswith("(queue active)"):
        m = _QUEUED.match(body)
        if m is None:
            return UNPARSABLE
        return MessageLine("queued", timestamp, host, queue_id, sender=m["sender"],
                           size=int(m["size"]), nrcpt=int(m["nrcpt"]))
    if body == "removed":
        return MessageLine("removed", timestamp, host, queue_id)
    if "from=<" in body and " to=<" in body and ": " in body[:16]:
        m = _REFUSED.match(body)
        if m is None:
            refusal = body.split(":", 1)[0] in _REFUSALS
            return UNPARSABLE if refusal else OTHER
        code = _REPLY_CODE.match(m["text"])
        return MessageLine("refused", timestamp, host, queue_id, client_name=m["name"],
                           client_address=m["addr"], sender=m["sender"], recipient=m["rcpt"],
                           stage=m["stage"], action=m["act"],
                           code=int(code["code"]) if code else 0, text=m["text"])
    return OTHER


# ---------------------------------------------------------------- slow down


def compile_patterns(texts: Sequence[str]) -> tuple[re.Pattern[str], ...]:
    """Operator patterns, case-insensitive. Raises :class:`ValueError` naming the bad one."""
    compiled = []
    for text in texts:
        try:
            compiled.append(re.compile(text, re.IGNORECASE))
        except re.error as exc:
            raise ValueError(f"bad regular expression {text!r}: {exc}") from None
    return tuple(compiled)


# Built-in signs of throttling, matched against "<dsn> <message>": the large providers'
# own words first (the most telling reason), then SMTP 421, then generic phrases.
PROVIDER_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("gmail-unusual-rate", re.compile(r"\b4\.7\.28\b|unusual rate of", re.I)),
    (
        "yahoo-deferred",
        re.compile(
            r"\[TSS?0\d\]|\bTSS0\d\b|temporarily deferred due to "
            r"(?:unexpected volume or )?user complaints",
            re.I,
        ),
    ),
    (
        "microsoft-rate-limited",
        re.compile(r"\b4\.7\.650\b|\bS3150\b|\btemporarily rate limited\b", re.I),
    ),
)
GENERIC_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "too-many-connections",
        re.compile(r"too many (?:concurrent |simultaneous )?(?:connections|sessions)", re.I),
    ),
    (
        "rate-limited",
        re.compile(
            r"rate[- ]?limit|throttl|too many (?:messages|recipients|mails?)\b|"
            r"sending (?:rate|too fast)|\bslow down\b",
            re.I,
        ),
    ),
    ("try-again-later", re.compile(r"\btry again later\b", re.I)),
)
_GREYLISTING = re.compile(r"gr[ae]y[- ]?list", re.I)


def _temporary(event: DeliveryEvent) -> bool:
    if event.reply_code is not None:
        return 400 <= event.reply_code < 500
    return event.status == "deferred" or event.dsn.startswith("4.")


def _mailbox_level(event: DeliveryEvent) -> bool:
    """X.2.Y enhanced codes are about one mailbox (full, receiving too fast), not the
    destination as a whole."""
    enhanced = _ENHANCED.search(event.dsn) or _ENHANCED.match(
        event.reply[4:] if event.reply_code is not None else ""
    )
    return enhanced is not None and enhanced["subject"] == "2"


def slow_down_reason(
    event: DeliveryEvent, extra_patterns: Sequence[re.Pattern[str]] = ()
) -> str | None:
    """Why this result means "the receiver wants us to slow down", or None.

    * operator patterns (searched in the raw and the collapsed reply) count for deferred
      and bounced results: ``pattern:<regex>``;
    * built-in signs only for temporary failures with a remote reply: the providers'
      words (:data:`PROVIDER_PATTERNS`: Gmail 4.7.28 and "unusual rate", Yahoo
      TSS04/[TS0x]/"user complaints", Microsoft 4.7.650/S3150/"temporarily rate
      limited"), then any SMTP ``421`` (``smtp-421``), then :data:`GENERIC_PATTERNS`
      ("too many connections", "rate limit"/"throttl", "try again later");
    * never: successes, message-level expiry, results without a remote reply
      (connection refused, timeouts: those are not a receiver's request), greylisting,
      and mailbox-level codes (X.2.Y: one full or busy mailbox is not the destination).
    """
    if event.status in ("sent", "expired") or not event.recipient:
        return None
    message = event.message
    for pattern in extra_patterns:
        if pattern.search(event.reply) or pattern.search(message):
            return f"pattern:{pattern.pattern}"
    if event.reply_code is None or not _temporary(event):
        return None
    if _GREYLISTING.search(message) or _mailbox_level(event):
        return None
    text = f"{event.dsn} {message}"
    for name, pattern in PROVIDER_PATTERNS:
        if pattern.search(text):
            return name
    if event.reply_code == 421:
        return "smtp-421"
    for name, pattern in GENERIC_PATTERNS:
        if pattern.search(text):
            return name
    return None
