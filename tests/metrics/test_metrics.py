"""Metrics: the instruments, the exposition text, the HTTP endpoint over real sockets with
real decisions, hostile HTTP clients, and ``mqpolicy serve`` with metrics as a process.

The exposition text is checked by a strict parser of this file (not the one ``top`` uses),
so that a mistake in the renderer cannot hide behind the same mistake in a reader.
"""

from __future__ import annotations

import asyncio
import json
import platform
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mqpolicy.commands.serve import core_registry
from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.codec import encode_request
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.delegation.server import PolicyServer
from mqpolicy.lab.readiness import READY_TIMEOUT_S
from mqpolicy.metrics.http import MetricsServer
from mqpolicy.metrics.instruments import HistogramSnapshot, LatencyHistogram
from mqpolicy.metrics.registry import MetricsRegistry, ReloadStats
from mqpolicy.policy.endpoints import Endpoint
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import Policy
from mqpolicy.policy.request import Request
from mqpolicy.store.budget import BucketState, BudgetCheck, Evaluation, StoreError
from mqpolicy.store.memory import MemoryStore
from tests.support.lanes import RESETS_LANES
from tests.support.serve_process import ServeProcess, free_port

# ---------------------------------------------------------------- a strict parser

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_TYPES = {"counter", "gauge", "histogram"}

LabelKey = tuple[tuple[str, str], ...]


def _unescape(value: str) -> str:
    return re.sub(r"\\([\\\"n])", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _labels(body: str) -> LabelKey:
    inner = body[1:-1]
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(inner):
        m = _LABEL.match(inner, pos)
        assert m, f"bad labels {body!r} at {pos}"
        pairs.append((m.group(1), _unescape(m.group(2))))
        pos = m.end()
        if pos < len(inner):
            assert inner[pos] == ",", f"bad labels {body!r}"
            pos += 1
    names = [n for n, _ in pairs]
    assert len(names) == len(set(names)), f"repeated label in {body!r}"
    return tuple(sorted(pairs))


class Exposition:
    """Every sample of one scrape, checked against the text format 0.0.4 rules."""

    def __init__(self, text: str) -> None:
        assert text.endswith("\n"), "exposition must end with a newline"
        self.types: dict[str, str] = {}
        self.helps: dict[str, str] = {}
        self.samples: dict[tuple[str, LabelKey], float] = {}
        family = ""
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name, _, help_text = line[7:].partition(" ")
                assert name not in self.helps, f"HELP twice for {name}"
                self.helps[name] = help_text
                family = name
            elif line.startswith("# TYPE "):
                name, _, kind = line[7:].partition(" ")
                assert name == family, f"TYPE {name} without its HELP first"
                assert kind in _TYPES, line
                assert name not in self.types, f"TYPE twice for {name}"
                self.types[name] = kind
            else:
                m = _SAMPLE.match(line)
                assert m, f"bad sample line {line!r}"
                name, body, value = m.group(1), m.group(2) or "{}", m.group(3)
                family_kind = self.types.get(family)
                allowed = {family} if family_kind != "histogram" else {
                    family + "_bucket", family + "_sum", family + "_count"}
                assert name in allowed, f"{name} outside its family {family}"
                key = (name, _labels(body))
                assert key not in self.samples, f"duplicate series {key}"
                self.samples[key] = float(value)
        for name, kind in self.types.items():
            if kind == "counter":
                assert name.endswith("_total"), name
            if kind == "histogram":
                self._check_histogram(name)

    def _check_histogram(self, name: str) -> None:
        series: dict[LabelKey, list[tuple[float, float]]] = {}
        for (sample, labels), value in self.samples.items():
            if sample == name + "_bucket":
                rest = tuple(p for p in labels if p[0] != "le")
                le = float(dict(labels)["le"])
                series.setdefault(rest, []).append((le, value))
        assert series, f"histogram {name} without buckets"
        for rest, buckets in series.items():
            buckets.sort()
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), f"{name} buckets not cumulative"
            assert buckets[-1][0] == float("inf")
            assert self.samples[(name + "_count", rest)] == buckets[-1][1]
            assert (name + "_sum", rest) in self.samples

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def bucket(self, name: str, le: str) -> float:
        return self.value(name + "_bucket", le=le)


# ---------------------------------------------------------------- HTTP over a real socket


async def raw_http(port: int, data: bytes) -> bytes:
    """Send ``data`` and end our side, read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        writer.write_eof()
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    return status, headers, body


async def scrape(port: int) -> Exposition:
    raw = await raw_http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = split_response(raw)
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return Exposition(body.decode("utf-8"))


async def top_json(port: int) -> dict[str, object]:
    status, headers, body = split_response(
        await raw_http(port, b"GET /top.json HTTP/1.0\r\n\r\n"))
    assert status == 200
    assert headers["content-type"] == "application/json"
    data = json.loads(body)
    assert isinstance(data, dict)
    return data


# ---------------------------------------------------------------- instruments


def test_histogram_buckets_are_upper_inclusive_and_cumulative() -> None:
    h = LatencyHistogram((0.001, 0.01))
    for ns in (50_000, 1_000_000, 1_000_001, 20_000_000_000):
        h.observe(ns)
    snap = h.snapshot()
    assert snap.bounds == (0.001, 0.01)
    assert snap.cumulative == (2, 3, 4)  # 1 ms exactly is in the 1 ms bucket
    assert snap.total == pytest.approx(20.002050001)


@pytest.mark.parametrize("bounds", [(), (0.1, 0.1), (0.2, 0.1)])
def test_histogram_refuses_bad_bounds(bounds: Sequence[float]) -> None:
    with pytest.raises(ValueError):
        LatencyHistogram(bounds)


def test_busiest_keys_bounded_exact_for_the_hot_key_and_favours_recent_activity() -> None:
    from mqpolicy.metrics.instruments import BusiestKeys

    keys = BusiestKeys(capacity=10)
    for _ in range(100):
        keys.hit("per-sender", "defer", "old@example.com")
    hot_hits = 0
    for i in range(400):  # a flood of one-off keys, and a key busy now
        keys.hit("per-rcpt", "hold", f"cold{i}@example.com")
        if i % 4 == 0:
            keys.hit("per-sender", "defer", "new@example.com")
            hot_hits += 1
        assert len(keys) <= 20
    assert keys.pruned > 300
    top = keys.top(3)
    assert top[0].key == "new@example.com"
    assert top[0].hits == hot_hits  # never dropped: counted exactly
    assert top[0].action == "defer"
    # busy an hour ago, idle since: its activity halved at every prune until it went
    assert all(k.key != "old@example.com" for k in keys.top(20))


def test_busiest_keys_exact_below_capacity() -> None:
    from mqpolicy.metrics.instruments import BusiestKeys

    keys = BusiestKeys(capacity=5)
    for i in range(10):
        for _ in range(i + 1):
            keys.hit("lim", "monitor", f"k{i}")
    assert keys.pruned == 0
    assert [(k.key, k.hits) for k in keys.top(3)] == [("k9", 10), ("k8", 9), ("k7", 8)]


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize(("kind", "name", "labels"), [
    ("counter", "mqpolicy_things", ()),  # counters end in _total
    ("gauge", "mqpolicy_things_total", ()),  # _total is for counters
    ("gauge", "other_things", ()),  # the project prefix
    ("gauge", "mqpolicy_bad-name", ()),
    ("gauge", "mqpolicy_things", ("bad-label",)),
    ("gauge", "mqpolicy_things", ("__reserved",)),
    ("gauge", "mqpolicy_things", ("lane", "lane")),
    ("histogram", "mqpolicy_things_seconds", ("le",)),
    ("histogram", "mqpolicy_things_count", ()),
    ("gauge", "mqpolicy_decision_seconds_bucket", ()),  # collides with a histogram's series
    ("gauge", "mqpolicy_decision_seconds", ()),  # registered twice
])
def test_registry_refuses_bad_or_duplicate_names(kind: str, name: str,
                                                 labels: tuple[str, ...]) -> None:
    registry = MetricsRegistry()
    registry.histogram("mqpolicy_decision_seconds", "x",
                       lambda: LatencyHistogram().snapshot())
    register = getattr(registry, kind)
    with pytest.raises(ValueError):
        register(name, "help", lambda: 0, labels=labels)


def test_label_values_and_help_are_escaped_and_read_back() -> None:
    registry = MetricsRegistry()
    nasty = 'a"b\\c\nd}{,='
    registry.gauge("mqpolicy_held_messages", "help with \\ and\nnewline",
                   lambda: {(nasty,): 3, ("plain",): 1.5}, labels=("lane",))
    text = registry.render()
    exposition = Exposition(text)
    assert exposition.value("mqpolicy_held_messages", lane=nasty) == 3
    assert exposition.value("mqpolicy_held_messages", lane="plain") == 1.5
    assert exposition.helps["mqpolicy_held_messages"] == "help with \\\\ and\\nnewline"
    assert text.count("\n") == len(text.splitlines())  # no raw newline inside a line


def test_a_failing_callback_loses_only_its_own_metric() -> None:
    registry = MetricsRegistry()

    def broken() -> int:
        raise RuntimeError("scheduler not ready")

    registry.gauge("mqpolicy_a", "fails", broken)
    registry.gauge("mqpolicy_b", "wrong label arity", lambda: {("x", "y"): 1}, labels=("one",))
    registry.gauge("mqpolicy_c", "not a number", lambda: {("x",): "NaN?"},  # type: ignore[dict-item]
                   labels=("one",))
    registry.gauge("mqpolicy_d", "fine", lambda: 7)
    registry.json_section("broken", broken)
    registry.json_section("fine", lambda: [{"destination": "gmail.com", "level": 2}])
    exposition = Exposition(registry.render())
    assert exposition.value("mqpolicy_d") == 7
    assert {"mqpolicy_a", "mqpolicy_b", "mqpolicy_c"}.isdisjoint(exposition.types)
    assert exposition.value("mqpolicy_metrics_collect_errors_total") == 3
    assert registry.sections() == {"fine": [{"destination": "gmail.com", "level": 2}]}
    registry.unregister("mqpolicy_a")
    registry.unregister("fine")
    assert "mqpolicy_a" not in registry.names()
    assert registry.sections() == {}


def test_histogram_with_labels_renders_each_series() -> None:
    registry = MetricsRegistry()
    snap = HistogramSnapshot((0.1,), (1, 2), 0.5)
    registry.histogram("mqpolicy_release_seconds", "x",
                       lambda: {("bulk",): snap, ("normal",): snap}, labels=("lane",))
    exposition = Exposition(registry.render())
    assert exposition.value("mqpolicy_release_seconds_bucket", lane="bulk", le="0.1") == 1
    assert exposition.value("mqpolicy_release_seconds_count", lane="normal") == 2


# ---------------------------------------------------------------- real decisions, real sockets

POLICY = """\
store: {timeout_ms: %(timeout)d, on_store_error: accept}
""" + RESETS_LANES + """\
limits:
  - {name: per-sender, rate: 2/1h, key: sender, count: messages}
  - {name: watch-client, rate: 1/1h, key: client_address, count: messages, monitor: true}
"""


def make_policy(timeout_ms: int = 50) -> Policy:
    return parse_policy(POLICY % {"timeout": timeout_ms})


def eom(i: int, sender: str) -> Request:
    return Request.from_policy_attributes({
        "protocol_state": "END-OF-MESSAGE", "sender": sender, "queue_id": f"Q{i}",
        "recipient_count": "1", "client_address": "192.0.2.7"})


@asynccontextmanager
async def metrics_for(service: DecisionService, *, timeout_s: float = 5.0,
                      max_connections: int = 64,
                      server: PolicyServer | None = None) -> AsyncIterator[int]:
    registry = core_registry(service, server=server.counters if server else None,
                             reloads=ReloadStats())
    metrics = MetricsServer(registry, Endpoint(host="127.0.0.1", port=0),
                            timeout_s=timeout_s, max_connections=max_connections)
    async with metrics:
        yield metrics.bound_endpoints[0].port


def test_counters_and_histograms_move_with_real_decisions() -> None:
    async def go() -> tuple[Exposition, Exposition, dict[str, object]]:
        service = DecisionService(make_policy(), MemoryStore())
        async with metrics_for(service) as port:
            before = await scrape(port)
            for i in range(3):
                await service.decide(eom(i, "bob@example.com"))  # accept, accept, defer
            await service.decide(eom(10, "noreply@app.example"))  # transactional
            no_limits = Request.from_policy_attributes({"protocol_state": "RCPT"})
            await service.decide(no_limits)  # no limit applies: no store round trip
            after = await scrape(port)
            top = await top_json(port)
        return before, after, top

    before, after, top = asyncio.run(go())
    decisions = "mqpolicy_decisions_total"
    for action in ("accept", "defer", "hold", "reject"):
        for lane in ("normal", "transactional"):
            assert before.value(decisions, action=action, lane=lane) == 0
    assert after.value(decisions, action="accept", lane="normal") == 3
    assert after.value(decisions, action="defer", lane="normal") == 1
    assert after.value(decisions, action="accept", lane="transactional") == 1
    assert after.value(decisions, action="hold", lane="normal") == 0
    hits = "mqpolicy_limit_hits_total"
    assert before.value(hits, limit="per-sender", action="defer") == 0
    assert after.value(hits, limit="per-sender", action="defer") == 1
    # the monitor limit (1/1h per client) was found spent by every message after the first
    assert after.value(hits, limit="watch-client", action="monitor") == 3
    assert after.value("mqpolicy_decision_seconds_count") == 5
    assert after.bucket("mqpolicy_decision_seconds", "+Inf") == 5
    assert after.value("mqpolicy_decision_seconds_sum") > 0
    assert after.value("mqpolicy_store_seconds_count") == 4  # one round trip per message
    assert after.value("mqpolicy_store_errors_total", kind="error") == 0
    assert after.value("mqpolicy_build_info", version="0.1.0",
                       python=platform.python_version()) == 1
    assert after.value("mqpolicy_lane_priority", lane="transactional") == 0
    assert after.value("mqpolicy_config_reloads_total", result="ok") == 0
    assert after.types["mqpolicy_decision_seconds"] == "histogram"
    sections = top["sections"]
    assert isinstance(sections, dict)
    busiest = sections["busiest_keys"]
    assert busiest[0] == {"limit": "watch-client", "action": "monitor",
                          "key": "192.0.2.7", "hits": 3}
    assert {"limit": "per-sender", "action": "defer", "key": "bob@example.com",
            "hits": 1} in busiest


class FailingStore(MemoryStore):
    in_process = False  # behaves like a store behind a network

    async def evaluate(self, checks: Sequence[BudgetCheck], now_ms: int,
                       once_key: str | None = None, once_ttl_ms: int = 1,
                       ledger_key: str | None = None) -> Evaluation:
        raise StoreError("connection refused")


class SilentStore(MemoryStore):
    in_process = False  # behaves like a store behind a network: the deadline applies

    async def evaluate(self, checks: Sequence[BudgetCheck], now_ms: int,
                       once_key: str | None = None, once_ttl_ms: int = 1,
                       ledger_key: str | None = None) -> Evaluation:
        await asyncio.sleep(10)
        raise AssertionError("the deadline should have expired")

    async def inspect(self, keys: Sequence[str], now_ms: int) -> list[BucketState | None]:
        return []


def test_decisions_from_several_threads_are_counted_exactly_while_read() -> None:
    """The milter decides on libmilter's threads while the loop serves scrapes: every
    decision is counted once and reading never trips over a mapping being changed."""
    service = DecisionService(parse_policy("""\
limits:
  - {name: watch-client, rate: 1/1h, key: client_address, count: messages, monitor: true}
  - {name: big-senders, rate: 1/1h, key: sender, count: recipients, monitor: true}
"""), MemoryStore())
    registry = core_registry(service, reloads=ReloadStats())
    per_thread, threads = 400, 4
    errors: list[BaseException] = []
    done = threading.Event()

    def decide(t: int) -> None:
        try:
            for i in range(per_thread):  # a new sender, over its budget: a new busiest key
                request = eom(t * per_thread + i, f"s{t}-{i}@example.com")
                assert service.decide_now(request._replace(recipient_count=3))
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        try:
            while not done.is_set():
                registry.render()  # a failing metric is counted in collect_errors
                assert "busiest_keys" in registry.sections()  # a failing one is left out
        except BaseException as exc:
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads as often as possible
    try:
        reader = threading.Thread(target=read)
        reader.start()
        workers = [threading.Thread(target=decide, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        done.set()
        reader.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert registry.collect_errors == 0
    exposition = Exposition(registry.render())
    total = per_thread * threads
    assert exposition.value("mqpolicy_decisions_total", action="accept", lane="normal") == total
    # the monitor limits: 1/1h per client address (the same for all: each after the first),
    # 1 recipient/1h per sender (3 recipients never fit)
    assert exposition.value("mqpolicy_limit_hits_total", limit="watch-client",
                            action="monitor") == total - 1
    assert exposition.value("mqpolicy_limit_hits_total", limit="big-senders",
                            action="monitor") == total
    assert exposition.value("mqpolicy_decision_seconds_count") == total
    assert exposition.value("mqpolicy_busiest_keys_tracked") == total + 1


def test_store_errors_and_timeouts_are_counted_and_timed() -> None:
    async def go() -> tuple[Exposition, Exposition]:
        failing = DecisionService(make_policy(), FailingStore())
        silent = DecisionService(make_policy(timeout_ms=20), SilentStore())
        async with metrics_for(failing) as port_f, metrics_for(silent) as port_s:
            for i in range(3):
                await failing.decide(eom(i, "a@example.com"))
            await silent.decide(eom(1, "a@example.com"))
            return await scrape(port_f), await scrape(port_s)

    failing, silent = asyncio.run(go())
    assert failing.value("mqpolicy_store_errors_total", kind="error") == 3
    assert failing.value("mqpolicy_store_errors_total", kind="timeout") == 0
    assert failing.value("mqpolicy_store_seconds_count") == 3
    assert failing.value("mqpolicy_decisions_total", action="accept", lane="normal") == 3
    assert silent.value("mqpolicy_store_errors_total", kind="timeout") == 1
    # the 20 ms deadline: above 10 ms (a slow machine only adds), in a finite bucket (the
    # silent store would have taken 10 s)
    assert silent.bucket("mqpolicy_store_seconds", "0.01") == 0
    assert silent.bucket("mqpolicy_store_seconds", "2.5") == 1


def test_policy_server_counters_over_the_wire() -> None:
    async def ask(port: int, payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(payload)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    async def go() -> tuple[Exposition, Exposition, Exposition]:
        service = DecisionService(make_policy(), MemoryStore())
        server = PolicyServer(PostfixPolicyHandler(service),
                              [Endpoint(host="127.0.0.1", port=0)], idle_timeout_s=10)
        await server.start()
        try:
            async with metrics_for(service, server=server) as metrics_port:
                before = await scrape(metrics_port)
                policy_port = server.bound_endpoints[0].port
                attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                         "sender": "x@example.com", "recipient": "y@example.net"}
                reader, writer = await asyncio.open_connection("127.0.0.1", policy_port)
                writer.write(encode_request(attrs) * 2)
                for _ in range(2):
                    await reader.readuntil(b"\n\n")
                during = await scrape(metrics_port)
                writer.close()
                await ask(policy_port, b"no equals sign here\n\n")
                after = await scrape(metrics_port)
                give_up = time.monotonic() + READY_TIMEOUT_S
                # the server counts a close as soon as it sees it
                while after.value("mqpolicy_policy_connections") != 0:
                    assert time.monotonic() < give_up, "the closed connection still counted"
                    await asyncio.sleep(0.01)
                    after = await scrape(metrics_port)
                return before, during, after
        finally:
            await server.drain()

    before, during, after = asyncio.run(go())
    assert before.value("mqpolicy_policy_requests_total") == 0
    assert during.value("mqpolicy_policy_requests_total") == 2
    assert during.value("mqpolicy_policy_connections") == 1
    assert after.value("mqpolicy_policy_connections") == 0
    assert after.value("mqpolicy_policy_connections_total", result="accepted") == 2
    assert after.value("mqpolicy_policy_protocol_errors_total") == 1
    assert after.value("mqpolicy_decisions_total", action="accept", lane="normal") == 2


# ---------------------------------------------------------------- hostile HTTP


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    (b"GET /metrics?debug=1 HTTP/1.0\n\n", 200),  # bare newlines, a query string
    (b"GET / HTTP/1.1\r\n\r\n", 200),
    (b"GET /nope HTTP/1.1\r\n\r\n", 404),
    (b"GET /../../etc/passwd HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 405),
    (b"DELETE /metrics HTTP/1.1\r\n\r\n", 405),
    (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9
    (b"GET /metrics SPDY/3\r\n\r\n", 400),
    (b"\x00\xff\xfe garbage \x01\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS hello, then EOF
    (b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"A" * 100_000, 431),  # no line end at all
])
def test_bad_http_input_gets_an_answer_and_never_kills_the_endpoint(
        request_bytes: bytes, status: int) -> None:
    async def go() -> tuple[int, bytes, Exposition]:
        service = DecisionService(make_policy(), MemoryStore())
        async with metrics_for(service) as port:
            try:
                raw = await raw_http(port, request_bytes)
            except ConnectionResetError:
                raw = b""
            got, _, body = split_response(raw) if raw else (0, {}, b"")
            return got, body, await scrape(port)

    got, body, exposition = asyncio.run(go())
    assert got == status
    if status == 405:
        assert body == b""
    counted = exposition.value("mqpolicy_metrics_http_responses_total", code=str(status))
    assert counted >= 1


def test_head_answers_headers_only() -> None:
    async def go() -> bytes:
        service = DecisionService(make_policy(), MemoryStore())
        async with metrics_for(service) as port:
            return await raw_http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")

    raw = asyncio.run(go())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) > 1000  # type: ignore[union-attr]
    assert body == b""


def test_slow_and_silent_clients_are_cut_while_others_are_served() -> None:
    timeout_s = 2.0  # a scrape takes milliseconds: it is served well inside this

    async def go() -> tuple[bytes, bytes, float, Exposition]:
        service = DecisionService(make_policy(), MemoryStore())
        async with metrics_for(service, timeout_s=timeout_s) as port:
            started = time.monotonic()
            silent_r, silent_w = await asyncio.open_connection("127.0.0.1", port)
            slow_r, slow_w = await asyncio.open_connection("127.0.0.1", port)
            slow_w.write(b"GET /metr")  # and nothing more
            await slow_w.drain()
            served = await scrape(port)  # answered beside them, before they are cut
            silent = await asyncio.wait_for(silent_r.read(), 60)
            slow = await asyncio.wait_for(slow_r.read(), 60)
            elapsed = time.monotonic() - started
            silent_w.close()
            slow_w.close()
            return silent, slow, elapsed, served

    silent, slow, elapsed, served = asyncio.run(go())
    assert silent == b""  # nothing was asked: closed without an answer
    assert slow.startswith(b"HTTP/1.1 408 ")
    # served while both were still held: neither had been cut (408, or closed unanswered)
    codes = {dict(labels)["code"] for name, labels in served.samples
             if name == "mqpolicy_metrics_http_responses_total"}
    assert codes.isdisjoint({"408", "0"}), codes
    # cut at their timeout: never before it (a slow machine only adds), not ten times later
    assert timeout_s * 0.9 <= elapsed < timeout_s * 10
    assert served.value("mqpolicy_decision_seconds_count") == 0


def test_connections_over_the_limit_are_closed_and_the_endpoint_recovers() -> None:
    async def go() -> tuple[list[bytes], Exposition]:
        service = DecisionService(make_policy(), MemoryStore())
        async with metrics_for(service, max_connections=4, timeout_s=30) as port:
            # connections are taken in order: the four are held when the next ones arrive
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
            extra: list[bytes] = []
            for _ in range(3):
                try:
                    extra.append(await raw_http(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
                except OSError:  # reset, or not connected any more when we end our side
                    extra.append(b"")
            for _, writer in idle:
                writer.close()
            give_up = time.monotonic() + READY_TIMEOUT_S
            while True:  # the endpoint answers again once they are gone
                try:
                    return extra, await scrape(port)
                except (AssertionError, OSError, IndexError, ValueError):
                    assert time.monotonic() < give_up, "endpoint did not recover"
                    await asyncio.sleep(0.01)

    extra, exposition = asyncio.run(go())
    assert extra == [b"", b"", b""]
    assert exposition.value("mqpolicy_metrics_http_responses_total", code="0") >= 3


def test_a_client_resetting_mid_request_does_not_hurt() -> None:
    async def go() -> Exposition:
        service = DecisionService(make_policy(), MemoryStore())
        async with metrics_for(service) as port:
            for _ in range(20):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHo")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # RST
            return await scrape(port)

    assert asyncio.run(go()).value("mqpolicy_decisions_total", action="accept",
                                   lane="normal") == 0


# ---------------------------------------------------------------- mqpolicy serve, a real process


def serve_config(policy_port: int, metrics_port: int, rate: str = "2/1h") -> str:
    return f"""\
listen: [127.0.0.1:{policy_port}]
metrics: {{listen: 127.0.0.1:{metrics_port}}}
{RESETS_LANES}limits:
  - {{name: per-sender, rate: {rate}, key: sender, count: messages}}
"""


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    status, _, body = split_response(b"".join(chunks))
    return status, body


def wait_for_value(port: int, name: str, want: float, timeout: float = READY_TIMEOUT_S,
                   **labels: str) -> Exposition:
    deadline = time.monotonic() + timeout
    while True:
        exposition = Exposition(http_get(port, "/metrics")[1].decode())
        if exposition.value(name, **labels) == want:
            return exposition
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {exposition.value(name, **labels)}")
        time.sleep(0.02)


@pytest.mark.e2e
def test_serve_process_exposes_metrics_that_follow_requests_and_reloads(
        tmp_path: Path) -> None:
    policy_port, metrics_port = free_port(), free_port()
    config = tmp_path / "p.yaml"
    good = serve_config(policy_port, metrics_port)
    config.write_text(good)
    proc = ServeProcess(config, policy_port, tmp_path / "serve.log")
    proc.start()
    try:
        before = Exposition(http_get(metrics_port, "/metrics")[1].decode())
        assert before.value("mqpolicy_policy_requests_total") == 0
        attrs = {"request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
                 "sender": "c@example.com", "recipient_count": "1",
                 "client_address": "192.0.2.3"}
        replies = [proc.ask({**attrs, "queue_id": f"Q{i}"}) for i in range(3)]
        assert replies[:2] == ["DUNNO", "DUNNO"] and replies[2].startswith("450 4.7.1")
        after = Exposition(http_get(metrics_port, "/metrics")[1].decode())
        assert after.value("mqpolicy_policy_requests_total") == 3
        assert after.value("mqpolicy_decisions_total", action="accept", lane="normal") == 2
        assert after.value("mqpolicy_decisions_total", action="defer", lane="normal") == 1
        assert after.value("mqpolicy_limit_hits_total", limit="per-sender",
                           action="defer") == 1
        assert after.value("mqpolicy_decision_seconds_count") == 3
        status, body = http_get(metrics_port, "/top.json")
        assert status == 200
        assert json.loads(body)["sections"]["busiest_keys"][0]["key"] == "c@example.com"

        config.write_text(good + "limits: oops\n")
        proc.signal(signal.SIGHUP)
        refused = wait_for_value(metrics_port, "mqpolicy_config_reloads_total", 1,
                                 result="failed")
        assert refused.value("mqpolicy_config_last_reload_successful") == 0
        config.write_text(good.replace("rate: 2/1h", "rate: 100/1h"))
        proc.signal(signal.SIGHUP)
        applied = wait_for_value(metrics_port, "mqpolicy_config_reloads_total", 1, result="ok")
        assert applied.value("mqpolicy_config_last_reload_successful") == 1
        assert applied.value("mqpolicy_config_reloads_total", result="failed") == 1
        assert proc.stop() == 0
        with pytest.raises(OSError):  # stopped with the server
            http_get(metrics_port, "/metrics", timeout=1)
    finally:
        proc.stop()


@pytest.mark.e2e
def test_serve_refuses_to_start_when_the_metrics_port_is_taken(tmp_path: Path) -> None:
    policy_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = tmp_path / "p.yaml"
        config.write_text(serve_config(policy_port, taken.getsockname()[1]))
        proc = ServeProcess(config, policy_port, tmp_path / "serve.log")
        try:
            with pytest.raises(RuntimeError, match="cannot listen"):
                proc.start()
            assert proc.stop() == 1
        finally:
            proc.stop()


# ---------------------------------------------------------------- the Grafana dashboard

DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / \
    "mqpolicy-dashboard.json"


def test_dashboard_uses_only_metrics_that_exist() -> None:
    from mqpolicy.metrics.registry import DESTINATIONS_IN_BACKOFF, HELD_MESSAGES, RELEASES

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:  # no two panels on the same grid cell
        pos = panel["gridPos"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, panel["title"]
        assert pos["x"] + pos["w"] <= 24
        cells |= mine
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    used = {name for e in exprs for name in re.findall(r"\bmqpolicy_[a-z_]+", e)}
    service = DecisionService(make_policy(), MemoryStore())
    server = PolicyServer(PostfixPolicyHandler(service), [Endpoint(host="127.0.0.1", port=0)])
    exposed = set(Exposition(core_registry(service, server=server.counters,
                                           reloads=ReloadStats()).render()).types)
    exposed |= {n + suffix for n in set(exposed) for suffix in ("_bucket", "_count", "_sum")}
    later = {HELD_MESSAGES, RELEASES, DESTINATIONS_IN_BACKOFF}
    assert used - exposed == later
    for e in exprs:
        assert 'instance=~"$instance"' in e, e
        if "rate(" in e:
            assert "$__rate_interval" in e, e
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
