"""``pip install .`` gives a working ``mqpolicy``: build the wheel, look inside, install it
into a fresh venv and run the command there.

The wheel is built from a copy of the project's packaging inputs (``pyproject.toml``,
``README.md``, ``mqpolicy/``) in a temporary directory, so the work tree gets no ``build/``
or ``*.egg-info``; ``pip wheel`` builds it in its usual isolated build environment
(setuptools from the package index or pip's cache). The fresh venv has no pip and no
network: the wheel goes in with ``pip --python <venv> install --no-deps --no-index``, and the
runtime dependencies already installed in the project's venv are made visible to it through a
``.pth`` line (appended after the venv's own site-packages, so the installed wheel, not the
work tree, provides ``mqpolicy``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip"]
ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "mqpolicy", source / "mqpolicy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = work / "dist"
    run([*PIP, "wheel", "--no-deps", "-q", "-w", str(dist), str(source)], cwd=work)
    (built,) = dist.glob("mqpolicy-*.whl")
    return built


def test_wheel_ships_scripts_marker_and_example(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        console = archive.read(entry_points).decode()
        example = archive.read("mqpolicy/examples/mqpolicy.yaml").decode()
    scripts = {p.name for p in (ROOT / "mqpolicy" / "store" / "lua").glob("*.lua")}
    assert {"gcra_batch.lua", "gcra_refund.lua"} <= scripts
    assert {f"mqpolicy/store/lua/{name}" for name in scripts} <= names
    assert "mqpolicy/py.typed" in names
    assert example == (ROOT / "conf" / "mqpolicy.yaml").read_text()
    assert "mqpolicy = mqpolicy.cli:main" in console
    assert not any(n.startswith(("tests/", "bench/", "conf/")) for n in names)


def test_installed_wheel_runs_mqpolicy_check_on_its_example(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    run([*PIP, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        cwd=tmp_path)
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path).stdout.strip())
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = run([str(python), "-c", "import mqpolicy; print(mqpolicy.__file__)"], cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(site)
    run([str(python), "-c",
         "from mqpolicy.store.redis_connection import load_script; "
         "assert 'KEYS' in load_script('gcra_batch.lua') and 'KEYS' in load_script('gcra_refund.lua')"],
        cwd=tmp_path)  # fmt: skip

    example = site / "mqpolicy" / "examples" / "mqpolicy.yaml"
    checked = run([str(venv / "bin" / "mqpolicy"), "check", "-c", str(example)], cwd=tmp_path)
    assert "OK" in checked.stdout + checked.stderr
    # `mqpolicy demo` finds its policy in the installed package, not in a checkout
    demo = run([str(python), "-c", "from mqpolicy.lab.demo import DEMO_CONFIG; print(DEMO_CONFIG)"],
               cwd=tmp_path).stdout.strip()
    assert Path(demo).is_relative_to(site)
    assert "OK" in run([str(venv / "bin" / "mqpolicy"), "check", "-c", demo],
                       cwd=tmp_path).stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(example.read_text().replace("lanes:", "lanse:", 1))
    refused = subprocess.run([str(venv / "bin" / "mqpolicy"), "check", "-c", str(broken)],
                             cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60,
                             check=False)
    assert refused.returncode == 1, refused


def test_the_milter_package_leaves_pymilter_its_milter_module() -> None:
    """``mqpolicy.milter`` is a subpackage, imported absolutely: pymilter's ``Milter`` still
    gets pymilter's own top-level ``milter`` (the C extension), not ours."""
    import Milter
    import milter

    from mqpolicy.milter import callbacks, runner

    assert callbacks.Milter is Milter
    assert runner.Milter is Milter
    assert Milter.milter is milter
    assert Path(milter.__file__).name.startswith("milter.cpython")
    assert Path(milter.__file__).suffix == ".so"
