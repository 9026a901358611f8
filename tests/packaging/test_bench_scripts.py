"""The in-process bench scripts the README quotes still run and still measure what they say
(each in a process of its own: the milter profile imports pymilter's test module, which
changes pymilter for the whole process). No timing is asserted: figures are the scripts'
job, not the tests'."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
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
    rows = {m[1].strip(): [float(x) for x in m[2].split()] for m in
            re.finditer(r"^(floor|mqpolicy(?: eom-only)?)((?: +[\d.]+){5})$", out,
                        re.MULTILINE)}
    assert set(rows) == {"floor", "mqpolicy", "mqpolicy eom-only"}, out
    for columns in rows.values():  # MAIL, RCPT, headers, end, and their total
        assert columns[-1] > 0
        assert abs(sum(columns[:4]) - columns[4]) <= 0.3, out


def make_recipes() -> dict[str, list[str]]:
    """Bench script -> the arguments its Makefile target runs it with."""
    recipes = {}
    for line in (BENCH.parent / "Makefile").read_text().splitlines():
        found = re.match(r"\t\$\(VENV\)/bin/python bench/(\w+)\.py(.*)$", line)
        if found:
            recipes[found[1]] = shlex.split(found[2])
    return recipes


def _same(parsed: object, given: str) -> bool:
    """Whether an option's parsed value is what was given (numbers as numbers, a list as
    its comma-separated items)."""
    if isinstance(parsed, list):
        return ",".join(map(str, parsed)) == given
    try:
        return float(str(parsed)) == float(given)
    except ValueError:
        return str(parsed) == given


@pytest.mark.parametrize("script", ["milter_bench", "policy_bench"])
def test_a_make_targets_arguments_mean_to_the_script_what_they_say(script: str) -> None:
    argv = make_recipes()[script]
    assert argv, f"the Makefile runs bench/{script}.py without arguments"
    code = (f"import json, sys; sys.path.insert(0, 'bench'); import {script}; "
            f"print(json.dumps(vars({script}.parse_args({argv!r})), default=str))")
    parsed = json.loads(bench("-c", code))
    for i, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        name = token[2:].replace("-", "_")
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        if value is None:
            assert parsed[name] is True, (token, parsed)
        else:
            assert _same(parsed[name], value), (token, parsed[name])


def test_the_load_generator_paces_to_the_rate_asked_for() -> None:
    """``policy_load.py --rate``: requests spread over time as smtpd processes send them,
    not as fast as the server answers (the plain DUNNO server answers thousands a second)."""
    from mqpolicy.lab.readiness import accepts, free_port, poll
    from mqpolicy.policy.endpoints import Endpoint

    port = free_port()
    server = subprocess.Popen([sys.executable, str(BENCH / "policy_bench.py"),
                               "--serve-dunno", f"127.0.0.1:{port}"], cwd=BENCH.parent)
    try:
        def ready() -> bool:
            assert server.poll() is None, "the DUNNO server exited"
            return accepts(Endpoint(host="127.0.0.1", port=port))

        poll(ready, 60, "the DUNNO server")
        out = bench(str(BENCH / "policy_load.py"), "--target", f"127.0.0.1:{port}",
                    "--concurrency", "4", "--rate", "200", "--duration", "1.5",
                    "--watch-pid", str(server.pid), "--json")
        result = json.loads(out)
        assert result["rate"] == 200
        assert not result["errors"], result
        # Paced: never much above the rate (a slow machine only lowers it), and sending all
        # along (a floor an order of magnitude under the rate: slowness cannot reach it).
        assert 20 <= result["rps"] <= 215, result
        assert result["watched_cpu_us_per_request"][str(server.pid)] > 0, result
    finally:
        server.terminate()
        server.wait(10)
