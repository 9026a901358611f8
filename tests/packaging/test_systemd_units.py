"""``systemd-analyze verify`` passes on every unit in contrib/systemd/, silently.

The units name ``/usr/local/bin/mqpolicy`` (where ``pip install`` puts it), which does not
exist here, and verify rightly refuses a command that is not executable: each unit is
copied to a temporary directory with its ``Exec*=`` commands pointed at this venv's
``mqpolicy``; everything else is verified as shipped. Verify prints a warning (e.g. an
unknown key) without failing, so any output at all fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS_DIR = ROOT / "contrib" / "systemd"
UNIT_SUFFIXES = (".service", ".socket", ".timer", ".path", ".target")
MQPOLICY = Path(sys.executable).parent / "mqpolicy"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
_EXEC = re.compile(r"^(Exec[A-Za-z]*=)([-@:+!]*)(\S+)(.*)$", re.MULTILINE)

pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze (package systemd) is not installed"
)


def units() -> list[Path]:
    return sorted(p for p in UNITS_DIR.iterdir() if p.suffix in UNIT_SUFFIXES)


def with_local_command(text: str) -> str:
    """Point every Exec*= that runs ``mqpolicy`` at this venv's command."""

    def swap(match: re.Match[str]) -> str:
        key, prefixes, command, rest = match.groups()
        if Path(command).name == "mqpolicy":
            command = str(MQPOLICY)
        return f"{key}{prefixes}{command}{rest}"

    return _EXEC.sub(swap, text)


def verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, paths)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def copied(tmp_path: Path) -> list[Path]:
    """Every unit, side by side (so references between them resolve), commands local."""
    found = []
    for unit in units():
        target = tmp_path / unit.name
        target.write_text(with_local_command(unit.read_text()))
        found.append(target)
    return found


def test_there_are_units_to_verify() -> None:
    names = [u.name for u in units()]
    assert "mqpolicy.service" in names
    assert MQPOLICY.exists()


@pytest.mark.parametrize("name", [u.name for u in units()])
def test_unit_verifies_cleanly(name: str, tmp_path: Path) -> None:
    copies = {p.name: p for p in copied(tmp_path)}
    assert "/usr/local/bin/mqpolicy" not in copies[name].read_text()
    done = verify([copies[name]])
    assert (done.returncode, done.stdout + done.stderr) == (0, ""), done


def test_verify_really_checks(tmp_path: Path) -> None:
    """The same check fails on a unit with a typo or with the command as shipped."""
    (unit,) = (p for p in copied(tmp_path) if p.name == "mqpolicy.service")
    text = unit.read_text()
    unit.write_text(text.replace("NoNewPrivileges=", "NoNewPrivilegs=", 1))
    typo = verify([unit])
    assert "NoNewPrivilegs" in typo.stdout + typo.stderr
    shipped = tmp_path / "shipped" / "mqpolicy.service"
    shipped.parent.mkdir()
    shipped.write_text((UNITS_DIR / "mqpolicy.service").read_text())
    if not Path("/usr/local/bin/mqpolicy").exists():
        refused = verify([shipped])
        assert refused.returncode != 0
        assert "/usr/local/bin/mqpolicy" in refused.stdout + refused.stderr


def drop_ins() -> list[Path]:
    return sorted(UNITS_DIR.glob("*.d/*.conf"))


def verify_with_drop_in(tmp_path: Path, drop_in: Path,
                        edit: Callable[[str], str] = str) -> subprocess.CompletedProcess[str]:
    """Verify the unit ``drop_in`` belongs to, loaded by name from a copy of the units
    directory (so that systemd reads the drop-in, ``edit``-ed, beside it)."""
    assert SYSTEMD_ANALYZE is not None
    tmp_path.mkdir()
    copied(tmp_path)
    target = tmp_path / drop_in.parent.name / drop_in.name
    target.parent.mkdir()
    target.write_text(edit(drop_in.read_text()))
    unit = drop_in.parent.name.removesuffix(".d")
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", unit], capture_output=True, text=True,
        timeout=60, stdin=subprocess.DEVNULL, check=False, cwd=tmp_path,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )


def test_there_is_a_sendmail_drop_in() -> None:
    assert [p.relative_to(UNITS_DIR).as_posix() for p in drop_ins()] == [
        "mqpolicy-release-agent.service.d/sendmail.conf"]


@pytest.mark.parametrize("drop_in", drop_ins(), ids=lambda p: p.parent.name + "/" + p.name)
def test_drop_in_verifies_cleanly(drop_in: Path, tmp_path: Path) -> None:
    done = verify_with_drop_in(tmp_path / "clean", drop_in)
    assert (done.returncode, done.stdout + done.stderr) == (0, ""), done
    typo = verify_with_drop_in(tmp_path / "typo", drop_in,
                               lambda text: text.replace("ReadWritePaths=", "ReadWritePath=", 1))
    assert "ReadWritePath" in typo.stdout + typo.stderr  # the drop-in was read


def test_units_that_run_the_milter_reload_with_sigusr1() -> None:
    """``serve`` (which runs the milter when the policy has a ``milter:`` section) and
    ``milter`` reload with SIGUSR1: libmilter's own signal thread may take a SIGHUP and
    stop the milter. The other units keep SIGHUP."""
    checked = 0
    for unit in units():
        text = unit.read_text()
        start = re.search(r"^ExecStart=\S+ (\S+)", text, re.MULTILINE)
        reload = re.search(r"^ExecReload=(.*)$", text, re.MULTILINE)
        if start is None or reload is None:
            continue
        expected = "-USR1" if start.group(1) in ("serve", "milter") else "-HUP"
        assert reload.group(1).split()[1] == expected, (unit.name, reload.group(1))
        checked += start.group(1) in ("serve", "milter")
    assert checked == 3  # mqpolicy.service, mqpolicy@.service, mqpolicy-milter.service
