"""No client stalls the others: floods against the policy server while a probe client asks
one ordinary request at a time.

The floods: 256 KiB of bare line ends (each an empty request, which Postfix never sends),
12,000 tiny valid requests pipelined in one write, and twenty such connections at once.

In-process, the server answers at once (``handle_now``, as on the embedded store) and the
handler records the order in which it answered; the probe asks once the flood's first
request has been answered. What is asserted is that order: every probe answer is decided
before the flood's last request, not after it (on a unix socket a flood written at once is
one read, which a server that answers a whole read in one callback answers to the end
before it reads anything else). No duration is asserted anywhere.

Against a real ``mqpolicy serve`` the same floods leave the probe's answers right, the
empty request closes its connection with a protocol-error line in the log, and a pipelined
flood is answered to the end (the probe's latencies are logged, not asserted).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqpolicy.delegation.codec import encode_request
from mqpolicy.delegation.server import PolicyServer, connection_id
from mqpolicy.policy.endpoints import Endpoint
from tests.support.bounded_run import run
from tests.support.lanes import RESETS_LANES
from tests.support.policy_client import Client, serving
from tests.support.serve_process import ServeProcess, free_port

log = logging.getLogger(__name__)
BENCH = Path(__file__).resolve().parents[2] / "bench"
NEWLINE_FLOOD = b"\n" * 256 * 1024
FLOOD_REQUESTS = 12_000
FLOOD_CONNECTIONS = 20
PROBES = 3


def pipelined_flood(count: int = FLOOD_REQUESTS) -> bytes:
    """``count`` tiny requests, numbered from 0, in one piece."""
    return b"".join(b"n=%d\n\n" % i for i in range(count))


def flood_answers(count: int = FLOOD_REQUESTS) -> bytes:
    return b"".join(b"action=OK %d\n\n" % i for i in range(count))


class Recorder:
    """Answers at once, as the embedded store does: ``OK <n>``. Records (connection id,
    ``n``) in the order it answers; ``flooding`` is set by a flood's first request
    (``n=0``). Counts the requests without attributes that reach it, and the most requests
    it saw decoded and waiting on one connection."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.flooding = asyncio.Event()
        self.empty = 0
        self.most_waiting = 0
        self.server: PolicyServer | None = None

    def handle_now(self, attrs: dict[str, str]) -> str:
        if not attrs:
            self.empty += 1
        n = attrs.get("n", "")
        self.calls.append((connection_id.get(), n))
        if n == "0":
            self.flooding.set()
        if self.server is not None and len(self.calls) % 50 == 0:
            waiting = max((len(c.queue) for c in self.server._conns), default=0)
            self.most_waiting = max(self.most_waiting, waiting)
        return f"OK {n}"

    async def handle(self, attrs: dict[str, str]) -> str:
        return self.handle_now(attrs)

    def position(self, cid: str, n: str) -> int:
        return self.calls.index((cid, n))


async def probe_while_flooding(recorder: Recorder, probe: Client) -> list[str]:
    """Once a flood's first request is answered, ask ``PROBES`` times; each answer must be
    right. The probes' connection id."""
    await recorder.flooding.wait()
    for i in range(PROBES):
        assert await probe.ask(within=30, n=f"probe{i}") == f"OK probe{i}"
    return [cid for cid, n in recorder.calls if n == "probe0"]


def flood_cids(recorder: Recorder, probe_cid: str) -> set[str]:
    return {cid for cid, _ in recorder.calls if cid != probe_cid}


# --- in-process: the order of the answers ------------------------------------------------


def test_a_pipelined_flood_is_answered_in_turns_with_a_probe(tmp_path: Path) -> None:
    recorder = Recorder()

    async def scenario() -> None:
        endpoint = Endpoint(path=str(tmp_path / "policy.sock"))
        async with serving(recorder, [endpoint]) as server:
            recorder.server = server
            probe = await Client.to(endpoint)
            assert await probe.ask(n="warm") == "OK warm"
            flooder = await Client.to(endpoint)
            flooder.writer.write(pipelined_flood())  # one write: one read for the server
            answered = asyncio.create_task(
                flooder.reader.readexactly(len(flood_answers())))
            (probe_cid,) = await probe_while_flooding(recorder, probe)
            # every request of the flood answered, in order, on a connection left open
            assert await asyncio.wait_for(answered, 30) == flood_answers()
            assert await flooder.ask(n="after") == "OK after"
            (flood_cid,) = flood_cids(recorder, probe_cid)
            last = recorder.position(flood_cid, str(FLOOD_REQUESTS - 1))
            for i in range(PROBES):
                assert recorder.position(probe_cid, f"probe{i}") < last, i
            # what waited decoded on one connection stayed small: not the whole read
            assert recorder.most_waiting <= 100, recorder.most_waiting
            assert server.counters.protocol_errors == 0
            probe.close()
            flooder.close()

    run(scenario(), timeout=60)


def test_twenty_pipelined_floods_at_once_leave_the_probe_answered_first(
    tmp_path: Path,
) -> None:
    recorder = Recorder()

    async def scenario() -> None:
        endpoint = Endpoint(path=str(tmp_path / "policy.sock"))
        async with serving(recorder, [endpoint]) as server:
            probe = await Client.to(endpoint)
            assert await probe.ask(n="warm") == "OK warm"
            flooders = [await Client.to(endpoint) for _ in range(FLOOD_CONNECTIONS)]
            flood = pipelined_flood()
            for flooder in flooders:
                flooder.writer.write(flood)
            answered = [asyncio.create_task(f.reader.readexactly(len(flood_answers())))
                        for f in flooders]
            (probe_cid,) = await probe_while_flooding(recorder, probe)
            for task in answered:
                assert await asyncio.wait_for(task, 60) == flood_answers()
            cids = flood_cids(recorder, probe_cid)
            assert len(cids) == FLOOD_CONNECTIONS
            # every probe answered before the last request of every flood connection
            first_last = min(recorder.position(cid, str(FLOOD_REQUESTS - 1)) for cid in cids)
            for i in range(PROBES):
                assert recorder.position(probe_cid, f"probe{i}") < first_last, i
            assert server.counters.requests == 1 + PROBES + FLOOD_CONNECTIONS * FLOOD_REQUESTS
            probe.close()
            for flooder in flooders:
                flooder.close()

    run(scenario(), timeout=120)


@pytest.mark.parametrize(
    "flood",
    [
        pytest.param(NEWLINE_FLOOD, id="256KiB-of-lf"),
        pytest.param(b"\r\n" * 128 * 1024, id="256KiB-of-crlf"),
        pytest.param(encode_request({"n": "1"}) * 3 + b"\n" + encode_request({"n": "2"}),
                     id="after-requests"),
    ],
)
def test_an_empty_request_closes_its_connection_with_a_log_line(
    flood: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    caplog.set_level(logging.WARNING, logger="mqpolicy.server")

    async def scenario() -> None:
        async with serving(recorder) as server:
            endpoint = server.bound_endpoints[0]
            probe = await Client.to(endpoint)
            assert await probe.ask(n="before") == "OK before"
            flooder = await Client.to(endpoint)
            flooder.writer.write(flood)
            assert await flooder.closed_by_server(within=30)
            assert await probe.ask(n="after") == "OK after"
            assert server.counters.protocol_errors == 1
            records = [r.getMessage() for r in caplog.records if r.name == "mqpolicy.server"]
            assert len(records) == 1, records
            assert "policy protocol error, closing" in records[0]
            assert "error=EmptyRequest" in records[0]
            assert f"peer=127.0.0.1:{flooder.local_port}" in records[0]
            probe.close()

    run(scenario(), timeout=60)
    assert recorder.empty == 0  # never handed to the handler
    assert "2" not in [n for _, n in recorder.calls]  # nothing after it either


def test_twenty_newline_floods_at_once_are_all_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    caplog.set_level(logging.WARNING, logger="mqpolicy.server")

    async def scenario() -> None:
        async with serving(recorder) as server:
            endpoint = server.bound_endpoints[0]
            probe = await Client.to(endpoint)
            flooders = [await Client.to(endpoint) for _ in range(FLOOD_CONNECTIONS)]
            for flooder in flooders:
                flooder.writer.write(NEWLINE_FLOOD)
            for i in range(PROBES):
                assert await probe.ask(within=30, n=f"probe{i}") == f"OK probe{i}"
            closed = await asyncio.gather(*(f.closed_by_server(within=30) for f in flooders))
            assert all(closed)
            assert server.counters.protocol_errors == FLOOD_CONNECTIONS
            assert await probe.ask(n="after") == "OK after"
            probe.close()

    run(scenario(), timeout=60)
    assert recorder.empty == 0
    # one line for the burst (the rest counted as suppressed in the next one)
    assert any("error=EmptyRequest" in r.getMessage() for r in caplog.records)


# --- a real mqpolicy serve ---------------------------------------------------------------

SERVE_POLICY = """\
listen: [127.0.0.1:{port}]
store: {{url: "memory://"}}
log: {{format: kv, level: info}}
"""
PROBE_REQUEST = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                 "client_address": "192.0.2.10", "sender": "noreply@app.example",
                 "recipient": "u@example.net", "instance": "1.2.3"}
PROBE_ANSWER = "FILTER mq-transactional:"
TINY_REQUEST = b"protocol_state=RCPT\n\n"


async def flood_connection(port: int, payload: bytes, answers_due: int) -> int:
    """Send ``payload`` at once; read until ``answers_due`` answers (each must be DUNNO) or,
    with 0 due, until the server closes. The answers read (at the first one when none was
    due)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answered, data = 0, b""
    try:
        writer.write(payload)
        while answered < max(answers_due, 1):
            try:
                chunk = await reader.read(1 << 16)
            except ConnectionError:
                break
            if not chunk:
                break
            *answers, data = (data + chunk).split(b"\n\n")
            assert all(a == b"action=DUNNO" for a in answers), answers[:3]
            answered += len(answers)
    finally:
        writer.close()
    return answered


@pytest.mark.e2e
def test_floods_against_serve_leave_the_probe_answered_right(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "policy.yaml"
    config.write_text(SERVE_POLICY.format(port=port) + RESETS_LANES)
    serve = ServeProcess(config, port, tmp_path / "serve.log")
    plan = [
        ("newlines", NEWLINE_FLOOD, 1, 0),
        ("pipelined", TINY_REQUEST * FLOOD_REQUESTS, 1, FLOOD_REQUESTS),
        ("newlines x20", NEWLINE_FLOOD, FLOOD_CONNECTIONS, 0),
        ("pipelined x20", TINY_REQUEST * FLOOD_REQUESTS, FLOOD_CONNECTIONS, FLOOD_REQUESTS),
    ]
    figures: list[str] = []

    async def scenario() -> None:
        probe = await Client.to(Endpoint(host="127.0.0.1", port=port))
        assert await probe.ask(**PROBE_REQUEST) == PROBE_ANSWER
        for name, payload, connections, due in plan:
            floods = asyncio.gather(*(flood_connection(port, payload, due)
                                      for _ in range(connections)))
            latencies: list[float] = []
            while not latencies or not floods.done():
                sent = time.perf_counter()
                assert await probe.ask(within=60, **PROBE_REQUEST) == PROBE_ANSWER
                latencies.append(time.perf_counter() - sent)
            # a pipelined flood is answered to its end; a newline flood gets nothing
            assert await floods == [due] * connections, name
            figures.append(f"{name}: {len(latencies)} probes, worst "
                           f"{1000 * max(latencies):.1f} ms")
        probe.close()

    try:
        serve.start()
        run(scenario(), timeout=240)
        # every newline flood closed as a protocol error (a burst logs one line and
        # counts the rest as suppressed in the next)
        serve.wait_logged("error=EmptyRequest")
        assert "policy protocol error, closing conn=" in serve.log_text()
        assert serve.alive
    finally:
        serve.stop()
    log.info("probe under floods against mqpolicy serve: %s", "; ".join(figures))


@pytest.mark.e2e
def test_the_flood_bench_runs_and_says_how_each_flood_ended() -> None:
    """``bench/policy_flood.py``, small: every flood and the probe's answers are reported
    (figures are the script's job, not the test's)."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "policy_flood.py"), "--requests", "300",
         "--newline-bytes", "4096", "--connections", "2",
         "--mqpolicy", str(Path(sys.executable).parent / "mqpolicy")],  # this venv's
        capture_output=True, text=True, timeout=120, check=False, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr
    rows = {line[:15].strip(): line for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"idle", "newlines", "pipelined", "newlines x2", "pipelined x2"}
    for name in ("newlines", "newlines x2"):
        assert rows[name].endswith("yes    closed after 0 answers"), rows[name]
    for name in ("pipelined", "pipelined x2"):
        assert rows[name].endswith("yes    answered 300"), rows[name]
