"""``mqpolicy check`` warns about header conditions that nothing sees: without a
``milter:`` section (wiring P) the policy server never sees headers."""

from __future__ import annotations

import io
from pathlib import Path

from mqpolicy.commands.check import cmd_check
from tests.support.lanes import LANES

RULES = LANES + """\
classify:
  - name: lists
    when: {bulk_signals: true}
    lane: bulk
  - name: by-sender
    when: {sender: "@news.example"}
    lane: bulk
limits:
  - name: urgent-cap
    rate: 1/1h
    key: sender
    when: {header: {name: Subject, regex: urgent}}
  - name: per-sender
    rate: 10/1h
    key: sender
"""


def check(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    out = io.StringIO()
    code = cmd_check(str(path), out)
    return code, [line for line in out.getvalue().splitlines() if line.startswith("warning")]


def test_header_conditions_without_a_milter_are_warned_about(tmp_path: Path) -> None:
    code, warnings = check(tmp_path, RULES)
    assert code == 0
    assert len(warnings) == 2
    assert any("lists" in w for w in warnings)
    assert any("urgent-cap" in w for w in warnings)
    assert not any("per-sender" in w or "by-sender" in w for w in warnings)


def test_no_warning_with_a_milter(tmp_path: Path) -> None:
    code, warnings = check(tmp_path, RULES + "milter:\n  listen: unix:/tmp/m.sock\n")
    assert code == 0
    assert warnings == []
