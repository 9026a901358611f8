"""The in-process bench scripts the README quotes still run and still measure what they say
(each in a process of its own: the milter profile imports pymilter's test module, which
changes pymilter for the whole process). No timing is asserted: figures are the scripts'
job, not the tests'."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mqpolicy.postfix.programs import POSTFIX

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


def run_bounded(argv: list[str], timeout_s: float) -> str:
    """Run a bench script that starts processes of its own; past ``timeout_s`` it gets
    SIGTERM (it unwinds and stops everything it started, by PID), never SIGKILL first."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=BENCH.parent)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"{argv[0]} ran past {timeout_s} s:\n{err}")
    assert proc.returncode == 0, err
    return out


@pytest.mark.e2e
def test_the_postfix_bench_compares_the_wiring_with_a_do_nothing_milter() -> None:
    """``postfix_e2e_bench.py --compare milter-floor``: three private Postfix instances
    (alone, with a do-nothing milter, with both policy hooks and the milter) driven in
    rounds that start one side later each time; each side's whole-run throughput is all
    its messages over all its time. The bench itself fails when the policy server or the
    milter did not decide every message."""
    if not os.access(POSTFIX.path, os.X_OK):
        pytest.skip(f"{POSTFIX.path} not installed")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root")
    out = run_bounded([str(BENCH / "postfix_e2e_bench.py"), "--compare", "milter-floor",
                       "--pairs", "2", "--messages", "24", "--warmup", "8", "--json"], 600)
    result = json.loads(out)
    sides = ("postfix", "floor", "mqpolicy+milter")
    assert [s["mode"] for s in result["segments"]] == [
        "postfix", "floor", "mqpolicy+milter", "floor", "mqpolicy+milter", "postfix"]
    assert [s["pair"] for s in result["segments"]] == [1, 1, 1, 2, 2, 2]
    for mode in sides:
        side = result[mode]
        mine = [s for s in result["segments"] if s["mode"] == mode]
        assert side["messages"] == 48 and side["refused"] == 0, side
        assert side["seconds"] == pytest.approx(sum(s["deliver_s"] for s in mine))
        assert side["delivered_per_s"] == pytest.approx(48 / side["seconds"])
        for latencies in (side["accept_ms"], side["deliver_ms"]):
            assert 0 < latencies["p50"] <= latencies["p90"] <= latencies["p99"], side
        # The process beside Postfix ran during the segments (the floor milter's CPU over
        # 48 messages can stay under one 10 ms clock tick, so its time waiting to run, read
        # in nanoseconds, counts too); Postfix alone has none. That mqpolicy decided every
        # message the bench checks itself (it fails otherwise).
        ran = side["beside_cpu_ms_per_message"] + side["beside_cpu_wait_ms_per_message"]
        assert (ran > 0) == (mode != "postfix"), side
        if mode == "mqpolicy+milter":
            assert side["beside_cpu_ms_per_message"] > 0, side
    rates = {mode: result[mode]["delivered_per_s"] for mode in sides}
    assert result["ratio_overall"] == pytest.approx(rates["mqpolicy+milter"] / rates["floor"])
    assert result["ratio_floor_to_postfix"] == pytest.approx(rates["floor"] / rates["postfix"])
    assert result["target_met"] == (result["ratio_overall"] >= 0.9)
    assert len(result["loadavg_before"]) == len(result["loadavg_after"]) == 3


def test_the_postfix_bench_leaves_out_only_the_policy_hooks_a_side_names(tmp_path: Path) -> None:
    """``--also milter-only`` and ``rcpt-hook+milter`` are postfix-config's output for a
    policy with a milter minus the named ``check_policy_service`` hooks, nothing else."""
    policy = tmp_path / "policy.yaml"
    policy.write_text('listen: ["unix:/var/spool/postfix/mqpolicy/policy.sock"]\n'
                      "milter:\n  listen: unix:/var/spool/postfix/mqpolicy/milter.sock\n"
                      "lanes:\n  - name: normal\n  - name: bulk\n    transport: mq-bulk\n"
                      "default_lane: normal\n")
    generated = subprocess.run(
        [sys.executable, "-m", "mqpolicy", "postfix-config", "-c", str(policy), "--milter",
         "unix:/var/spool/postfix/mqpolicy/milter.sock", "--queue-directory",
         "/var/spool/postfix", "--relayhost", "", "--section", "main.cf"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    code = ("import json, sys; sys.path.insert(0, 'bench'); import postfix_e2e_bench as b; "
            f"text = {generated!r}; "
            "print(json.dumps({side: b.without_policy_hooks(text, hooks) "
            "for side, hooks in b.HOOKS_LEFT_OUT.items()}))")
    sides = json.loads(bench("-c", code))

    def hooks(text: str) -> list[str]:
        """The parameters holding a check_policy_service entry."""
        found, current = [], ""
        for line in text.splitlines():
            if line[:1].strip() and not line.startswith("#"):
                current = line.split("=", 1)[0].strip()
            if "check_policy_service" in line:
                found.append(current)
        return found

    both = ["smtpd_recipient_restrictions", "smtpd_end_of_data_restrictions"]
    assert hooks(generated) == both
    assert sides["mqpolicy+milter"].strip() == generated.strip()
    assert hooks(sides["rcpt-hook+milter"]) == ["smtpd_recipient_restrictions"]
    assert hooks(sides["milter-only"]) == []
    for text in sides.values():  # everything else as generated: the milter, its settings
        rest = [line for line in text.splitlines() if "check_policy_service" not in line]
        assert rest == [line for line in generated.splitlines()
                        if "check_policy_service" not in line]
        assert "smtpd_milters = unix:mqpolicy/milter.sock" in text
