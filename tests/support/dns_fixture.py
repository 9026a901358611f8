"""A tiny authoritative DNS server for tests: UDP on 127.0.0.1, a free port, fake zones.

Never the machine's resolver, never real DNS. The zone is a dict::

    {"gmail.test": {"MX": [(5, "gmail-smtp-in.l.google.test")], "ttl": 300},
     "noanswer.test": {"A": ["192.0.2.1"]}}

A name in the zone answers its records (NOERROR with an empty answer and the SOA when
it has none of the asked type); any other name answers NXDOMAIN with the SOA, whose
TTL and minimum are ``negative_ttl``. A name can be told to stall (no answer at all)
or to SERVFAIL. Every query received is recorded (name, type), so tests can count what
reached the server.

``FakeDnsServer`` binds in the constructor's ``start()`` before its thread runs, so it is
ready as soon as ``start()`` returns; ``stop()`` closes the socket and joins the thread.
The ``dns_server`` fixture starts one with an empty zone and stops it even if the test
fails.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

Zone = Mapping[str, Mapping[str, Any]]

_SOA_TEXT = "ns.fake.test. hostmaster.fake.test. 1 3600 600 86400 {minimum}"


def _absolute(name: str) -> str:
    return name.rstrip(".").lower() + "."


class FakeDnsServer:
    """An authoritative UDP DNS server on 127.0.0.1 serving ``zone``."""

    def __init__(self, zone: Zone | None = None, *, negative_ttl: int = 60) -> None:
        self.negative_ttl = negative_ttl
        self._zone: dict[str, Mapping[str, Any]] = {}
        self._lock = threading.Lock()
        self._queries: list[tuple[str, str]] = []
        self._stalled: set[str] = set()
        self._servfail: set[str] = set()
        self._delays: dict[str, float] = {}
        self._timers: list[threading.Timer] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.set_zone(zone or {})

    # ------------------------------------------------------------ control

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("the DNS server is not started")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def set_zone(self, zone: Zone) -> None:
        with self._lock:
            self._zone = {_absolute(name): records for name, records in zone.items()}

    def stall(self, name: str, stalled: bool = True) -> None:
        """Answer nothing for ``name`` (the client times out)."""
        with self._lock:
            (self._stalled.add if stalled else self._stalled.discard)(_absolute(name))

    def servfail(self, name: str, failing: bool = True) -> None:
        with self._lock:
            (self._servfail.add if failing else self._servfail.discard)(_absolute(name))

    def delay(self, name: str, seconds: float) -> None:
        """Answer ``name`` only after ``seconds`` (0: at once again)."""
        with self._lock:
            if seconds > 0:
                self._delays[_absolute(name)] = seconds
            else:
                self._delays.pop(_absolute(name), None)

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every query received so far: (name without final dot, type)."""
        with self._lock:
            return list(self._queries)

    def count(self, name: str, rdtype: str = "MX") -> int:
        wanted = (name.rstrip(".").lower(), rdtype)
        return sum(1 for q in self.queries if q == wanted)

    def start(self) -> FakeDnsServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.05)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="fake-dns", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
            timer.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> FakeDnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ serving

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply, delay = self._answer(data)
            if reply is None:
                continue
            if delay > 0:
                timer = threading.Timer(delay, self._send, (sock, reply, peer))
                timer.daemon = True
                with self._lock:
                    self._timers.append(timer)
                timer.start()
            else:
                self._send(sock, reply, peer)

    def _send(self, sock: socket.socket, reply: bytes, peer: Any) -> None:
        if self._stop.is_set():
            return
        with contextlib.suppress(OSError):
            sock.sendto(reply, peer)

    def _answer(self, data: bytes) -> tuple[bytes | None, float]:
        reply = self._reply(data)
        if reply is None:
            return None, 0.0
        name = dns.message.from_wire(reply).question[0].name.to_text().lower()
        with self._lock:
            return reply, self._delays.get(name, 0.0)

    def _reply(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self._queries.append((name.rstrip("."), rdtype))
            if name in self._stalled:
                return None
            failing = name in self._servfail
            records = self._zone.get(name)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if failing:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa(name))
            return response.to_wire()
        values = records.get(rdtype)
        if not values:
            response.authority.append(self._soa(name))
            return response.to_wire()
        ttl = int(records.get("ttl", 300))
        texts = [
            f"{value[0]} {_absolute(value[1])}" if rdtype == "MX" else str(value)
            for value in values
        ]
        response.answer.append(
            dns.rrset.from_text_list(question.name, ttl, dns.rdataclass.IN, rdtype, texts)
        )
        return response.to_wire()

    def _soa(self, name: str) -> dns.rrset.RRset:
        # The zone apex is the name's parent (good enough for single-label test zones).
        apex = dns.name.from_text(name).parent()
        return dns.rrset.from_text(
            apex, self.negative_ttl, dns.rdataclass.IN, dns.rdatatype.SOA,
            _SOA_TEXT.format(minimum=self.negative_ttl),
        )


@pytest.fixture
def dns_server() -> Iterator[FakeDnsServer]:
    """A started :class:`FakeDnsServer` with an empty zone (tests call ``set_zone``)."""
    server = FakeDnsServer().start()
    try:
        yield server
    finally:
        server.stop()
