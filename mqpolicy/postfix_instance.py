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
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

POSTFIX = os.environ.get("MQPOLICY_POSTFIX", "/usr/sbin/postfix")
POSTCONF = os.environ.get("MQPOLICY_POSTCONF", "/usr/sbin/postconf")
POSTQUEUE = os.environ.get("MQPOLICY_POSTQUEUE", "/usr/sbin/postqueue")
POSTSUPER = os.environ.get("MQPOLICY_POSTSUPER", "/usr/sbin/postsuper")

DEFAULT_MYHOSTNAME = "mta.mqpolicy.test"
_BACKDATE_S = 10
_COMMAND_TIMEOUT_S = 30


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
# Private Postfix instance written by mqpolicy.postfix_instance (not the system one).
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
# Private Postfix instance written by mqpolicy.postfix_instance: no chroot anywhere.
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
        self.queue_dir = root / "spool"
        self.data_dir = root / "data"
        self.log_file = root / "log" / "maillog"
        self._main_extra = ""
        self._master_extra = ""
        self._checked = False
        self._running = False

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
        written = [self.config_dir / "main.cf", self.config_dir / "master.cf"]
        written[0].write_text(_join(self.base_main_cf(), main_extra), encoding="utf-8")
        written[1].write_text(_join(self.base_master_cf(), master_extra), encoding="utf-8")
        for name, text in (files or {}).items():
            path = self.config_dir / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
        backdate(written)

    def config_path(self, name: str) -> Path:
        return self.config_dir / name

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
        try:
            text = self.log_file.read_text("utf-8", "replace")
        except FileNotFoundError:
            return "(no maillog)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout_s: float = 20.0) -> None:
        """``postfix check`` (first time: creates the spool), ``postfix start``, then wait
        until the SMTP port greets."""
        if not (self.config_dir / "main.cf").exists():
            self.write_config()
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

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        poll(lambda: smtp_banner(self.host, self.smtp_port) is not None, timeout_s,
             f"Postfix to greet on {self.host}:{self.smtp_port}")

    def reload(self, timeout_s: float = 20.0) -> None:
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


@contextlib.contextmanager
def running_instance(
    *, relayhost: str, main_extra: str = "", master_extra: str = "",
    files: Mapping[str, str] | None = None, prefix: str = "mqpostfix-",
) -> Iterator[PostfixInstance]:
    """A started instance under a temporary directory; stopped and removed on exit."""
    instance = PostfixInstance.create(relayhost=relayhost, prefix=prefix)
    try:
        instance.write_config(main_extra, master_extra, files)
        instance.start()
        yield instance
    finally:
        instance.remove()
