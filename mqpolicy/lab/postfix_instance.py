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
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mqpolicy.feedback.log_follower import LogFollower
from mqpolicy.lab.readiness import READY_TIMEOUT_S, free_port, log_tail, poll, smtp_banner
from mqpolicy.postfix.programs import POSTCONF, POSTFIX, POSTQUEUE, POSTSUPER
from mqpolicy.postfix.settings import (
    HEADER_CHECKS_FILE,
    SECTION_HEADER_CHECKS,
    SECTION_MAIN,
    SECTION_MASTER,
    split_sections,
)
from mqpolicy.scheduler.mta_queue import QueueEntry
from mqpolicy.scheduler.postfix_queue import parse_postqueue_json

DEFAULT_MYHOSTNAME = "mta.mqpolicy.test"
_BACKDATE_S = 10
_COMMAND_TIMEOUT_S = 30


class PostfixError(RuntimeError):
    """A Postfix command failed; the message carries its output and the log's tail."""


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
        self.log_file = self.log_file_of(root)
        self._main_extra = ""
        self._master_extra = ""
        self._files: dict[str, str] = {}
        self._checked = False
        self._running = False

    @staticmethod
    def queue_dir_of(root: Path) -> Path:
        """The queue directory of an instance in ``root``."""
        return root / "spool"

    @staticmethod
    def log_file_of(root: Path) -> Path:
        """The mail log (``maillog_file``) of an instance in ``root``."""
        return root / "log" / "maillog"

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
        return self.run(POSTCONF.path, "-c", str(self.config_dir), *args).stdout

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
            self.run(POSTFIX.path, "-c", str(self.config_dir), "check")
            (self.queue_dir / "quick-start").touch()
            self._checked = True
        self.run(POSTFIX.path, "-c", str(self.config_dir), "start")
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
        with self.log_reader() as log:
            self.run(POSTFIX.path, "-c", str(self.config_dir), "reload")

            def reloaded() -> bool:
                return any("/master[" in line and ": reload " in line for line in log.poll())

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
        self.run(POSTFIX.path, "-c", str(self.config_dir), "stop", check=False)
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

    def queue(self) -> list[QueueEntry]:
        """Every message in the queue (``postqueue -j``, read as the scheduler reads it)."""
        out = self.run(POSTQUEUE.path, "-c", str(self.config_dir), "-j").stdout
        snapshot = parse_postqueue_json(out)
        if snapshot.problems:
            raise PostfixError(f"postqueue -j printed what it should not: {snapshot.problems}")
        return snapshot.entries

    def flush(self) -> None:
        """``postqueue -f``: attempt delivery of everything deferred now."""
        self.run(POSTQUEUE.path, "-c", str(self.config_dir), "-f")

    def release(self, queue_id: str) -> None:
        """Take a message out of the hold queue and deliver it now."""
        self.run(POSTSUPER.path, "-c", str(self.config_dir), "-H", queue_id)
        self.run(POSTQUEUE.path, "-c", str(self.config_dir), "-i", queue_id)

    def delete(self, queue_id: str = "ALL", queue_name: str = "") -> None:
        """``postsuper -d`` a message, or ALL (optionally of one queue: hold, deferred...)."""
        args = [POSTSUPER.path, "-c", str(self.config_dir), "-d", queue_id]
        if queue_name:
            args.append(queue_name)
        self.run(*args)

    # ------------------------------------------------------------ log

    def log_reader(self, *, from_end: bool = True) -> LogFollower:
        """A follower of the mail log (close it when done; ``poll()`` hands out the new
        complete lines): from its end, the lines written from now on; else all."""
        follower = LogFollower(self.log_file, start_at_end=from_end)
        if from_end:
            follower.poll()  # the first poll opens the file, at its end: nothing is missed
        return follower


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


