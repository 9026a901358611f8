"""The in-process bench scripts the README quotes still run and still measure what they say
(each in a process of its own: the milter profile imports pymilter's test module, which
changes pymilter for the whole process). No timing is asserted: figures are the scripts'
job, not the tests'."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
NUMBER = r"\d+\.\d"


def bench(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=120, check=False, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_decision_profile_runs_the_bench_policy() -> None:
    out = bench(str(BENCH / "decision_profile.py"), "--requests", "2000", "--repeat", "1")
    accepted = re.search(r"requests 2000, accepted or filtered (\d+)%", out)
    assert accepted is not None, out
    assert int(accepted[1]) >= 80  # the bench policy's budgets let (almost) all mail pass
    for stage in ("decode", "handle", "encode", "total"):
        assert re.search(rf"^{stage} +{NUMBER} us/request$", out, re.MULTILINE), out


def test_milter_profile_feeds_every_milter_whole_messages() -> None:
    out = bench(str(BENCH / "milter_profile.py"), "--messages", "1000", "--rounds", "1")
    rows = {m[1].strip(): m[2].split() for m in
            re.finditer(r"^(floor|mqpolicy(?: eom-only)?) +((?:[\d.]+ *){5})$", out,
                        re.MULTILINE)}
    assert set(rows) == {"floor", "mqpolicy", "mqpolicy eom-only"}, out
    assert all(len(columns) == 5 for columns in rows.values())


def test_milter_bench_accepts_the_make_target_arguments() -> None:
    code = ("import sys; sys.path.insert(0, 'bench'); import milter_bench; "
            "a = milter_bench.parse_args(['--clients', '1,4', '--eom-only', '--stall']); "
            "print(a.clients, a.eom_only, a.stall, a.pairs, a.seconds)")
    assert bench("-c", code).split() == ["1,4", "True", "True", "5", "2.0"]
