"""What compiling the decision path would buy: the same bench figures, plain and with mypyc.

mqpolicy is pure Python and ships no compiled code. This script measures the one cheap way
to compile it: it copies the package into a temporary directory, compiles the modules every
decision runs through (request, conditions, budget, engine, decisions, memory store, policy
codec and handler) with mypyc (part of mypy, a test dependency; needs gcc and the Python
headers), and runs, for the plain tree and for the compiled copy, in alternation:

* ``bench/decision_profile.py``: CPU per request in one process, hot caches;
* ``bench/milter_profile.py``: the milter's Python per message;
* ``bench/policy_bench.py --stores memory --concurrency 8 --rate R``: ``mqpolicy serve`` paced
  as smtpd processes send, its CPU per request (``server us/req``).

    python bench/compiled_trial.py                    # 2 rounds
    python bench/compiled_trial.py --rounds 3 --rate 1500

Nothing outside the temporary directory changes; it is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
MODULES = ("policy/request", "policy/conditions", "store/budget", "decision/engine",
           "decision/service", "store/memory", "delegation/codec", "delegation/handler")


def compile_copy(workdir: Path) -> None:
    """``workdir/mqpolicy``: the package, its decision path compiled in place."""
    shutil.copytree(REPO / "mqpolicy", workdir / "mqpolicy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    mypyc = Path(sys.executable).with_name("mypyc")
    done = subprocess.run([str(mypyc), *(f"mqpolicy/{m}.py" for m in MODULES)],
                          cwd=workdir, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"compiled_trial: mypyc failed:\n{done.stdout[-3000:]}"
                         f"{done.stderr[-3000:]}")


def run(label: str, argv: Sequence[str], tree: Path | None) -> str:
    """Run a bench script against the plain tree (``tree`` None) or the compiled copy;
    fail when the compiled copy's modules are not the ones imported."""
    env = dict(os.environ)
    check = ("import mqpolicy.decision.engine as e, runpy, sys; "
             "print('engine:', e.__file__, file=sys.stderr); "
             f"sys.argv = {list(argv)!r}; sys.path.insert(0, {str(BENCH)!r}); "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    if tree is not None:
        env["PYTHONPATH"] = str(tree)  # ahead of the editable install's finder
    done = subprocess.run([sys.executable, "-c", check], cwd=tree or REPO, env=env,
                          capture_output=True, text=True, check=False, timeout=900)
    loaded = re.search(r"^engine: (.*)$", done.stderr, re.MULTILINE)
    if done.returncode != 0 or loaded is None:
        raise SystemExit(f"compiled_trial: {label} failed:\n{done.stderr[-3000:]}")
    if (tree is not None) != loaded[1].endswith(".so"):
        raise SystemExit(f"compiled_trial: {label} imported {loaded[1]}")
    return done.stdout + done.stderr


def serve_command(workdir: Path, tree: Path | None) -> str:
    """An executable ``mqpolicy`` for ``policy_bench.py --mqpolicy``."""
    if tree is None:
        return str(Path(sys.executable).with_name("mqpolicy"))
    script = workdir / "mqpolicy-compiled"
    script.write_text(f"#!/bin/sh\ncd {tree} && PYTHONPATH={tree} exec {sys.executable} "
                      f"-m mqpolicy \"$@\"\n")
    script.chmod(0o755)
    return str(script)


def figures(text: str) -> list[str]:
    """The lines of a bench's output worth keeping."""
    keep = re.compile(r"^(decode|handle|total) .*us/request$|^(floor|mqpolicy)( eom-only)? +[\d.]"
                      r"|^memory +C=")
    return [line for line in text.splitlines() if keep.search(line)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--rate", type=float, default=1500.0,
                   help="paced requests/s for the policy server (default 1500)")
    p.add_argument("--duration", type=float, default=4.0,
                   help="measured seconds of each paced run (default 4)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.rate <= 0 or args.duration <= 0:
        p.error("--rounds, --rate and --duration must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mqpolicy-compiled-"))
    try:
        compile_copy(workdir)
        for round_ in range(1, args.rounds + 1):
            for label, tree in (("plain", None), ("compiled", workdir)):
                print(f"== round {round_}, {label}", flush=True)
                runs = (
                    [str(BENCH / "decision_profile.py")],
                    [str(BENCH / "milter_profile.py")],
                    [str(BENCH / "policy_bench.py"), "--stores", "memory", "--concurrency",
                     "8", "--duration", str(args.duration), "--rate", str(args.rate),
                     "--mqpolicy", serve_command(workdir, tree)],
                )
                for argv_ in runs:
                    for line in figures(run(label, argv_, tree)):
                        print(f"  {line}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
