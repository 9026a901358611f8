"""The replay bench the README quotes still runs and measures what it says: a log of the
size asked for, read, rebuilt and replayed whole. No timing is asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_replay_bench_reads_and_replays_every_line() -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "replay_bench.py"), "--lines", "20000"],
                          capture_output=True, text=True, timeout=300, check=False,
                          cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    written = re.search(r"^log: ([\d,]+) lines", out, re.MULTILINE)
    assert written is not None, out
    lines = int(written[1].replace(",", ""))
    assert 19_000 <= lines <= 21_000
    assert re.search(r"unparsable 0,", out), out  # every generated line is read
    total = re.search(rf"^total: [\d.]+ s for {written[1]} lines: [\d,]+ lines/s$", out,
                      re.MULTILINE)
    assert total is not None, out
    mails = re.search(r"^mails ([\d,]+), recipients ([\d,]+)", out, re.MULTILINE)
    assert mails is not None, out
    assert int(mails[1].replace(",", "")) > lines // 10
