"""Postfix log lines for replay tests, in the format a real Postfix 3.7 writes them
(``maillog_file``; compare :mod:`tests.support.captured_maillog`): one message's smtpd,
cleanup, qmgr, delivery and removal lines, and smtpd's refusal of a recipient."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

DAY = datetime(2026, 12, 6, 10, 0, 0, tzinfo=UTC)
REFERENCE = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
"""What completes the lines' timestamps (syslog's have no year): a day after :data:`DAY`."""


def stamp(at_s: int) -> str:
    """A syslog timestamp ``at_s`` seconds after :data:`DAY` (``Dec  6 10:00:00``)."""
    t = DAY + timedelta(seconds=at_s)
    return f"{t:%b} {t.day:>2} {t:%H:%M:%S}"


@dataclass
class PostfixLog:
    """Lines appended message by message; queue ids made up, unique unless given."""

    host: str = "mta"
    lines: list[str] = field(default_factory=list)
    _next: int = 0x4A0000

    def message(self, at_s: int, sender: str, recipients: list[str], *,
                client: str = "mail.example[192.0.2.1]", sasl_username: str = "",
                size: int = 1200, status: str = "sent", transport: str = "smtp",
                queue_id: str = "") -> str:
        """A message received at ``at_s`` and delivered to each recipient; its queue id
        (``queue_id``: one used before, as Postfix reuses short queue ids)."""
        self._next += 1
        qid = queue_id or f"{self._next:X}B1C2"
        ts, h = stamp(at_s), self.host
        intake = f"{ts} {h} postfix/smtpd[331]: {qid}: client={client}"
        if sasl_username:
            intake += f", sasl_method=PLAIN, sasl_username={sasl_username}"
        self.lines += [
            f"{ts} {h} postfix/smtpd[331]: connect from {client}",
            intake,
            f"{ts} {h} postfix/cleanup[362]: {qid}: message-id=<{qid}@client.example>",
            f"{ts} {h} postfix/qmgr[328]: {qid}: from=<{sender}>, size={size}, "
            f"nrcpt={len(recipients)} (queue active)",
        ]
        dsn = {"sent": "2.0.0", "deferred": "4.4.1", "bounced": "5.1.1"}[status]
        reply = {"sent": "250 2.0.0 Ok: queued as 9F3A", "deferred": "connect to "
                 "mx.b[192.0.2.9]:25: Connection refused",
                 "bounced": "host mx.b[192.0.2.9] said: 550 5.1.1 no such user (in reply "
                 "to RCPT TO command)"}[status]
        program = "postfix/smtp" if transport == "smtp" else f"postfix/{transport}/smtp"
        for rcpt in recipients:
            self.lines.append(
                f"{ts} {h} {program}[368]: {qid}: to=<{rcpt}>, relay=mx.b[192.0.2.9]:25, "
                f"delay=0.12, delays=0.01/0.01/0.05/0.05, dsn={dsn}, status={status} ({reply})")
        if status != "deferred":
            self.lines.append(f"{ts} {h} postfix/qmgr[328]: {qid}: removed")
        self.lines.append(f"{ts} {h} postfix/smtpd[331]: disconnect from {client} ehlo=1 "
                          f"mail=1 rcpt={len(recipients)} data=1 quit=1 commands=5")
        return qid

    def refused(self, at_s: int, sender: str, recipient: str, *, code: int = 450,
                client: str = "mail.example[192.0.2.1]",
                text: str = "Sending rate of sender exceeded") -> None:
        """smtpd refusing one recipient (a policy service's answer) before any was taken."""
        dsn = "4.7.1" if code < 500 else "5.7.1"
        self.lines.append(
            f"{stamp(at_s)} {self.host} postfix/smtpd[331]: NOQUEUE: reject: RCPT from "
            f"{client}: {code} {dsn} <{recipient}>: Recipient address rejected: {text}; "
            f"from=<{sender}> to=<{recipient}> proto=ESMTP helo=<client.example>")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
