"""``mqpolicy replay`` as an operator runs it: rotated and gzip-compressed logs in any
order, the table and ``--json``, ``--compare`` with a tighter limit, lines it cannot read."""

from __future__ import annotations

import gc
import gzip
import json
import os
from pathlib import Path

import pytest

from mqpolicy.commands.replay import fewer_full_collections
from mqpolicy.postfix.programs import POSTCONF
from tests.support.decision_log_writer import POLICY as DECISION_POLICY
from tests.support.decision_log_writer import live_run
from tests.support.lanes import LANES
from tests.support.mqpolicy_command import mq
from tests.support.postfix_log_writer import REFERENCE, PostfixLog

POLICY = LANES + "limits:\n  - {{name: per-sender, rate: {rate}, burst: {burst}, key: sender, " \
    "action: defer}}\n"


def write_policy(tmp_path: Path, name: str, rate: str, burst: int) -> str:
    path = tmp_path / name
    path.write_text(POLICY.format(rate=rate, burst=burst), "utf-8")
    return str(path)


def the_mix() -> PostfixLog:
    log = PostfixLog()
    for i in range(5):
        log.message(i * 60, "alice@a.example", [f"r{i}@b.example"])
    for i in range(2):
        log.message(30 + i * 60, "bob@a.example", [f"s{i}@b.example", f"t{i}@c.example"])
    return log


def dated(path: Path) -> str:
    """Syslog lines have no year: the file's time completes them."""
    stamp = REFERENCE.timestamp()
    os.utime(path, (stamp, stamp))
    return str(path)


def test_rotated_gzip_files_in_any_order_replay_as_one_log(tmp_path: Path) -> None:
    lines = the_mix().lines
    half = len(lines) // 2
    whole = tmp_path / "whole.log"
    whole.write_text("\n".join(lines) + "\n", "utf-8")
    older = tmp_path / "maillog.1.gz"
    with gzip.open(older, "wt", encoding="utf-8") as out:
        out.write("\n".join(lines[:half]) + "\n")
    newer = tmp_path / "maillog"
    newer.write_text("\n".join(lines[half:]) + "\n", "utf-8")
    policy = write_policy(tmp_path, "p.yaml", "3/1h", 3)

    one = mq("replay", "-c", policy, "--json", "--quiet", dated(whole))
    two = mq("replay", "-c", policy, "--json", "--quiet", dated(newer), dated(older))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["lanes"] == b["lanes"]
    assert a["limits"] == b["limits"]
    assert a["lanes"]["normal"]["recipients"]["accepted"] == 9
    assert a["lanes"]["normal"]["recipients"]["deferred"] == 2
    assert a["lanes"]["normal"]["wait_s"]["max"] == 2400.0
    assert a["limits"]["per-sender"]["first_tries"] == 2


def test_compare_with_a_tighter_limit_shows_exactly_the_difference(tmp_path: Path) -> None:
    log = tmp_path / "maillog"
    log.write_text(the_mix().text(), "utf-8")
    loose = write_policy(tmp_path, "loose.yaml", "10/1h", 10)
    tight = write_policy(tmp_path, "tight.yaml", "3/1h", 3)
    done = mq("replay", "-c", loose, "--compare", tight, "--json", "--quiet", dated(log))
    assert done.returncode == 0, done.stderr
    diff = json.loads(done.stdout)["compare"]
    normal = diff["lanes"]["normal"]
    # alice's 4th and 5th wait under the tight policy; nothing else changes
    assert normal["recipients"]["deferred"] == {"a": 0, "b": 2}
    assert normal["messages"]["deferred"] == {"a": 0, "b": 2}
    assert normal["recipients"]["accepted"] == {"a": 9, "b": 9}
    assert normal["wait_s"]["max"] == {"a": 0.0, "b": 2400.0}
    assert diff["limits"]["per-sender"]["first_tries"] == {"a": 0, "b": 2}
    assert diff["keys_most_affected"] == [
        {"limit": "per-sender", "key": "alice@a.example", "a": 0, "b": 2, "change": 2}]

    table = mq("replay", "-c", loose, "--compare", tight, dated(log))
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines()]
    assert ["normal", "deferred", "0", "->", "2", "0", "->", "2", "*"] in rows
    assert ["normal", "accepted", "7", "->", "7", "9", "->", "9"] in rows  # unmarked
    assert "per-sender" in table.stdout
    assert "alice@a.example" in table.stdout
    assert "mqpolicy replay: done: 51 lines" in table.stderr  # the progress line


def test_unreadable_lines_are_counted_and_shown_never_fatal(tmp_path: Path) -> None:
    log = tmp_path / "maillog"
    log.write_bytes(the_mix().text().encode() + b"\xff\xfe not a log line\n"
                    + b"Dec  6 10:09:00 mta postfix/smtpd[1]: 4B1C2D3E4F: client=cut[1.2\n")
    policy = write_policy(tmp_path, "p.yaml", "3/1h", 3)
    done = mq("replay", "-c", policy, "--quiet", dated(log))
    assert done.returncode == 0, done.stderr
    assert "2 unparsable" in done.stdout
    assert "unparsable: Dec  6 10:09:00 mta postfix/smtpd[1]: 4B1C2D3E4F: client=cut[1.2" \
        in done.stdout
    as_json = json.loads(mq("replay", "-c", policy, "--quiet", "--json", str(log)).stdout)
    assert as_json["input"]["unparsable"] == 2


def test_a_missing_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "p.yaml", "3/1h", 3)
    done = mq("replay", "-c", policy, str(tmp_path / "nope"))
    assert done.returncode != 0
    assert "nope" in done.stderr


def test_retry_times_from_postconf_and_options(tmp_path: Path) -> None:
    if not os.access(POSTCONF.path, os.X_OK):
        pytest.skip(f"{POSTCONF.path} not installed")
    config = tmp_path / "postfix"
    config.mkdir()
    (config / "main.cf").write_text("minimal_backoff_time = 10m\n"
                                    "maximal_queue_lifetime = 2\n", "utf-8")  # days
    (config / "master.cf").write_text("", "utf-8")
    log = tmp_path / "maillog"
    log.write_text(the_mix().text(), "utf-8")
    policy = write_policy(tmp_path, "p.yaml", "3/1h", 3)
    done = mq("replay", "-c", policy, "--postconf", str(config), "--maximal-backoff-time",
              "1000", "--json", "--quiet", dated(log))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["retry"] == {
        "minimal_backoff_time": 600, "maximal_backoff_time": 1000,
        "maximal_queue_lifetime": 2 * 86400}


def test_a_decision_log_replays_with_its_lanes_beside_the_replay(tmp_path: Path) -> None:
    lines, _ = live_run()
    log = tmp_path / "mqpolicy.log.1.gz"
    with gzip.open(log, "wt", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(DECISION_POLICY, "utf-8")
    done = mq("replay", "-c", str(policy), "--quiet", str(log))
    assert done.returncode == 0, done.stderr
    table = done.stdout
    assert "the live policy's lanes (recipients let in): bulk 3, normal 4" in table
    assert "mqpolicy's decisions: 18 lines, 0 unreadable" in table
    # a tighter bulk limit: compare says what it changes
    tighter = tmp_path / "tighter.yaml"
    tighter.write_text(DECISION_POLICY.replace("rate: 2/1h, burst: 2", "rate: 1/1h, burst: 1"),
                       "utf-8")
    done = mq("replay", "-c", str(policy), "--compare", str(tighter), "--json", "--quiet",
              str(log))
    assert done.returncode == 0, done.stderr
    diff = json.loads(done.stdout)["compare"]
    # carol's 2nd list message waits too (her 3rd did already), nothing else changes
    assert diff["limits"]["bulk-per-sender"]["first_tries"] == {"a": 1, "b": 2}
    assert diff["limits"]["per-sender"]["first_tries"] == {"a": 2, "b": 2}
    assert diff["lanes"]["bulk"]["messages"]["deferred"] == {"a": 1, "b": 2}


def test_the_collector_runs_full_collections_rarely_while_replaying_then_as_before() -> None:
    before = gc.get_threshold()
    seen: list[tuple[int, int, int]] = []

    @fewer_full_collections()
    def failing_replay() -> None:
        seen.append(gc.get_threshold())
        raise RuntimeError("a replay that fails")

    with pytest.raises(RuntimeError):
        failing_replay()
    [during] = seen
    assert during[:2] == before[:2]  # the young generations as usual
    assert during[2] >= 100 * 10  # full collections a hundred times rarer than by default
    assert gc.get_threshold() == before


def test_rotated_files_named_newest_first_are_read_in_time_order(tmp_path: Path) -> None:
    """``mail.log mail.log.1.gz`` (as a shell lists them): a queue id Postfix gave again
    after the rotation is still two messages, read in time order."""
    log = PostfixLog()
    qid = log.message(0, "alice@a.example", ["x@b.example"])
    older_lines = list(log.lines)
    log.lines.clear()
    log.message(3600, "bob@a.example", ["y@c.example"], queue_id=qid)
    newer = tmp_path / "mail.log"
    newer.write_text(log.text(), "utf-8")
    older = tmp_path / "mail.log.1.gz"
    with gzip.open(older, "wt", encoding="utf-8") as out:
        out.write("\n".join(older_lines) + "\n")
    policy = write_policy(tmp_path, "p.yaml", "3/1h", 3)
    done = mq("replay", "-c", policy, "--json", "--quiet", dated(newer), dated(older))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["mails"] == 2
    assert report["busiest_keys"] == []
    assert report["lanes"]["normal"]["recipients"]["accepted"] == 2
