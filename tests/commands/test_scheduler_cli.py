"""``mqpolicy scheduler`` and ``mqpolicy queue`` from the command line (no MTA needed for
what is checked here), and the queue view's text."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mqpolicy.commands.queue import render_queue
from mqpolicy.scheduler.mta_queue import QueueEntry
from mqpolicy.scheduler.planner import QueueSummary, plan_releases, summarize
from mqpolicy.store.hold_records import BrokenRecord, HoldRecord, RecordSet
from tests.support.planner_policy import policy
from tests.support.redis_fixture import RedisServer
from tests.support.serve_process import MqpolicyProcess

MEMORY = """\
store: {url: "memory://"}
scheduler: {}
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mqpolicy", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_scheduler_refuses_the_memory_store(tmp_path: Path) -> None:
    # (queue asks the running serve instead: tests/admin/test_admin_socket.py)
    path = tmp_path / "p.yaml"
    path.write_text(MEMORY)
    proc = run("scheduler", "-c", str(path))
    assert proc.returncode == 2
    assert "memory://" in proc.stderr and "inside `mqpolicy serve`" in proc.stderr


def test_scheduler_needs_a_scheduler_section(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text('store: {url: "redis://127.0.0.1:1/0"}\n')
    proc = run("scheduler", "-c", str(path))
    assert proc.returncode == 2
    assert "no scheduler: section" in proc.stderr


def test_queue_reports_a_store_it_cannot_reach(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text('store: {url: "redis://127.0.0.1:1/0"}\n')
    proc = run("queue", "-c", str(path))
    assert proc.returncode == 1
    assert proc.stderr.startswith("mqpolicy queue: redis")


def test_render_queue() -> None:
    now = 1_800_000_000_000
    entries = [QueueEntry(f"Q{i:05d}", "hold", 1, 10, "s@x.example", (f"r@d{i % 2}.example",))
               for i in range(4)] + [QueueEntry("OPERAT", "hold", 1, 10, "o@x.example", ())]
    records = RecordSet(records={
        "Q00000": HoldRecord("Q00000", "bulk", now - 10, now - 100, "lane:bulk"),
        "Q00001": HoldRecord("Q00001", "bulk", now - 10, now - 90, "lane:bulk"),
        "Q00002": HoldRecord("Q00002", "normal", now + 600_000, now - 80, "schedule:x"),
        "Q00003": HoldRecord("Q00003", "normal", now - 1, now - 70, "per-sender"),
    })
    summary = summarize(plan_releases(entries, records, now_ms=now, lanes=policy().lanes),
                        now, {"hold": 5, "deferred": 2})
    text = render_queue(summary)
    lines = text.splitlines()
    assert lines[0].startswith("held by mqpolicy: 4   held by others (left alone): 1")
    assert lines[1] == "MTA queues: deferred 2, hold 5"
    (bulk,) = [line for line in lines if line.startswith("bulk ") and "now" in line
               and "DESTINATION" not in line and "d0" not in line and "d1" not in line]
    assert bulk.split()[:5] == ["bulk", "2", "2", "0", "0"]
    (normal,) = [line for line in lines if line.startswith("normal ") and "in 10m" in line
                 and "example" not in line]
    assert normal.split()[:5] == ["normal", "2", "1", "0", "1"]
    assert any(line.split()[:4] == ["bulk", "d0.example", "1", "1"] for line in lines)


def test_a_summary_sent_as_json_prints_the_same() -> None:
    """What a running serve answers on its admin socket (``as_json``) is printed by the
    command as the summary itself would be: foreign holds, unreadable records, paused
    lanes and lanes no longer configured included."""
    now = 1_800_000_000_000
    entries = [QueueEntry("Q1", "hold", 1, 10, "s@x.example", ("r@d.example",)),
               QueueEntry("Q2", "hold", 1, 10, "s@x.example", ("r@e.example",)),
               QueueEntry("Q3", "hold", 1, 10, "s@x.example", ()),
               QueueEntry("Q4", "hold", 1, 10, "s@x.example", ("r@d.example",)),
               QueueEntry("OPERAT", "hold", 7, 10, "o@x.example", ())]
    records = RecordSet(records={
        "Q1": HoldRecord("Q1", "bulk", now - 10, now - 100, "lane:bulk"),
        "Q2": HoldRecord("Q2", "gone", now - 10, now - 90, "lane:gone"),
        "Q4": HoldRecord("Q4", "normal", now + 600_000, now - 80, "schedule:x"),
    }, broken={"Q3": BrokenRecord("Q3", "missing field 'lane'", {"v": "1"})})
    summary = summarize(plan_releases(entries, records, now_ms=now, lanes=policy().lanes,
                                      paused_lanes=frozenset({"bulk"})),
                        now, {"hold": 5}, {"bulk"})
    sent = json.loads(json.dumps(summary.as_json()))
    received = QueueSummary.from_json(sent)
    assert received.as_json() == summary.as_json()
    assert render_queue(received) == render_queue(summary)
    text = render_queue(received)
    assert "unreadable record: Q3: missing field 'lane' (not released)" in text
    assert "records of lanes no longer configured (released last): gone" in text
    assert "lanes waiting for the queues to drain: bulk" in text
    with pytest.raises(TypeError):  # not a summary: the command says so (admin_client)
        QueueSummary.from_json({**sent, "lanes": [{"held": 1}]})


@pytest.mark.e2e
def test_scheduler_reloads_on_sighup_and_keeps_its_policy_on_a_bad_one(
    tmp_path: Path, redis_clean: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # an empty hold queue: each pass works, and logs a "pass" line at debug level
    postqueue = tmp_path / "postqueue"
    postqueue.write_text("#!/bin/sh\nexit 0\n")
    postqueue.chmod(0o755)
    monkeypatch.setenv("MQPOLICY_POSTQUEUE", str(postqueue))

    def policy(level: str, url: str = redis_clean.unix_url, scheduler: bool = True) -> str:
        section = (f"scheduler:\n  interval: 1s\n  postfix_config_dir: {tmp_path}\n"
                   if scheduler else "")
        return (f"store: {{url: \"{url}\", key_prefix: \"reload:\"}}\n"
                f"log: {{format: kv, level: {level}}}\n{section}")

    path = tmp_path / "policy.yaml"
    path.write_text(policy("info"))
    process = MqpolicyProcess("scheduler", path, tmp_path / "scheduler.log")
    process.start()
    try:
        process.wait_logged("msg=reconciled")
        assert "msg=pass" not in process.log_text()

        path.write_text(policy("debug"))  # the new policy's log level shows it is in force
        process.signal(signal.SIGHUP)
        process.wait_logged("msg=\"policy reloaded\"")
        process.wait_logged("level=debug logger=mqpolicy.scheduler msg=pass")

        path.write_text("store: [broken\n")
        process.signal(signal.SIGHUP)
        process.wait_logged("msg=\"reload refused, keeping the running policy\"")

        # each refusal waited for before the next file is written: the reload reads the
        # file after the signal, and two pending SIGHUPs may merge into one
        for count, refused in enumerate((policy("info", url="redis://127.0.0.1:1/0"),
                                         policy("info", scheduler=False)), 1):
            path.write_text(refused)
            process.signal(signal.SIGHUP)
            process.wait_logged("the scheduler section and the store cannot change", count)
        assert process.log_text().count("msg=\"policy reloaded\"") == 1
    finally:
        assert process.stop() == 0, process.log_text()
