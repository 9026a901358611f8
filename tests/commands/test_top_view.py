"""``mqpolicy top``: its exposition reader, rates and quantiles, the screen, and the command
against a real ``mqpolicy serve`` process."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mqpolicy.commands.serve import core_registry
from mqpolicy.commands.top import (
    Snapshot,
    counter_rate,
    histogram_quantile,
    latency_quantiles,
    parse_exposition,
    render,
)
from mqpolicy.decision.service import DecisionService
from mqpolicy.metrics.registry import DESTINATIONS_IN_BACKOFF, HELD_MESSAGES, RELEASES, ReloadStats
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.request import Request
from mqpolicy.store.memory import MemoryStore
from tests.support.mqpolicy_command import mq
from tests.support.serve_process import ServeProcess, free_port

# ---------------------------------------------------------------- reading the exposition


def test_parse_exposition_escapes_special_values_and_skips_junk() -> None:
    text = "\n".join([
        "# HELP mqpolicy_x a help line with {braces} 1 2 3",
        "# TYPE mqpolicy_x gauge",
        'mqpolicy_x{lane="a\\"b\\\\c\\nd",other="x,y}z"} 3',
        "mqpolicy_plain 1.5e3",
        'mqpolicy_ts{a="1"} 7 1700000000000',
        'mqpolicy_bucket{le="+Inf"} +Inf',
        "mqpolicy_nan NaN",
        "mqpolicy_neg -Inf",
        'mqpolicy_comma{a="1",} 2',
        "junk line without value",
        'mqpolicy_bad{lane="unterminated} 1',
        'mqpolicy_badesc{lane="\\q"} 1',
        "mqpolicy_notnum{} abc",
        "mqpolicy_extra 1 2 3",
        "1bad 1",
        "",
    ])
    families = parse_exposition(text)
    assert families["mqpolicy_x"] == [({"lane": 'a"b\\c\nd', "other": "x,y}z"}, 3.0)]
    assert families["mqpolicy_plain"] == [({}, 1500.0)]
    assert families["mqpolicy_ts"] == [({"a": "1"}, 7.0)]
    assert families["mqpolicy_bucket"] == [({"le": "+Inf"}, math.inf)]
    assert math.isnan(families["mqpolicy_nan"][0][1])
    assert families["mqpolicy_neg"] == [({}, -math.inf)]
    assert families["mqpolicy_comma"] == [({"a": "1"}, 2.0)]
    for bad in ("junk", "mqpolicy_bad", "mqpolicy_badesc", "mqpolicy_notnum",
                "mqpolicy_extra", "1bad"):
        assert bad not in families


def test_counter_rate_survives_a_restart() -> None:
    assert counter_rate(30, 10, 2) == 10
    assert counter_rate(4, 100, 2) == 2  # went down: restarted from zero
    assert counter_rate(5, 1, 0) == 0


@pytest.mark.parametrize(("q", "want"), [
    (0.5, 0.1),  # rank 10: exactly the top of the first bucket
    (0.25, 0.05),
    (0.625, 0.15),  # rank 12.5: halfway through the second bucket
    (0.75, 0.2),
    (0.99, 0.3),  # in +Inf: the highest finite bound
])
def test_histogram_quantile_as_prometheus_estimates_it(q: float, want: float) -> None:
    buckets = [(0.1, 10.0), (0.2, 15.0), (0.3, 19.0), (math.inf, 20.0)]
    assert histogram_quantile(q, buckets) == pytest.approx(want)


def test_histogram_quantile_of_nothing_is_unknown() -> None:
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.5, [(0.1, 3.0)]) is None  # no +Inf bucket


def snap(at: float, text: str, sections: dict[str, object] | None = None) -> Snapshot:
    return Snapshot(at, parse_exposition(text), sections)


def test_latency_quantiles_over_the_last_interval_only() -> None:
    before = snap(0, 'h_bucket{le="0.001"} 100\nh_bucket{le="0.1"} 100\nh_bucket{le="+Inf"} 100\n')
    after = snap(1, 'h_bucket{le="0.001"} 100\nh_bucket{le="0.1"} 200\nh_bucket{le="+Inf"} 200\n')
    since_start = latency_quantiles(None, after, "h", (0.5,))[0]
    last_second = latency_quantiles(before, after, "h", (0.5,))[0]
    assert since_start == pytest.approx(0.001)
    assert last_second is not None and last_second > 0.04  # the new ones were all slow


# ---------------------------------------------------------------- the screen

FIRST = """\
mqpolicy_lane_priority{lane="transactional"} 0
mqpolicy_lane_priority{lane="bulk"} 2
mqpolicy_lane_priority{lane="normal"} 1
mqpolicy_decisions_total{action="accept",lane="normal"} 100
mqpolicy_decisions_total{action="defer",lane="bulk"} 10
mqpolicy_decisions_total{action="accept",lane="transactional"} 5
mqpolicy_limit_hits_total{limit="per-domain",action="hold"} 10
mqpolicy_limit_hits_total{limit="per-user",action="defer"} 0
"""
SECOND = """\
mqpolicy_lane_priority{lane="transactional"} 0
mqpolicy_lane_priority{lane="bulk"} 2
mqpolicy_lane_priority{lane="normal"} 1
mqpolicy_decisions_total{action="accept",lane="normal"} 300
mqpolicy_decisions_total{action="defer",lane="bulk"} 50
mqpolicy_decisions_total{action="accept",lane="transactional"} 5
mqpolicy_limit_hits_total{limit="per-domain",action="hold"} 50
mqpolicy_limit_hits_total{limit="per-user",action="defer"} 0
"""


def keys(*rows: tuple[str, str, str, int]) -> dict[str, object]:
    return {"busiest_keys": [{"limit": lim, "action": a, "key": k, "hits": h}
                             for lim, a, k, h in rows]}


def row(lines: list[str], first_word: str) -> list[str]:
    return next(line.split() for line in lines if line.split()[:1] == [first_word])


def test_live_screen_shows_rates_by_lane_and_action_in_lane_order() -> None:
    prev = snap(10.0, FIRST, keys(("per-domain", "hold", "gmail.com", 10),
                                  ("per-user", "defer", "alice", 50)))
    cur = snap(12.0, SECOND, keys(("per-user", "defer", "alice", 52),
                                  ("per-domain", "hold", "gmail.com", 50),
                                  ("per-domain", "hold", "\x1b[2Jevil\x07", 1)))
    lines = render(prev, cur, "http://127.0.0.1:9309/metrics", clock=0)
    text = "\n".join(lines)
    assert "every 2.0s" in lines[0]
    lane_rows = [ln.split()[0] for ln in lines if ln.split()[:1] in
                 (["transactional"], ["normal"], ["bulk"])]
    assert lane_rows == ["transactional", "normal", "bulk"]  # by priority, not by name
    # all/s accept/s defer/s hold/s reject/s held released/s
    assert row(lines, "normal")[1:] == ["100", "100", "0", "0", "0", "n/a", "n/a"]
    assert row(lines, "bulk")[1:] == ["20", "0", "20", "0", "0", "n/a", "n/a"]
    assert row(lines, "transactional")[1:3] == ["0", "0"]
    assert row(lines, "per-domain")[:3] == ["per-domain", "hold", "20"]
    assert "decisions/s 120" in text
    # busiest keys by rate now: gmail.com (20/s) before alice (1/s), the new one last
    busiest = lines[lines.index(next(ln for ln in lines if ln.startswith("BUSIEST"))) + 1:]
    assert [b.split()[-1] for b in busiest] == ["gmail.com", "alice", "?[2Jevil?"]
    assert busiest[0].split()[2:4] == ["20", "50"]
    assert "\x1b" not in text and "\x07" not in text
    assert "HOLD QUEUE n/a | DESTINATIONS IN BACKOFF n/a" in text


def test_once_screen_shows_totals_and_later_parts_when_they_exist() -> None:
    text = SECOND + "\n".join([
        f'{HELD_MESSAGES}{{lane="bulk"}} 1200',
        f'{HELD_MESSAGES}{{lane="normal"}} 3',
        f'{RELEASES}{{lane="bulk"}} 40',
        f"{DESTINATIONS_IN_BACKOFF} 2",
        "",
    ])
    sections = {**keys(("per-domain", "hold", "gmail.com", 50)),
                "backoff": [{"destination": "yahoo.com", "level": 3},
                            {"destination": "gmx.de", "level": 1}]}
    lines = render(None, snap(1.0, text, sections), "u", clock=0)
    joined = "\n".join(lines)
    assert "totals since start" in lines[0]
    assert row(lines, "bulk")[1:] == ["50", "0", "50", "0", "0", "1200", "40"]
    assert row(lines, "normal")[-2:] == ["3", "0"]
    assert "HOLD QUEUE 1203 held | DESTINATIONS IN BACKOFF 2" in joined
    assert "BACKOFF (2)" in joined
    assert row(lines, "yahoo.com") == ["yahoo.com", "3"]
    gmail = next(ln for ln in lines if ln.endswith("gmail.com")).split()
    assert gmail[:4] == ["per-domain", "hold", "-", "50"]


def test_screen_without_top_json_says_so() -> None:
    lines = render(None, snap(1.0, FIRST, None), "u", clock=0)
    assert "BUSIEST KEYS n/a (no /top.json)" in lines


def test_live_screen_fits_the_height() -> None:
    many = keys(*(("per-rcpt", "hold", f"k{i}", i) for i in range(200)))
    lines = render(snap(0, FIRST, many), snap(1, SECOND, many), "u", height=30, clock=0)
    assert len(lines) <= 30


def test_screen_reads_what_the_registry_renders() -> None:
    """The reader and the writer agree: a real registry's text, through top's parser."""
    policy = parse_policy("""\
lanes: [{name: fast, transport: mq-fast}, {name: normal}]
default_lane: normal
classify: [{when: {sender: "@app.example"}, lane: fast}]
limits: [{name: per-sender, rate: 1/1h, key: sender, count: messages}]
""")
    service = DecisionService(policy, MemoryStore())

    async def decide() -> None:
        for i, sender in enumerate(["a@x.example", "a@x.example", "n@app.example"]):
            await service.decide(Request.from_policy_attributes({
                "protocol_state": "END-OF-MESSAGE", "sender": sender, "queue_id": f"Q{i}"}))

    asyncio.run(decide())
    registry = core_registry(service, reloads=ReloadStats())
    lines = render(None, snap(1.0, registry.render(), registry.sections()), "u", clock=0)
    assert row(lines, "fast")[1:3] == ["1", "1"]
    assert row(lines, "normal")[1:4] == ["2", "1", "1"]
    assert row(lines, "per-sender")[:3] == ["per-sender", "defer", "1"]
    assert next(ln for ln in lines if ln.endswith("a@x.example")).split()[:4] == [
        "per-sender", "defer", "-", "1"]
    assert "reloads ok 0 failed 0" in "\n".join(lines)


# ---------------------------------------------------------------- the command


def policy_file(path: Path, policy_port: int, metrics_port: int | None) -> Path:
    metrics = f"metrics: {{listen: 127.0.0.1:{metrics_port}}}\n" if metrics_port else ""
    path.write_text(f"""\
listen: [127.0.0.1:{policy_port}]
{metrics}lanes:
  - {{name: transactional, transport: mq-transactional}}
  - {{name: normal}}
  - {{name: bulk, transport: mq-bulk}}
default_lane: normal
classify:
  - {{name: resets, when: {{sender: "@app.example"}}, lane: transactional}}
  - {{name: news, when: {{sender: "@news.example"}}, lane: bulk}}
limits:
  - {{name: per-sender, rate: 2/1h, key: sender, count: messages}}
""")
    return path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServeProcess, int]]:
    policy_port, metrics_port = free_port(), free_port()
    config = policy_file(tmp_path / "p.yaml", policy_port, metrics_port)
    proc = ServeProcess(config, policy_port, tmp_path / "serve.log")
    proc.start()
    try:
        yield proc, metrics_port
    finally:
        proc.stop()


def send_mix(proc: ServeProcess) -> None:
    base = {"request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE",
            "recipient_count": "1", "client_address": "192.0.2.5"}
    senders = ["noreply@app.example"] * 2 + ["a@news.example"] * 4 + ["u@example.com"]
    for i, sender in enumerate(senders):
        proc.ask({**base, "sender": sender, "queue_id": f"Q{i}"})


@pytest.mark.e2e
def test_top_once_against_a_running_server_prints_decisions_by_lane(
        served: tuple[ServeProcess, int]) -> None:
    proc, metrics_port = served
    send_mix(proc)
    result = mq("top", "--once", "-c", str(proc.config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "\x1b" not in result.stdout  # --once: no screen control
    assert f"http://127.0.0.1:{metrics_port}/metrics" in lines[0]
    # all accept defer hold reject held released
    assert row(lines, "transactional")[1:6] == ["2", "2", "0", "0", "0"]
    assert row(lines, "bulk")[1:6] == ["4", "2", "2", "0", "0"]
    assert row(lines, "normal")[1:6] == ["1", "1", "0", "0", "0"]
    assert row(lines, "per-sender")[:3] == ["per-sender", "defer", "2"]
    key = next(ln for ln in lines if ln.endswith("a@news.example")).split()
    assert key[:4] == ["per-sender", "defer", "-", "2"]
    # shown as n/a or as a number, depending on which parts the server runs
    assert any(ln.startswith("HOLD QUEUE ") and "DESTINATIONS IN BACKOFF " in ln for ln in lines)
    by_url = mq("top", "--once", "--url", f"http://127.0.0.1:{metrics_port}/metrics")
    assert by_url.returncode == 0, by_url.stderr
    assert row(by_url.stdout.splitlines(), "bulk")[1:6] == ["4", "2", "2", "0", "0"]


# Starts ``python ARGS...`` the way a suite started in the background starts it: SIGINT
# ignored (SIG_IGN is inherited through fork and exec); with "tty", also in a session of its
# own whose controlling terminal is its stdin, so Ctrl-C typed there reaches it; with
# "background", in that session but outside the terminal's foreground process group, as a
# shell runs ``cmd &`` (this process says its PID on stderr, waits for it, passes SIGTERM
# on, exits as it did).
LAUNCH = """\
import fcntl, os, signal, sys, termios
signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[1] != "default" else signal.SIG_DFL)
argv = [sys.executable, *sys.argv[3:]]
if sys.argv[2] != "none":
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
if sys.argv[2] == "background":
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        os.execv(sys.executable, argv)
    print(child, file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGTERM))
    _, status = os.waitpid(child, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
os.execv(sys.executable, argv)
"""
FRAME = b"\x1b[H"


def top_argv(metrics_port: int, sigint: str, terminal: str = "none") -> list[str]:
    return [sys.executable, "-c", LAUNCH, sigint, terminal, "-m", "mqpolicy", "top",
            "--interval", "0.2", "--url", f"http://127.0.0.1:{metrics_port}/metrics"]


def read_until(fd: int, top: subprocess.Popen[bytes], done: Callable[[bytes], bool],
               output: bytes = b"", timeout: float = 60) -> bytes:
    """Output of ``top`` on ``fd`` until ``done(output)``; fails if it exits first."""
    deadline = time.monotonic() + timeout
    while not done(output):
        assert time.monotonic() < deadline, output.decode(errors="replace")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"top exited ({top.poll()}): {output.decode(errors='replace')}"
            output += chunk
    return output


@contextlib.contextmanager
def top_at_a_terminal(metrics_port: int, terminal: str,
                      ) -> Iterator[tuple[subprocess.Popen[bytes], int, int, list[Any]]]:
    """``mqpolicy top`` on a pseudo-terminal's slave side, SIGINT ignored by its launcher:
    the process (stopped by its PID afterwards if still running), the master and slave
    descriptors (closed afterwards) and the terminal's modes before it started."""
    master, slave = pty.openpty()
    try:
        modes = termios.tcgetattr(slave)
        top = subprocess.Popen(top_argv(metrics_port, "ignored", terminal), stdin=slave,
                               stdout=slave, stderr=subprocess.PIPE,
                               env={**os.environ, "COLUMNS": "150", "LINES": "60"})
        try:
            yield top, master, slave, modes
        finally:
            stop_by_pid(top)
    finally:
        os.close(master)
        os.close(slave)


def stop_by_pid(top: subprocess.Popen[bytes]) -> None:
    if top.poll() is None:
        top.kill()
        top.wait()


@pytest.mark.e2e
@pytest.mark.parametrize("sigint", ["ignored", "default"])
def test_top_live_redraws_with_rates_and_quits_on_interrupt(
        served: tuple[ServeProcess, int], sigint: str) -> None:
    """SIGINT quits it whatever it inherited (a job started in the background has it
    ignored)."""
    _, metrics_port = served
    top = subprocess.Popen(top_argv(metrics_port, sigint), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={**os.environ, "COLUMNS": "150"})
    assert top.stdout is not None
    try:
        # three frames: rates from the second on
        output = read_until(top.stdout.fileno(), top, lambda out: out.count(FRAME) >= 3)
        top.send_signal(signal.SIGINT)
        assert top.wait(60) == 0
    finally:
        stop_by_pid(top)
    last = output.decode().split("\x1b[H")[-1]
    assert "every 0." in last
    assert "all/s" in last and "accept/s" in last
    assert "\x1b[K" in last  # lines cleared to their end, no full-screen flash


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["q", "ctrl-c", "SIGTERM"])
def test_top_at_a_terminal_quits_on_q_ctrl_c_or_sigterm_and_gives_the_terminal_back(
        served: tuple[ServeProcess, int], how: str) -> None:
    """On its terminal, with SIGINT ignored by whatever started it: each way of quitting
    ends it with 0, the cursor shown again and the terminal's modes as they were."""
    _, metrics_port = served
    with top_at_a_terminal(metrics_port, "tty") as (top, master, slave, before):
        output = read_until(master, top, lambda out: out.count(FRAME) >= 2)
        assert "q or Ctrl-C quits" in output.decode(errors="replace").split("\x1b[H")[-1]
        if how == "SIGTERM":
            top.terminate()
        else:
            os.write(master, {"q": b"q", "ctrl-c": b"\x03"}[how])
        code = top.wait(60)
        stderr = top.stderr.read() if top.stderr else b""
        assert code == 0, stderr
        # the cursor shown again after the last frame
        output = read_until(master, top, lambda out: b"\x1b[?25h" in out, output)
        assert output.startswith(b"\x1b[?25l")  # it had hidden the cursor
        assert output.rindex(FRAME) < output.rindex(b"\x1b[?25h")
        assert termios.tcgetattr(slave) == before


@pytest.mark.e2e
def test_top_in_the_background_of_a_terminal_leaves_its_modes_alone(
        served: tuple[ServeProcess, int]) -> None:
    """``mqpolicy top &``: a background process may not change its terminal's modes (it
    would be stopped, SIGTTOU): it draws, leaves the modes as they were, quits on SIGTERM."""
    _, metrics_port = served
    with top_at_a_terminal(metrics_port, "background") as (top, master, slave, before):
        assert top.stderr is not None
        child = int(top.stderr.readline())  # top itself, in a process group of its own
        code = None
        try:
            read_until(master, top, lambda out: out.count(FRAME) >= 2)
            assert termios.tcgetattr(slave) == before  # still echoing, line by line
            top.terminate()
            code = top.wait(60)  # the launcher's status is top's: it has exited
            assert code == 0, top.stderr.read()
        finally:
            if code is None:  # something failed before top exited
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)


def test_top_without_metrics_in_the_file_or_unreachable(tmp_path: Path) -> None:
    config = policy_file(tmp_path / "p.yaml", free_port(), None)
    off = mq("top", "--once", "-c", str(config))
    assert off.returncode == 2
    assert "metrics are off" in off.stderr
    down = mq("top", "--once", "--url", f"http://127.0.0.1:{free_port()}/metrics")
    assert down.returncode == 1
    assert "cannot read http://127.0.0.1:" in down.stderr
    bad = mq("top", "--once", "--url", "ftp://127.0.0.1/metrics")
    assert bad.returncode == 1
    assert "only http://" in bad.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("lanes: [\n")
    assert mq("top", "--once", "-c", str(broken)).returncode == 1
