"""Backoff and pause-by-rule from a real Sendmail's log (tests/support/sendmail_fixture.py):
Sendmail relays to a sink that answers Yahoo's ``421 4.7.0 [TSS04]``; its syslog lines are
caught on a ``/dev/log`` of its own (a private mount namespace: the machine has no syslog
daemon) and written to a file that ``mqpolicy milter``'s feedback follows. The destination
is backed off and paused by rule; its next mail is quarantined by the milter, the rest flows.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqpolicy.lab.processes import stop_process
from mqpolicy.lab.readiness import accepts, free_port, poll
from mqpolicy.lab.smtp_client import make_message, submit
from mqpolicy.lab.smtp_sink import ThreadedSmtpSink
from mqpolicy.policy.endpoints import Endpoint
from tests.support.sendmail_fixture import (
    HOSTNAME,
    SendmailInstance,
    SendmailUnavailable,
    parse_quarantine,
)

pytestmark = pytest.mark.e2e

TSS04 = ("421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected "
         "volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes")


class SyslogFile:
    """A unix datagram socket that takes syslog messages (``<PRI>Mmm dd hh:mm:ss TAG[PID]:
    MSG``) and appends them to ``path`` as a syslog daemon writes them (with the host name
    after the stamp)."""

    def __init__(self, socket_path: Path, path: Path) -> None:
        self.socket_path = socket_path
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(socket_path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="syslog", daemon=True)

    def __enter__(self) -> SyslogFile:
        self.path.touch()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            text = data.decode("utf-8", "replace").rstrip("\n\x00")
            if text.startswith("<"):
                text = text[text.find(">") + 1:]
            line = f"{text[:15]} {HOSTNAME} {text[16:]}\n"
            with self.path.open("a") as out:
                out.write(line)


class LoggingSendmail(SendmailInstance):
    """A Sendmail whose syslog() reaches ``syslog_socket``: run in a mount namespace of
    its own where ``/dev`` holds the usual devices and ``log`` (the machine is untouched)."""

    def __init__(self, root: Path, *, sink_port: int, milter_port: int,
                 syslog_socket: Path) -> None:
        super().__init__(root, sink_port=sink_port, milter_port=milter_port)
        self.syslog_socket = syslog_socket

    def prepare(self) -> None:
        super().prepare()
        wrapper = self.command.read_text()
        dev = self.root / "dev"
        dev.mkdir()
        binds = "".join(f"touch {dev}/{n} && mount --bind /dev/{n} {dev}/{n} && "
                        for n in ("null", "zero", "random", "urandom"))
        self.command.write_text(wrapper.replace(
            "exec unshare -u /bin/sh -c '",
            f"exec unshare -u -m /bin/sh -c 'mount --make-rprivate / && {binds}"
            f"ln -sf {self.syslog_socket} {dev}/log && mount --rbind {dev} /dev && "))


@pytest.fixture
def sink() -> Iterator[ThreadedSmtpSink]:
    with ThreadedSmtpSink(hostname="sink.mqpolicy.test") as running:
        yield running


def test_sendmail_s_log_backs_off_and_pauses_by_rule(sink: ThreadedSmtpSink,
                                                     tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a private Sendmail needs root (unshare -u -m)")
    milter_port = free_port()
    root = tmp_path / "sendmail"
    maillog = tmp_path / "mail.log"
    syslog_socket = tmp_path / "syslog.sock"
    sendmail = LoggingSendmail(root, sink_port=sink.port, milter_port=milter_port,
                               syslog_socket=syslog_socket)
    try:
        sendmail.prepare()
    except SendmailUnavailable as exc:
        pytest.skip(str(exc))
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""\
store: {{url: "memory://"}}
milter: {{listen: "inet:{milter_port}@127.0.0.1"}}
lanes: [{{name: normal}}]
default_lane: normal
destinations:
  - {{name: yahoo, domains: [yahoo.sm.test], rate: 100/1m}}
  - {{name: other, domains: [other.sm.test], rate: 100/1m}}
feedback:
  log: {maillog}
  poll_interval: 100ms
  backoff: {{decrease: 0.5, cooldown: 0s}}
  rules: [{{match: "TSS04", action: pause, for: 1h}}]
log: {{format: kv, level: info}}
""")
    log_file = tmp_path / "milter.log"
    sink.set_reply("yahoo.sm.test", TSS04)

    def logged(*needles: str) -> str | None:
        for line in log_file.read_text(errors="replace").splitlines():
            if all(n in line for n in needles):
                return line
        return None

    with contextlib.ExitStack() as stack, SyslogFile(syslog_socket, maillog):
        with log_file.open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "mqpolicy", "milter", "-c",
                                     str(policy)], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log)
        stack.callback(stop_process, proc, 20)
        poll(lambda: proc.poll() is None
             and accepts(Endpoint(host="127.0.0.1", port=milter_port)), 20, "the milter")
        poll(lambda: logged("following the delivery log") is not None, 20, "feedback")
        sendmail.start()
        stack.callback(sendmail.stop)

        first = submit("127.0.0.1", sendmail.port, "a@shop.sm.test", ["u@yahoo.sm.test"],
                       make_message("a@shop.sm.test", ["u@yahoo.sm.test"], "first"))
        assert first.queued, first.replies()
        poll(lambda: logged("destination paused by rule", "destination=yahoo") is not None,
             60, f"the pause by rule; the mail log:\n{maillog}")
        paused = logged("destination paused by rule", "destination=yahoo")
        assert paused is not None and "to=<u@yahoo.sm.test>" in paused
        assert "reply=421 4.7.0 [TSS04]" in paused  # the evidence: Sendmail's own line
        backed_off = logged("destination backed off", "destination=yahoo")
        assert backed_off is not None and "new_factor=0.5" in backed_off
        assert "reason=yahoo-deferred" in backed_off

        then = submit("127.0.0.1", sendmail.port, "a@shop.sm.test", ["v@yahoo.sm.test"],
                      make_message("a@shop.sm.test", ["v@yahoo.sm.test"], "then"))
        assert then.queued, then.replies()  # accepted, never refused
        other = submit("127.0.0.1", sendmail.port, "a@shop.sm.test", ["w@other.sm.test"],
                       make_message("a@shop.sm.test", ["w@other.sm.test"], "other"))
        assert other.queued, other.replies()
        sink.wait_for(lambda m: any(x.header("Subject") == "other" for x in m), 60)
        deadline = time.monotonic() + 30
        quarantined = parse_quarantine(sendmail.run("-bp", "-qQ"))
        while not quarantined and time.monotonic() < deadline:
            time.sleep(0.2)
            quarantined = parse_quarantine(sendmail.run("-bp", "-qQ"))
        assert [(q.recipients, q.reason) for q in quarantined] == [
            (("v@yahoo.sm.test",), "held by mqpolicy: destination yahoo (TSS04) paused")]
