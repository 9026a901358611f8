"""A private real Sendmail for tests, on loopback ports, never the system's.

Debian's ``sendmail-bin`` would remove Postfix, so it is not installed: its packages are
fetched with ``apt-get download`` (cached in ``.cache/sendmail`` between sessions, where
``scripts/fetch_sendmail.sh`` puts them too) and unpacked. Facts
behind every line here: /work/shared/SENDMAIL_NOTES.md. In short:

* the unpacked binary is setgid ``mail`` (so the loader ignores ``LD_LIBRARY_PATH``): a copy
  without the bit is run, with ``libwrap.so.0`` from the unpacked tree;
* Sendmail sleeps 60 s on every call when the host name is unqualified: every call goes
  through a wrapper script that runs it in a UTS namespace of its own named
  ``mta.sendmail.test`` (``unshare -u`` execs, so the daemon keeps the wrapper's PID);
* the .cf is built from an .mc with the unpacked m4 and cf macros; everything (queue,
  aliases, pid file) lives in the instance's directory; mail relays to the SMTP sink; the
  milter is ``inet:PORT@127.0.0.1``.

``SendmailInstance.command`` is the wrapper: point ``MQPOLICY_SENDMAIL`` at it so that
:class:`mqpolicy.scheduler.sendmail_queue.SendmailQueue` drives this instance. The daemon runs in
the foreground (``-bD``), is waited for by polling its SMTP port, and is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mqpolicy.lab.processes import stop_process
from mqpolicy.lab.readiness import free_port, poll, smtp_banner
from mqpolicy.lab.smtp_sink import ThreadedSmtpSink
from mqpolicy.scheduler.mta_queue import QueueEntry
from mqpolicy.scheduler.sendmail_queue import parse_mailq

PACKAGES = ("sendmail-bin", "sendmail-cf", "m4", "libwrap0")
# scripts/fetch_sendmail.sh (run by scripts/bootstrap.sh) fills the same layout
CACHE = Path(os.environ.get("MQPOLICY_SENDMAIL_CACHE",
                            Path(__file__).resolve().parents[2] / ".cache" / "sendmail"))
HOSTNAME = "mta.sendmail.test"


class SendmailUnavailable(RuntimeError):
    """The binaries cannot be had here (no apt-get, no network, no unshare)."""


def unpacked_tree() -> Path:
    """The unpacked packages (downloaded once, then reused)."""
    root = CACHE / "root"
    binary = root / "usr/libexec/sendmail/sendmail"
    if binary.exists() and (root / "usr/share/sendmail/cf/m4/cf.m4").exists():
        return root
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SendmailUnavailable("apt-get/dpkg not available")
    if shutil.which("unshare") is None:
        raise SendmailUnavailable("unshare not available")
    CACHE.mkdir(parents=True, exist_ok=True)
    CACHE.chmod(0o755)
    download = subprocess.run(["apt-get", "download", *PACKAGES], cwd=CACHE,
                              capture_output=True, text=True, timeout=300, check=False)
    debs = sorted(CACHE.glob("*.deb"))
    if download.returncode != 0 or len(debs) < len(PACKAGES):
        raise SendmailUnavailable(f"apt-get download failed: {download.stderr[-500:]}")
    staging = Path(tempfile.mkdtemp(prefix="unpack-", dir=CACHE))
    for deb in debs:
        subprocess.run(["dpkg", "-x", str(deb), str(staging)], check=True, timeout=120)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(root)
    staging.rename(root)
    return root


_MC = """\
divert(-1)
divert(0)dnl
OSTYPE(`linux')dnl
define(`MAIL_SETTINGS_DIR', `{dir}/')dnl
define(`ALIAS_FILE', `{dir}/aliases')dnl
define(`HELP_FILE', `{dir}/helpfile')dnl
define(`STATUS_FILE', `{dir}/statistics')dnl
define(`confCW_FILE', `-o {dir}/local-host-names')dnl
define(`confSERVICE_SWITCH_FILE', `{dir}/service.switch')dnl
define(`confHOSTS_FILE', `{dir}/hosts')dnl
define(`QUEUE_DIR', `{dir}/mqueue')dnl
define(`confPID_FILE', `{dir}/sendmail.pid')dnl
define(`confDOMAIN_NAME', `{hostname}')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confTO_IDENT', `0')dnl
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
define(`SMART_HOST', `[127.0.0.1]')dnl
define(`RELAY_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`SMTP_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`SMTP8_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`DSMTP_MAILER_ARGS', `TCP $h {sink_port}')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`accept_unqualified_senders')dnl
DAEMON_OPTIONS(`Port={port}, Addr=127.0.0.1, Name=MTA')dnl
INPUT_MAIL_FILTER(`mqpolicy', `S=inet:{milter_port}@127.0.0.1, F=T, T=S:4s;R:4s;E:10s')dnl
MAILER(`smtp')dnl
"""


class SendmailInstance:
    """One private Sendmail daemon: ``root/{cf,mqueue,...}``, an SMTP port on loopback."""

    def __init__(self, root: Path, *, sink_port: int, milter_port: int) -> None:
        self.root = root
        self.port = free_port()
        self.sink_port = sink_port
        self.milter_port = milter_port
        self.cf = root / "sendmail.cf"
        self.command = root / "sendmail"  # the wrapper
        self.queue_dir = root / "mqueue"
        self.log = root / "daemon.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def prepare(self) -> None:
        tree = unpacked_tree()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.queue_dir.mkdir(mode=0o700, exist_ok=True)
        for name, text in (("aliases", "postmaster: root\n"), ("helpfile", ""),
                           ("statistics", ""), ("local-host-names", ""),
                           ("service.switch", "hosts files\naliases files\n"),
                           ("hosts", f"127.0.0.1 localhost {HOSTNAME}\n")):
            (self.root / name).write_text(text)
        binary = self.root / "sendmail.bin"
        shutil.copyfile(tree / "usr/libexec/sendmail/sendmail", binary)
        binary.chmod(0o755)  # without setgid: the loader honours LD_LIBRARY_PATH
        libs = tree / "usr/lib/x86_64-linux-gnu"
        self.command.write_text(
            "#!/bin/sh\n"
            "# Sendmail in a UTS namespace with a qualified host name (no 60 s sleep).\n"
            f"exec unshare -u /bin/sh -c 'hostname {HOSTNAME} && "
            f"LD_LIBRARY_PATH={libs} exec {binary} \"$@\"' sendmail \"$@\"\n")
        self.command.chmod(self.command.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP
                           | stat.S_IXOTH)
        mc = self.root / "sendmail.mc"
        mc.write_text(_MC.format(dir=self.root, hostname=HOSTNAME, sink_port=self.sink_port,
                                 port=self.port, milter_port=self.milter_port))
        cf_dir = tree / "usr/share/sendmail/cf"
        with self.cf.open("w") as out:
            subprocess.run([str(tree / "usr/bin/m4"), f"-D_CF_DIR_={cf_dir}/",
                            str(cf_dir / "m4/cf.m4"), str(mc)], stdout=out, check=True,
                           timeout=60)

    def _daemon_args(self) -> list[str]:
        """How the daemon runs: in the foreground, a queue run every minute."""
        return ["-bD", "-q1m"]

    def start(self, timeout_s: float = 20.0) -> None:
        """The daemon in the foreground; ready when the SMTP port greets."""
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self.command), "-C", str(self.cf), *self._daemon_args()],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        proc = self._proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"sendmail exited {proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            return smtp_banner("127.0.0.1", self.port) is not None

        poll(ready, timeout_s, f"sendmail on 127.0.0.1:{self.port}")

    def run(self, *args: str) -> str:
        proc = subprocess.run([str(self.command), "-C", str(self.cf), *args],
                              capture_output=True, text=True, timeout=60, check=False)
        return proc.stdout + proc.stderr

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, 10)


@contextlib.contextmanager
def sendmail_instance(*, sink_port: int, milter_port: int) -> Iterator[SendmailInstance]:
    root = Path(tempfile.mkdtemp(prefix="mqsendmail-", dir="/tmp"))
    instance = SendmailInstance(root, sink_port=sink_port, milter_port=milter_port)
    try:
        instance.prepare()
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- the milter behind Sendmail
# A session-wide Sendmail for milter tests: the daemon on a loopback port, relaying to a
# sink of its own, with the mqpolicy milter on a unix socket in its directory, the connect
# macros extended by {client_addr}, and an SMTP trace (-X). The milter itself is not
# started here: a test runs ``mqpolicy milter`` on ``milter_socket`` with its own policy
# (Sendmail connects per SMTP session, and defers mail while nobody listens: F=T).

MILTER_SOCKET = "milter.sock"
# The .mc lines the milter needs, as docs/milter_e2e.md shows them.
MILTER_MC = """\
INPUT_MAIL_FILTER(`mqpolicy', `S=unix:{socket}, F=T, T=C:5s;S:4s;R:10s;E:30s')dnl
define(`confMILTER_MACROS_CONNECT', confMILTER_MACROS_CONNECT`, {{client_addr}}')dnl
"""


@dataclass(frozen=True, slots=True)
class Quarantined:
    """One message of ``sendmail -bp -qQ``."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    reason: str  # the milter's quarantine reason


_MAILQ_ENTRY = re.compile(r"^(?P<id>[0-9A-Za-z]{8,20})[*X-]?\s+\d+\s+\w{3} \w{3} +\d+ [\d:]+\s+"
                          r"<?(?P<sender>[^>\s]*)>?")
_MAILQ_RECIPIENT = re.compile(r"^\s+<?(?P<rcpt>[^<>\s]+@[^<>\s]+)>?\s*$")


def parse_quarantine(text: str) -> list[Quarantined]:
    """``-bp -qQ`` output → messages with recipients and quarantine reasons.

    A listing (recipient lines are indented with tabs)::

        \t\t/path/mqueue (1 request)
        -----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------
        6ARLka7W011457        2 Fri Nov 27 21:46 <x@example.com>
             QUARANTINE: held x@example.com
        \t\t\t\t\t <r@dest.example>
        \t\tTotal requests: 1
    """
    found: list[Quarantined] = []
    for line in text.splitlines():
        entry = _MAILQ_ENTRY.match(line)
        if entry:
            found.append(Quarantined(entry["id"], entry["sender"], (), ""))
            continue
        if not found:
            continue
        last = found[-1]
        stripped = line.strip()
        if stripped.startswith("QUARANTINE:"):
            reason = stripped.removeprefix("QUARANTINE:").strip()
            found[-1] = Quarantined(last.queue_id, last.sender, last.recipients, reason)
        elif (rcpt := _MAILQ_RECIPIENT.match(line)) is not None:
            found[-1] = Quarantined(last.queue_id, last.sender,
                                    (*last.recipients, rcpt["rcpt"]), last.reason)
    return found


def build_cf(mc: Path, cf: Path) -> None:
    """The .cf from an .mc, with the unpacked m4 and cf macros."""
    tree = unpacked_tree()
    cf_dir = tree / "usr/share/sendmail/cf"
    with cf.open("w") as out:
        subprocess.run([str(tree / "usr/bin/m4"), f"-D_CF_DIR_={cf_dir}/",
                        str(cf_dir / "m4/cf.m4"), str(mc)], stdout=out, check=True, timeout=60)


class MilterSendmail(SendmailInstance):
    """A :class:`SendmailInstance` whose milter is ``unix:<root>/milter.sock`` (with
    ``{client_addr}`` among the connect macros), traced with ``-X``, with its sink."""

    def __init__(self, root: Path, sink: ThreadedSmtpSink) -> None:
        super().__init__(root, sink_port=sink.port, milter_port=0)
        self.sink = sink
        self.milter_socket = root / MILTER_SOCKET
        self.trace = root / "smtp.trace"

    def prepare(self) -> None:
        """The base instance, then its INPUT_MAIL_FILTER line replaced by MILTER_MC."""
        super().prepare()
        mc = self.root / "sendmail.mc"
        lines = mc.read_text().splitlines(keepends=True)
        (index,) = [i for i, line in enumerate(lines) if line.startswith("INPUT_MAIL_FILTER(")]
        lines[index] = MILTER_MC.format(socket=self.milter_socket)
        mc.write_text("".join(lines))
        build_cf(mc, self.cf)

    def _daemon_args(self) -> list[str]:
        """Also ``-X trace``: the SMTP conversation, to check what the client was told."""
        return [*super()._daemon_args(), "-X", str(self.trace)]

    def cf_option(self, name: str) -> str:
        """The value of ``O name=value`` in the .cf ('' when absent)."""
        prefix = f"O {name}="
        for line in self.cf.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix):]
        return ""

    def quarantined(self) -> list[Quarantined]:
        """The quarantine (``-bp -qQ``; plain ``-bp`` does not show it)."""
        return parse_quarantine(self.run("-bp", "-qQ"))

    def queued(self) -> list[QueueEntry]:
        """The normal queue (``-bp``)."""
        return parse_mailq(self.run("-bp"), "queue").entries

    def release(self, queue_id: str) -> None:
        """Out of the quarantine (``-qI<id> -qQ -Q``), then delivered now (``-qI<id> -qf``)."""
        for args in ((f"-qI{queue_id}", "-qQ", "-Q"), (f"-qI{queue_id}", "-qf")):
            proc = subprocess.run([str(self.command), "-C", str(self.cf), *args],
                                  capture_output=True, text=True, timeout=60, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"sendmail {' '.join(args)} exited {proc.returncode}: "
                                   f"{proc.stdout}{proc.stderr}")

    def delete_all(self) -> None:
        """Empty the queue and the quarantine (the files in the queue directory)."""
        for path in self.queue_dir.iterdir():
            if path.is_file():
                path.unlink()


def _milter_sendmail_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "a private Sendmail needs root (unshare -u for its own host name)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing: Sendmail would sleep 60 s on every call"
    return None


@pytest.fixture(scope="session")
def milter_sendmail() -> Iterator[MilterSendmail]:
    """A running Sendmail with the milter socket line in its .cf, and its sink (session)."""
    reason = _milter_sendmail_skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="mqsendmail-milter-", dir="/tmp"))
    with ThreadedSmtpSink(hostname="sink.mqpolicy.test") as sink:
        instance = MilterSendmail(root, sink)
        try:
            try:
                instance.prepare()
            except SendmailUnavailable as exc:
                pytest.skip(f"the Sendmail binaries cannot be obtained here: {exc}")
            instance.start()
            yield instance
        finally:
            instance.stop()
            shutil.rmtree(root, ignore_errors=True)
