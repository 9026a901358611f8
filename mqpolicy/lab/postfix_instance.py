"""A private Postfix instance: own config, queue, data and log directories, loopback ports.

Used by the end-to-end tests, ``mqpolicy demo`` and the end-to-end benchmark. Never
touches the system instance: every command gets ``-c <config dir>``.

The instance's ``main.cf`` is a base configuration (loopback only, relay everything to a
local sink, log to a file) plus whatever the caller adds, normally the output of
``mqpolicy postfix-config``; ``master.cf`` likewise. Config files are backdated after
every write (Postfix re-reads a file changed in the last seconds, which costs seconds on
every command). Readiness is waited for by polling a connect, never by sleeping.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mqpolicy.lab.smtp_sink import SinkMessage, ThreadedSmtpSink
from mqpolicy.policy.endpoints import Endpoint
from mqpolicy.policy.loader import load_policy
from mqpolicy.postfix.config_generator import (
    HEADER_CHECKS_FILE,
    SECTION_HEADER_CHECKS,
    SECTION_MAIN,
    SECTION_MASTER,
    PostfixConfigOptions,
    generate,
    split_sections,
)
from mqpolicy.store.urls import check_store_url

POSTFIX = os.environ.get("MQPOLICY_POSTFIX", "/usr/sbin/postfix")
POSTCONF = os.environ.get("MQPOLICY_POSTCONF", "/usr/sbin/postconf")
POSTQUEUE = os.environ.get("MQPOLICY_POSTQUEUE", "/usr/sbin/postqueue")
POSTSUPER = os.environ.get("MQPOLICY_POSTSUPER", "/usr/sbin/postsuper")

DEFAULT_MYHOSTNAME = "mta.mqpolicy.test"
_BACKDATE_S = 10
_COMMAND_TIMEOUT_S = 30
#: How long to wait for something to get ready (a greeting, a reload, a queue state, a log
#: line): a bound only a broken system reaches, on a machine however loaded; every wait
#: ends as soon as what it waits for is there.
READY_TIMEOUT_S = 60.0


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text("utf-8", "replace")
    except FileNotFoundError:
        return f"(no log {path})"
    return "\n".join(text.splitlines()[-lines:])


class PostfixError(RuntimeError):
    """A Postfix command failed; the message carries its output and the log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def smtp_banner(host: str, port: int, timeout_s: float = 1.0) -> str | None:
    """The server's greeting line, or None when nothing answers (then QUIT)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(512)
                if not chunk:
                    return None
                data += chunk
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
                sock.recv(512)
            return data.decode("utf-8", "replace").strip()
    except OSError:
        return None


def poll(
    condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.02
) -> None:
    """Call ``condition`` until true; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)  # between polls of an external condition


# ---------------------------------------------------------------- base configuration

_BASE_MAIN_CF = """\
# Private Postfix instance written by mqpolicy.lab.postfix_instance (not the system one).
compatibility_level = 3.6
queue_directory = {queue_dir}
data_directory = {data_dir}
mail_owner = postfix
setgid_group = postdrop
myhostname = {myhostname}
mydomain = mqpolicy.test
myorigin = $myhostname
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relay_domains =
alias_maps =
alias_database =
local_recipient_maps =
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtpd_banner = $myhostname ESMTP
# Everything leaves for the local sink.
relayhost = {relayhost}
smtp_dns_support_level = disabled
smtp_host_lookup = native
biff = no
maillog_file = {log_file}
maillog_file_prefixes = {root}
"""

_BASE_MASTER_CF = """\
# Private Postfix instance written by mqpolicy.lab.postfix_instance: no chroot anywhere.
{host}:{port} inet n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


# ---------------------------------------------------------------- the queue and the log


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """One message of ``postqueue -j``."""

    queue_id: str
    queue_name: str  # maildrop, incoming, active, deferred, hold
    sender: str
    recipients: tuple[str, ...]
    reasons: tuple[str, ...]  # delay_reason per recipient ('' when none yet)
    arrival_time: int
    size: int

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> QueuedMessage:
        rcpts = data.get("recipients")
        items = [r for r in rcpts if isinstance(r, dict)] if isinstance(rcpts, list) else []
        return cls(
            queue_id=str(data.get("queue_id", "")),
            queue_name=str(data.get("queue_name", "")),
            sender=str(data.get("sender", "")),
            recipients=tuple(str(r.get("address", "")) for r in items),
            reasons=tuple(str(r.get("delay_reason", "")) for r in items),
            arrival_time=int(str(data.get("arrival_time", 0))),
            size=int(str(data.get("message_size", 0))),
        )


# postfix/mq-bulk/smtp[123]: 4Xyz: to=<a@b>, relay=..., dsn=2.0.0, status=sent (250 ...)
_DELIVERY = re.compile(
    r"\s(?P<prog>[\w.-]+(?:/[\w.-]+)*)\[\d+\]: (?P<qid>[0-9A-Za-z]+): "
    r"to=<(?P<rcpt>[^>]*)>,(?P<fields>.*?) status=(?P<status>\w+) \((?P<text>.*)\)$"
)
_QUEUED_AS = re.compile(r"queued as (\S+?)\)?$")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One ``to=<...>, status=...`` line of the mail log."""

    queue_id: str
    recipient: str
    status: str  # sent, deferred, bounced, expired
    program: str  # e.g. postfix/mq-bulk/smtp
    text: str  # the server's reply or the reason
    line: str

    @property
    def transport(self) -> str:
        """The master.cf service that delivered, from the syslog name.

        ``postfix/mq-bulk/smtp`` (``-o syslog_name=postfix/mq-bulk``) → ``mq-bulk``;
        ``postfix/smtp`` → ``smtp``.
        """
        parts = self.program.split("/")
        return parts[-2] if len(parts) >= 3 else parts[-1]

    @property
    def remote_id(self) -> str:
        """The receiving server's id from ``250 ... queued as ID`` ('' if none)."""
        match = _QUEUED_AS.search(self.text)
        return match.group(1) if match else ""


def parse_delivery(line: str) -> Delivery | None:
    match = _DELIVERY.search(line)
    if match is None:
        return None
    return Delivery(
        queue_id=match["qid"],
        recipient=match["rcpt"],
        status=match["status"],
        program=match["prog"],
        text=match["text"],
        line=line,
    )


@dataclass
class LogReader:
    """Reads a log file from an offset on; only complete lines are returned."""

    path: Path
    offset: int = 0
    _partial: bytes = field(default=b"", repr=False)

    def skip_to_end(self) -> None:
        try:
            self.offset = self.path.stat().st_size
        except FileNotFoundError:
            self.offset = 0
        self._partial = b""

    def read_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete]


# ---------------------------------------------------------------- the instance


class PostfixInstance:
    """One private Postfix: ``root/{etc,spool,data,log}`` and an SMTP port on loopback.

    ``relayhost`` is where all mail leaves for (normally ``[127.0.0.1]:<sink port>``).
    """

    def __init__(
        self,
        root: Path,
        *,
        relayhost: str,
        smtp_port: int = 0,
        host: str = "127.0.0.1",
        myhostname: str = DEFAULT_MYHOSTNAME,
    ) -> None:
        self.root = root
        self.host = host
        self.smtp_port = smtp_port or free_port(host)
        self.relayhost = relayhost
        self.myhostname = myhostname
        self.config_dir = root / "etc"
        self.queue_dir = self.queue_dir_of(root)
        self.data_dir = root / "data"
        self.log_file = root / "log" / "maillog"
        self._main_extra = ""
        self._master_extra = ""
        self._files: dict[str, str] = {}
        self._checked = False
        self._running = False

    @staticmethod
    def queue_dir_of(root: Path) -> Path:
        """The queue directory of an instance in ``root``."""
        return root / "spool"

    @property
    def running(self) -> bool:
        return self._running

    # ------------------------------------------------------------ files

    @classmethod
    def create(cls, *, relayhost: str, prefix: str = "mqpostfix-",
               myhostname: str = DEFAULT_MYHOSTNAME) -> PostfixInstance:
        """A new instance under a fresh temporary directory (short path, traversable by
        the ``postfix`` user)."""
        root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        root.chmod(0o755)
        return cls(root, relayhost=relayhost, myhostname=myhostname)

    def base_main_cf(self) -> str:
        return _BASE_MAIN_CF.format(
            queue_dir=self.queue_dir, data_dir=self.data_dir, myhostname=self.myhostname,
            host=self.host, relayhost=self.relayhost, log_file=self.log_file, root=self.root,
        )

    def base_master_cf(self) -> str:
        return _BASE_MASTER_CF.format(host=self.host, port=self.smtp_port)

    def write_config(
        self,
        main_extra: str = "",
        master_extra: str = "",
        files: Mapping[str, str] | None = None,
    ) -> None:
        """Write main.cf and master.cf (base + extras) and extra files (names relative to
        the config directory, e.g. the header-checks map), then backdate them all."""
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        self.data_dir.chmod(0o700)
        self._main_extra, self._master_extra = main_extra, master_extra
        self._files = dict(files or {})
        written = [self.config_dir / "main.cf", self.config_dir / "master.cf"]
        written[0].write_text(_join(self.base_main_cf(), main_extra), encoding="utf-8")
        written[1].write_text(_join(self.base_master_cf(), master_extra), encoding="utf-8")
        for name, text in (files or {}).items():
            path = self.config_dir / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
        backdate(written)

    def configure_from(self, policy_file: Path, command: Sequence[str]) -> str:
        """Run ``mqpolicy postfix-config`` (``command``: how mqpolicy is started) for
        ``policy_file`` against this instance and write what it prints into the
        configuration, as an operator pastes it; returns it. The base configuration is
        written first when there is none: the command reads this Postfix's settings
        (queue_directory, relayhost) as it would an operator's."""
        if not (self.config_dir / "main.cf").exists():
            self.write_config()
        proc = subprocess.run(
            [*command, "postfix-config", "-c", str(policy_file),
             "--config-directory", str(self.config_dir)],
            capture_output=True, text=True, timeout=60, check=False,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"mqpolicy postfix-config failed:\n{proc.stderr}")
        sections = split_sections(proc.stdout)
        self.write_config(sections[SECTION_MAIN], sections[SECTION_MASTER],
                          {HEADER_CHECKS_FILE: sections[SECTION_HEADER_CHECKS]})
        return proc.stdout

    # ------------------------------------------------------------ commands

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Postfix command (``argv`` already holds ``-c DIR`` where needed)."""
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise PostfixError(
                f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}{proc.stderr}"
                f"--- maillog tail:\n{self.log_tail()}"
            )
        return proc

    def postconf(self, *args: str) -> str:
        return self.run(POSTCONF, "-c", str(self.config_dir), *args).stdout

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_file, lines)

    def start(self, timeout_s: float = READY_TIMEOUT_S, attempts: int = 3) -> None:
        """``postfix check`` (first time: creates the spool), ``postfix start``, then wait
        until the SMTP port greets. A port taken meanwhile: again on a fresh port."""
        if not (self.config_dir / "main.cf").exists():
            self.write_config()
        for attempt in range(1, attempts + 1):
            try:
                self._start(timeout_s)
                return
            except PostfixError as exc:
                if attempt == attempts or "Address already in use" not in str(exc):
                    raise
                self.stop()
                self.smtp_port = free_port(self.host)
                self.write_config(self._main_extra, self._master_extra, self._files)

    def _start(self, timeout_s: float) -> None:
        if not self._checked:
            self.run(POSTFIX, "-c", str(self.config_dir), "check")
            (self.queue_dir / "quick-start").touch()
            self._checked = True
        self.run(POSTFIX, "-c", str(self.config_dir), "start")
        self._running = True
        try:
            self.wait_ready(timeout_s)
        except TimeoutError as exc:
            raise PostfixError(f"{exc}\n--- maillog tail:\n{self.log_tail()}") from None

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        poll(lambda: smtp_banner(self.host, self.smtp_port) is not None, timeout_s,
             f"Postfix to greet on {self.host}:{self.smtp_port}")

    def reload(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """``postfix reload`` after new config; waits for the master's reload log line."""
        reader = LogReader(self.log_file)
        reader.skip_to_end()
        self.run(POSTFIX, "-c", str(self.config_dir), "reload")

        def reloaded() -> bool:
            return any("/master[" in line and ": reload " in line
                       for line in reader.read_lines())

        poll(reloaded, timeout_s, "the Postfix master to reload")
        self.wait_ready(timeout_s)

    @property
    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout_s: float = 15.0) -> None:
        """``postfix stop``; if that fails, SIGTERM then SIGKILL the master by its PID.
        Returns once the master is gone. Idempotent."""
        if not self._running:
            return
        pid = self.master_pid
        self.run(POSTFIX, "-c", str(self.config_dir), "stop", check=False)
        self._running = False
        if pid is None:
            return
        with contextlib.suppress(TimeoutError):
            poll(lambda: not _alive(pid), timeout_s / 2, "the Postfix master to exit")
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            with contextlib.suppress(TimeoutError):
                poll(lambda: not _alive(pid), timeout_s / 4, "the Postfix master to exit")
                return

    def remove(self) -> None:
        """Stop if running and delete the whole directory tree."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ queue

    def queue(self) -> list[QueuedMessage]:
        """Every message in the queue (``postqueue -j``)."""
        out = self.run(POSTQUEUE, "-c", str(self.config_dir), "-j").stdout
        return [QueuedMessage.from_json(json.loads(line)) for line in out.splitlines() if line]

    def flush(self) -> None:
        """``postqueue -f``: attempt delivery of everything deferred now."""
        self.run(POSTQUEUE, "-c", str(self.config_dir), "-f")

    def release(self, queue_id: str) -> None:
        """Take a message out of the hold queue and deliver it now."""
        self.run(POSTSUPER, "-c", str(self.config_dir), "-H", queue_id)
        self.run(POSTQUEUE, "-c", str(self.config_dir), "-i", queue_id)

    def delete(self, queue_id: str = "ALL", queue_name: str = "") -> None:
        """``postsuper -d`` a message, or ALL (optionally of one queue: hold, deferred...)."""
        args = [POSTSUPER, "-c", str(self.config_dir), "-d", queue_id]
        if queue_name:
            args.append(queue_name)
        self.run(*args)

    # ------------------------------------------------------------ log

    def log_reader(self, *, from_end: bool = True) -> LogReader:
        reader = LogReader(self.log_file)
        if from_end:
            reader.skip_to_end()
        return reader


def _join(base: str, extra: str) -> str:
    if not extra:
        return base
    return base.rstrip("\n") + "\n\n" + extra.rstrip("\n") + "\n"


def backdate(paths: list[Path], seconds: int = _BACKDATE_S) -> None:
    """Set mtime in the past: Postfix re-reads recently changed config files slowly."""
    when = time.time() - seconds
    for path in paths:
        os.utime(path, (when, when))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); a reaped-or-zombie master is gone for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ---------------------------------------------------------------- an SMTP client


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


# ---------------------------------------------------------------- mqpolicy serve


class PolicyServerProcess:
    """``mqpolicy serve -c FILE`` as a child process, its log in a file.

    Started and stopped by its PID only; readiness is a successful connect.
    """

    def __init__(self, config: Path, endpoint: Endpoint, log_file: Path,
                 command: Sequence[str] = (sys.executable, "-m", "mqpolicy")) -> None:
        self.config = config
        self.endpoint = endpoint
        self.log_file = log_file
        self.command = tuple(command)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("mqpolicy serve is not running")
        return self._proc.pid

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        if self.running:
            raise RuntimeError("mqpolicy serve is already running")
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [*self.command, "serve", "-c", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        proc = self._proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"mqpolicy serve exited {proc.returncode}:\n"
                                   f"{self.log_tail()}")
            return accepts(self.endpoint)

        try:
            poll(ready, timeout_s, f"mqpolicy serve on {self.endpoint}")
        except TimeoutError:
            self.stop()
            raise

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (the server drains), SIGKILL if it does not exit in time. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _count(self, needle: str) -> int:
        try:
            return self.log_file.read_text("utf-8", "replace").count(needle)
        except FileNotFoundError:
            return 0

    def reload(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """SIGHUP, then wait for "policy reloaded"; raise if the reload was refused."""
        done, refused = self._count("policy reloaded"), self._count("reload refused")
        os.kill(self.pid, signal.SIGHUP)

        def finished() -> bool:
            if self._count("reload refused") > refused:
                raise RuntimeError(f"mqpolicy refused the new policy:\n{self.log_tail()}")
            return self._count("policy reloaded") > done

        poll(finished, timeout_s, "mqpolicy to reload its policy")

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_file, lines)


def accepts(endpoint: Endpoint) -> bool:
    """Whether something accepts connections on ``endpoint`` (connect, then close)."""
    family = socket.AF_UNIX if endpoint.is_unix else socket.AF_INET6 \
        if ":" in endpoint.host else socket.AF_INET
    address: str | tuple[str, int] = endpoint.path or (endpoint.host, endpoint.port)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(address)
        except OSError:
            return False
        return True


# ---------------------------------------------------------------- the whole stack


def policy_with_listen(text: str, listen: str, listen_mode: str | None = None) -> str:
    """The policy text with its ``listen`` set to ``listen`` (the stack's fresh port or
    socket), and ``listen_mode`` when given."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError("a policy file is a mapping")
    if "listen" not in data and (listen_mode is None or "listen_mode" not in data):
        mode = f'listen_mode: "{listen_mode}"\n' if listen_mode is not None else ""
        return f"listen: [\"{listen}\"]\n{mode}{text}"
    data["listen"] = [listen]
    if listen_mode is not None:
        data["listen_mode"] = listen_mode
    return yaml.safe_dump(data, sort_keys=False)


class MailStack:
    """A private Postfix, an SMTP sink behind it and ``mqpolicy serve`` beside it.

    Postfix's mqpolicy settings are the output of ``mqpolicy postfix-config`` for the
    current policy file (run as a command), added to the instance's base configuration.
    Every port is fresh. :meth:`close` stops everything, whatever state it is in.
    """

    def __init__(self, root: Path, *, sink_hostname: str = "sink.mqpolicy.test",
                 command: Sequence[str] = (sys.executable, "-m", "mqpolicy"),
                 policy_socket: str = "tcp") -> None:
        """``policy_socket``: ``tcp`` (a fresh loopback port) or ``unix`` (a socket inside
        Postfix's queue directory, which postfix-config names relative to it)."""
        self.root = root
        self.command = tuple(command)
        self.sink = ThreadedSmtpSink(hostname=sink_hostname)
        self.policy_file = root / "policy.yaml"
        self.policy_port = free_port()
        self.instance: PostfixInstance | None = None
        self._postfix_root = root / "postfix"
        if policy_socket == "unix":
            socket_dir = PostfixInstance.queue_dir_of(self._postfix_root) / "mqpolicy"
            endpoint = Endpoint(path=str(socket_dir / "policy.sock"))
        elif policy_socket == "tcp":
            endpoint = Endpoint(host="127.0.0.1", port=self.policy_port)
        else:
            raise ValueError(f"policy_socket is tcp or unix, not {policy_socket!r}")
        self.server = PolicyServerProcess(self.policy_file, endpoint, root / "mqpolicy.log",
                                          self.command)
        self.postfix_config = ""  # the last postfix-config output used
        self._rendered = ""  # the same, rendered in this process (to skip unchanged runs)
        self._log = LogReader(self._postfix_root / "log" / "maillog")
        self._deliveries: list[Delivery] = []

    @classmethod
    def create(cls, prefix: str = "mqstack-", **kwargs: Any) -> MailStack:
        root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        root.chmod(0o755)
        return cls(root, **kwargs)

    @property
    def postfix(self) -> PostfixInstance:
        if self.instance is None:
            raise RuntimeError("the stack is not started")
        return self.instance

    @property
    def smtp_port(self) -> int:
        return self.postfix.smtp_port

    def start(self, policy_text: str) -> None:
        """Start sink, mqpolicy and Postfix with this policy (``listen`` is replaced)."""
        try:
            port = self.sink.start()
            self.instance = PostfixInstance(self._postfix_root,
                                            relayhost=f"[127.0.0.1]:{port}")
            self.instance.root.mkdir(parents=True, exist_ok=True)
            self.instance.root.chmod(0o755)
            endpoint = self.server.endpoint
            if endpoint.path:
                Path(endpoint.path).parent.mkdir(parents=True, exist_ok=True)
            self._write_policy(policy_text)
            self._configure_postfix()
            self.server.start()
            self.instance.start()
        except BaseException:
            self.close()
            raise

    def _write_policy(self, policy_text: str) -> None:
        endpoint = self.server.endpoint
        # a unix socket smtpd (running as Postfix's mail_owner) may connect to
        text = policy_with_listen(policy_text, str(endpoint),
                                  "0666" if endpoint.path else None)
        self.policy_file.write_text(text, encoding="utf-8")

    def _configure_postfix(self) -> bool:
        """Write Postfix's config from the postfix-config command; True when it changed.

        The command takes most of a second to start; it is only run when the generator,
        called here in-process, renders something new for the policy file.
        """
        options = PostfixConfigOptions(config_directory=str(self.postfix.config_dir),
                                       queue_directory=str(self.postfix.queue_dir))
        rendered = generate(load_policy(self.policy_file, check_store_url), options).render()
        if self.postfix_config and rendered == self._rendered:
            return False
        text = self.postfix.configure_from(self.policy_file, self.command)
        self._rendered = rendered
        changed = text != self.postfix_config
        self.postfix_config = text
        return changed

    def apply_policy(self, policy_text: str) -> None:
        """Switch to a new policy: Postfix reloaded if its settings change, mqpolicy
        reloaded with SIGHUP (counters of unchanged limits survive, as in production)."""
        self._write_policy(policy_text)
        backdate([self.policy_file], 0)
        if self._configure_postfix():
            self.postfix.reload()
        if self.server.running:
            self.server.reload()
        else:
            self.server.start()

    # ------------------------------------------------------------ mail

    def send(self, sender: str, recipients: Iterable[str], subject: str = "test",
             body: str = "", headers: Mapping[str, str] | None = None) -> Submission:
        rcpts = list(recipients)
        message = make_message(sender, rcpts, subject, body, headers)
        return submit("127.0.0.1", self.smtp_port, sender, rcpts, message)

    def deliveries(self) -> list[Delivery]:
        """Every delivery line of the mail log so far."""
        for line in self._log.read_lines():
            delivery = parse_delivery(line)
            if delivery is not None:
                self._deliveries.append(delivery)
        return list(self._deliveries)

    def delivery_of(self, message: SinkMessage, timeout_s: float = READY_TIMEOUT_S) -> Delivery:
        """The log line of the delivery that produced ``message`` at the sink."""
        found: list[Delivery] = []

        def logged() -> bool:
            found[:] = [d for d in self.deliveries()
                        if d.status == "sent" and d.remote_id == message.sink_id]
            return bool(found)

        poll(logged, timeout_s, f"the delivery log line of sink message {message.sink_id}")
        return found[0]

    def wait_queue(self, predicate: Callable[[list[QueuedMessage]], bool],
                   timeout_s: float = READY_TIMEOUT_S) -> list[QueuedMessage]:
        seen: list[QueuedMessage] = []

        def check() -> bool:
            seen[:] = self.postfix.queue()
            return predicate(seen)

        poll(check, timeout_s, "the Postfix queue", interval_s=0.05)
        return seen

    def reset(self) -> None:
        """Empty the queue and the sink's records, restore normal sink replies."""
        if self.instance is not None and self.instance.running:
            self.instance.delete("ALL")
            self.instance.flush()  # also lifts any "delivery temporarily suspended"
        self.sink.clear()
        self.sink.clear_replies()

    def close(self) -> None:
        """Stop Postfix, mqpolicy and the sink (each even if another fails)."""
        try:
            if self.instance is not None:
                self.instance.stop()
        finally:
            try:
                self.server.stop()
            finally:
                self.sink.stop()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)
