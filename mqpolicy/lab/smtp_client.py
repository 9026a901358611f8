"""An SMTP client for the lab: one message sent, and every reply it got (a refusal is a
result, not an exception)."""

from __future__ import annotations

import email.utils
import re
import smtplib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


_QUEUE_ID = re.compile(r"queued as ([0-9A-Za-z]+)")


@dataclass(frozen=True, slots=True)
class Submission:
    """The server's answer to each command of one message."""

    mail: Reply
    rcpts: tuple[tuple[str, Reply], ...]
    data: Reply | None  # None: DATA not sent (no recipient accepted, or disconnected)

    @property
    def accepted(self) -> tuple[str, ...]:
        return tuple(r for r, reply in self.rcpts if reply.ok)

    @property
    def queued(self) -> bool:
        return self.data is not None and self.data.ok

    @property
    def queue_id(self) -> str:
        match = _QUEUE_ID.search(self.data.text) if self.data else None
        return match.group(1) if match else ""

    def replies(self) -> list[Reply]:
        out = [self.mail, *(reply for _, reply in self.rcpts)]
        return [*out, self.data] if self.data is not None else out


def _reply(answer: tuple[int, bytes]) -> Reply:
    code, text = answer
    return Reply(code, text.decode("utf-8", "replace").replace("\n", " "))


def submit_on(conn: smtplib.SMTP, sender: str, recipients: Iterable[str],
              message: bytes | str) -> Submission:
    """One transaction on an open connection; refusals are results, not exceptions."""
    data = message.encode("utf-8") if isinstance(message, str) else message
    mail = _reply(conn.mail(sender))
    if not mail.ok:
        conn.rset()
        return Submission(mail, (), None)
    rcpts: list[tuple[str, Reply]] = []
    for rcpt in recipients:
        rcpts.append((rcpt, _reply(conn.rcpt(rcpt))))
    if not any(reply.ok for _, reply in rcpts):
        conn.rset()
        return Submission(mail, tuple(rcpts), None)
    try:
        end = _reply(conn.data(data))
    except smtplib.SMTPDataError as exc:
        error = exc.smtp_error
        text = error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error)
        end = Reply(exc.smtp_code, text)
    return Submission(mail, tuple(rcpts), end)


def submit(host: str, port: int, sender: str, recipients: Iterable[str],
           message: bytes | str, *, helo: str = "client.mqpolicy.test",
           timeout_s: float = 60.0) -> Submission:
    """Open a connection, send one message, QUIT."""
    with smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout_s) as conn:
        return submit_on(conn, sender, recipients, message)


def make_message(sender: str, recipients: Iterable[str], subject: str, body: str = "",
                 headers: Mapping[str, str] | None = None) -> bytes:
    """A small RFC 5322 message."""
    rcpts = list(recipients)
    lines = [
        f"From: <{sender}>",
        f"To: {', '.join(f'<{r}>' for r in rcpts[:3])}{', ...' if len(rcpts) > 3 else ''}",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: {email.utils.make_msgid(domain='client.mqpolicy.test')}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
        "",
        body or subject,
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


