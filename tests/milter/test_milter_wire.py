"""A real ``mqpolicy milter`` (and ``mqpolicy serve`` with a milter section) process, driven
over its socket by an independent milter client: ``miltertest``, speaking the MTA side."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from miltertest import MilterConnection
from miltertest import constants as C

from mqpolicy.lab.readiness import free_port, poll
from mqpolicy.milter.runner import bind_milter_socket
from mqpolicy.policy.endpoints import parse_milter_endpoint
from tests.support.lanes import LANES
from tests.support.redis_fixture import RedisServer
from tests.support.serve_process import MqpolicyProcess, ask_policy

pytestmark = pytest.mark.e2e

POLICY = """\
store:
  url: {store}
  timeout_ms: 10000
""" + LANES + """\
classify:
  - name: lists
    when: {{bulk_signals: true}}
    lane: {list_lane}
  - name: later
    when: {{header: {{name: X-Send-At, regex: "."}}}}
    lane: scheduled
limits:
  - name: per-domain
    rate: 1/1h
    key: recipient_domain
    message: "Too much mail for {{key}}"
    when: {{recipient: "@slow.example"}}
  - name: per-sender
    rate: 2/1h
    key: sender
    when: {{sender: "@counted.example"}}
"""

Reply = tuple[str, dict[str, Any]]


def connect(address: str | tuple[str, int], timeout: float = 30.0) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Postfix writes macros and command in one transaction; two writes need NODELAY
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


class MtaSession:
    """The MTA side of one milter connection; honours the steps the milter negotiated."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = MilterConnection(sock)
        self.actions, self.protocol = self.conn.optneg_mta()

    def _event(self, cmd: str, skip: int, no_reply: int, **args: Any) -> Reply | None:
        if self.protocol & skip:
            return None
        if self.protocol & no_reply:
            self.conn._send(cmd, **args)
            return None
        reply: Reply = self.conn.send_ar(cmd, **args)
        return reply

    def connect(self, host: str = "client.example.net", ip: str = "192.0.2.7",
                port: int = 41000) -> None:
        self._event(C.SMFIC_CONNECT, C.SMFIP_NOCONNECT, C.SMFIP_NR_CONN, hostname=host,
                    family=C.SMFIA_INET, port=port, address=ip)
        self._event(C.SMFIC_HELO, C.SMFIP_NOHELO, C.SMFIP_NR_HELO, helo="client.example.net")

    def message(self, sender: str, recipients: Sequence[str],
                headers: Sequence[tuple[str, str]] = (), body: str = "hello\r\n",
                queue_id: str = "") -> list[Reply]:
        """One transaction; the replies of the first refused step or of end-of-message."""
        if queue_id:
            self.conn.send_macro(C.SMFIC_MAIL, i=queue_id)
        self._event(C.SMFIC_MAIL, C.SMFIP_NOMAIL, C.SMFIP_NR_MAIL, args=[f"<{sender}>"])
        for rcpt in recipients:
            reply = self._event(C.SMFIC_RCPT, C.SMFIP_NORCPT, C.SMFIP_NR_RCPT,
                                args=[f"<{rcpt}>"])
            if reply is not None and reply[0] != C.SMFIR_CONTINUE:
                self.conn._send(C.SMFIC_ABORT)
                return [reply]
        self._event(C.SMFIC_DATA, C.SMFIP_NODATA, C.SMFIP_NR_DATA)
        for name, value in headers:
            self._event(C.SMFIC_HEADER, C.SMFIP_NOHDRS, C.SMFIP_NR_HDR, name=name, value=value)
        self._event(C.SMFIC_EOH, C.SMFIP_NOEOH, C.SMFIP_NR_EOH)
        self._event(C.SMFIC_BODY, C.SMFIP_NOBODY, C.SMFIP_NR_BODY, buf=body)
        if queue_id:
            self.conn.send_macro(C.SMFIC_BODYEOB, i=queue_id)
        replies: list[Reply] = self.conn.send_eom()
        while replies[-1][0] == C.SMFIR_QUARANTINE:  # not final: the decision follows
            replies.append(self.conn.recv())
        return replies

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn._send(C.SMFIC_QUIT)
        self.sock.close()


def write_policy(sock_dir: Path, listen: str, *, store: str = "memory://",
                 list_lane: str = "bulk", policy_listen: str = "", name: str = "p.yaml") -> Path:
    text = POLICY.format(store=store, list_lane=list_lane)
    text += textwrap.dedent(f"""\
        milter:
          listen: {listen}
          timeout: 20s
        """)
    if policy_listen:
        text += f"listen: {policy_listen}\n"
    path = sock_dir / name
    path.write_text(text)
    return path


@pytest.fixture(params=["unix", "tcp"])
def milter(request: pytest.FixtureRequest, sock_dir: Path) -> Iterator[tuple[MqpolicyProcess,
                                                                             Any]]:
    address: str | tuple[str, int]
    if request.param == "unix":
        address = str(sock_dir / "milter.sock")
        listen = f"unix:{address}"
    else:
        port = free_port()
        address, listen = ("127.0.0.1", port), f"inet:{port}@127.0.0.1"
    proc = MqpolicyProcess("milter", write_policy(sock_dir, listen), sock_dir / "log")
    try:
        proc.start(address)
        yield proc, address
    finally:
        assert proc.stop() == 0, proc.log_text()


def session(address: str | tuple[str, int]) -> MtaSession:
    s = MtaSession(connect(address))
    s.connect()
    return s


def test_lane_header_set_and_forged_ones_replaced(milter: tuple[MqpolicyProcess, Any]) -> None:
    _, address = milter
    if isinstance(address, str):
        assert stat.S_IMODE(os.stat(address).st_mode) == 0o660
    s = session(address)
    try:
        assert s.actions == C.SMFIF_CHGHDRS | C.SMFIF_QUARANTINE
        replies = s.message("a@example.com", ["b@example.org"],
                            [("X-MQ-Lane", "transactional"), ("List-Id", "<l.example>"),
                             ("X-MQ-Lane", "bulk")])
        # the second forgery deleted, the first one set to our lane
        assert replies == [
            (C.SMFIR_CHGHEADER, {"index": 2, "name": "X-MQ-Lane", "value": ""}),
            (C.SMFIR_CHGHEADER, {"index": 1, "name": "X-MQ-Lane", "value": "bulk"}),
            (C.SMFIR_CONTINUE, {}),
        ]
        # next message on the same connection: state was reset; the change of the first
        # (absent) lane header adds it
        replies = s.message("a@example.com", ["b@example.org"], [("Subject", "hi")])
        assert replies == [(C.SMFIR_CHGHEADER, {"index": 1, "name": "X-MQ-Lane",
                                                "value": "normal"}),
                           (C.SMFIR_CONTINUE, {})]
    finally:
        s.close()


def test_tempfail_with_reply_text_at_rcpt(milter: tuple[MqpolicyProcess, Any]) -> None:
    _, address = milter
    s = session(address)
    try:
        s.message("a@example.com", ["x@slow.example"])
        replies = s.message("a@example.com", ["y@slow.example"])
        assert replies == [(C.SMFIR_REPLYCODE, {"smtpcode": "451", "space": " ",
                                                "text": "4.7.1 Too much mail for slow.example"})]
        # other recipients still go through on the same connection
        assert s.message("a@example.com", ["y@fast.example"])[-1] == (C.SMFIR_CONTINUE, {})
    finally:
        s.close()


def test_quarantine_on_hold(milter: tuple[MqpolicyProcess, Any]) -> None:
    _, address = milter
    s = session(address)
    try:
        replies = s.message("a@example.com", ["b@example.org"], [("X-Send-At", "08:00")])
        assert (C.SMFIR_QUARANTINE, {"reason": "held by mqpolicy lane scheduled"}) in replies
        assert (C.SMFIR_CHGHEADER, {"index": 1, "name": "X-MQ-Lane",
                                    "value": "scheduled"}) in replies
        assert replies[-1] == (C.SMFIR_CONTINUE, {})
    finally:
        s.close()


def _packet(cmd: bytes, data: bytes) -> bytes:
    return struct.pack("!L", len(data) + 1) + cmd + data


GARBAGE = [
    b"GET / HTTP/1.0\r\n\r\n",
    b"\x00\x00\x00\x00",  # zero length
    b"\xff\xff\xff\xffO",  # 4 GiB packet announced
    _packet(b"O", b"\x00"),  # truncated negotiation
    _packet(b"Z", b"junk"),  # unknown command before negotiation
    os.urandom(4096),
]


def test_process_survives_garbage(milter: tuple[MqpolicyProcess, Any]) -> None:
    proc, address = milter
    for junk in GARBAGE:
        with contextlib.closing(connect(address)) as sock, contextlib.suppress(OSError):
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(100)
    # 8-bit and huge headers inside a real session
    s = session(address)
    try:
        s.conn._send(C.SMFIC_MAIL, args=["<a@example.com>"])
        assert s.conn.send_ar(C.SMFIC_RCPT, args=["<b@example.org>"])[0] == C.SMFIR_CONTINUE
        s.sock.sendall(_packet(b"L", b"Subject\x00caf\xe9 \xff\xfe\x00"))
        s.sock.sendall(_packet(b"L", b"X-Huge\x00" + b"v" * 60000 + b"\x00"))
        s.sock.sendall(_packet(b"L", b"X-MQ-Lane\x00\xff\x00"))
        assert s.conn.send_eom() == [
            (C.SMFIR_CHGHEADER, {"index": 1, "name": "X-MQ-Lane", "value": "normal"}),
            (C.SMFIR_CONTINUE, {})]
    finally:
        s.close()
    # a header without a name: libmilter drops the connection (the MTA then applies its
    # milter default action); the process goes on
    s = session(address)
    try:
        s.conn._send(C.SMFIC_MAIL, args=["<a@example.com>"])
        s.conn.send_ar(C.SMFIC_RCPT, args=["<b@example.org>"])
        with contextlib.suppress(OSError):
            s.sock.sendall(_packet(b"L", b"\x00\x00"))
            s.sock.sendall(_packet(b"E", b""))
            assert s.sock.recv(100) == b""
    finally:
        s.close()
    assert proc.alive
    s = session(address)
    try:
        assert s.message("a@example.com", ["b@example.org"])[-1] == (C.SMFIR_CONTINUE, {})
    finally:
        s.close()


def test_thousand_recipients(milter: tuple[MqpolicyProcess, Any]) -> None:
    _, address = milter
    s = session(address)
    try:
        replies = s.message("a@example.com", [f"r{i}@example.org" for i in range(1000)])
        assert replies[-1] == (C.SMFIR_CONTINUE, {})
    finally:
        s.close()


@pytest.mark.parametrize("listen", ["inet:0@127.0.0.1", "fd"])
def test_milter_tcp_sockets_and_what_they_accept_have_nodelay(listen: str) -> None:
    """Each message that changes a header gets several replies, each its own write: without
    TCP_NODELAY on the milter's sockets each such message waits for the MTA's delayed ACK
    (~40 ms; ``bench/milter_bench.py --stall`` prints what it costs). Set on the listening
    socket, also an inherited one, before anything is accepted: accepted sockets inherit it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inherited:
        if listen == "fd":  # a descriptor of its own on the socket the test made
            inherited.bind(("127.0.0.1", 0))
            inherited.listen(16)
            listen = f"fd:{os.dup(inherited.fileno())}"
        sock, owned = bind_milter_socket(parse_milter_endpoint(listen), 0o660)
        assert owned is None
        with sock, socket.create_connection(sock.getsockname()):
            accepted, _ = sock.accept()
            with accepted:
                for s in (sock, accepted):
                    assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# ---------------------------------------------------------------- serve: one process, one store


END_OF_MESSAGE = {"request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
                  "sender": "a@counted.example", "recipient_count": "1",
                  "client_address": "192.0.2.7", "queue_id": "4QX1"}


def count_once(policy_port: int, milter_address: str) -> None:
    assert ask_policy(policy_port, END_OF_MESSAGE) == "DUNNO"  # spends 1 of 2
    s = session(milter_address)
    try:
        # the same message at the milter: already counted
        assert s.message("a@counted.example", ["b@x.example"], queue_id="4QX1")[-1] == (
            C.SMFIR_CONTINUE, {})
        assert s.message("a@counted.example", ["b@x.example"], queue_id="4QX2")[-1] == (
            C.SMFIR_CONTINUE, {})
        refused = s.message("a@counted.example", ["b@x.example"], queue_id="4QX3")
        assert refused[0][0] == C.SMFIR_REPLYCODE and refused[0][1]["smtpcode"] == "451"
    finally:
        s.close()


def test_serve_runs_policy_server_and_milter_on_one_store(sock_dir: Path) -> None:
    port = free_port()
    sock_path = str(sock_dir / "m.sock")
    config = write_policy(sock_dir, f"unix:{sock_path}", policy_listen=f"127.0.0.1:{port}")
    proc = MqpolicyProcess("serve", config, sock_dir / "log")
    try:
        proc.start(("127.0.0.1", port), sock_path)
        count_once(port, sock_path)
        # SIGHUP reaches the decision service the milter shares
        write_policy(sock_dir, f"unix:{sock_path}", policy_listen=f"127.0.0.1:{port}",
                     list_lane="transactional")
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        lane = ""
        while lane != "transactional" and time.monotonic() < deadline:
            s = session(sock_path)
            try:
                replies = s.message("a@example.com", ["b@example.org"], [("List-Id", "l")])
            finally:
                s.close()
            lane = replies[0][1]["value"]
        assert lane == "transactional", proc.log_text()
        assert proc.alive
        # SIGTERM stops both; the milter's socket goes once libmilter's listener has
        # stopped, which it does at once, not when its 5 s poll of the socket ends (the
        # time taken by the rest of the process's exit is left out)
        proc.signal(signal.SIGTERM)
        signalled = time.monotonic()
        poll(lambda: not os.path.exists(sock_path), 60, "the milter socket removed")
        listener_stopped_s = time.monotonic() - signalled
        assert proc.proc is not None
        code = proc.proc.wait(60)  # one SIGTERM: a second one during the exit would kill it
    finally:
        proc.stop()  # by its PID, when something above failed; else it is gone already
    assert code == 0, proc.log_text()
    assert listener_stopped_s < 5


def test_policy_server_and_milter_processes_share_redis(
    sock_dir: Path, redis_clean: RedisServer
) -> None:
    port = free_port()
    sock_path = str(sock_dir / "m.sock")
    store = redis_clean.unix_url
    policy_config = sock_dir / "policy.yaml"
    policy_config.write_text(POLICY.format(store=store, list_lane="bulk")
                             + f"listen: 127.0.0.1:{port}\n")
    milter_config = write_policy(sock_dir, f"unix:{sock_path}", store=store, name="milter.yaml")
    server = MqpolicyProcess("serve", policy_config, sock_dir / "policy.log")
    milter = MqpolicyProcess("milter", milter_config, sock_dir / "milter.log")
    try:
        server.start(("127.0.0.1", port))
        milter.start(sock_path)
        count_once(port, sock_path)
    finally:
        assert milter.stop() == 0, milter.log_text()
        assert server.stop() == 0, server.log_text()


def test_check_and_bind_failure(sock_dir: Path) -> None:
    taken = sock_dir / "not-a-socket"
    taken.write_text("")
    config = write_policy(sock_dir, f"unix:{taken}")
    check = subprocess.run([sys.executable, "-m", "mqpolicy", "check", "-c", str(config)],
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0
    assert f"milter unix:{taken}" in check.stdout
    run = subprocess.run([sys.executable, "-m", "mqpolicy", "milter", "-c", str(config)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 1
    assert "cannot listen" in run.stderr
    assert taken.read_text() == ""  # never replaced what was there


@contextlib.contextmanager
def milter_on_inherited(listener: socket.socket, sock_dir: Path) -> Iterator[None]:
    """``mqpolicy milter`` on ``fd:N``, the listening socket handed over as a service manager
    does (closed here: the child has its own copy); ready once it logs so; ended by SIGTERM,
    which it must survive with exit status 0."""
    config = write_policy(sock_dir, f"fd:{listener.fileno()}")
    log = sock_dir / "log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mqpolicy", "milter", "-c", str(config)],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, pass_fds=(listener.fileno(),),
        )
    listener.close()
    try:
        deadline = time.monotonic() + 60
        while "msg=ready" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)  # between polls of the log
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(60)
    assert code == 0, log.read_text(errors="replace")


def test_an_inherited_unix_socket_file_is_left_to_its_owner(sock_dir: Path) -> None:
    """``fd:N`` on a unix socket that systemd made: the milter must not unlink it at exit
    (socket activation would then have nothing left for Postfix to connect to)."""
    path = sock_dir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    with milter_on_inherited(listener, sock_dir):
        pass
    assert path.exists()


def test_socket_activation_fd(sock_dir: Path) -> None:
    """``fd:N``: a listening socket inherited from the service manager (systemd passes 3)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    address = listener.getsockname()
    ours = listener.dup()  # the same socket as the milter's copy: its options are shared
    # Connections queued before the milter set TCP_NODELAY on the socket miss it (with
    # systemd, NoDelay=true in the .socket unit covers those): the helper waits for ready.
    try:
        with milter_on_inherited(listener, sock_dir):
            # set by the milter on the socket it inherited
            assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            s = MtaSession(connect(address))
            try:
                s.connect()
                replies = s.message("a@example.com", ["b@example.org"], [("X-MQ-Lane", "x")])
                assert replies[-2:] == [(C.SMFIR_CHGHEADER, {"index": 1, "name": "X-MQ-Lane",
                                                             "value": "normal"}),
                                        (C.SMFIR_CONTINUE, {})]
            finally:
                s.close()
    finally:
        ours.close()
