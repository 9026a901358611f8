"""What a shipped systemd unit gives its process (user, groups, capability bounding set,
no-new-privileges), read from the unit file itself and turned into a ``setpriv`` command
line, so that tests run each command with exactly its unit's credentials.

Users and groups are looked up through a :class:`Accounts` map: the ``mqpolicy`` user
does not exist on a test machine, so tests map it to a throwaway uid/gid with no account
(:func:`throwaway_id`) and the other names (``root``, ``postdrop``, ``adm``) to the real
ones.

This machine's Python may live under a directory other users cannot traverse (``/root``,
0700). An unprivileged process then sees the interpreter through a private mount
namespace in which that one directory is replaced by a tmpfs holding only the path to the
interpreter (:func:`interpreter_view`), as a unit's ``BindReadOnlyPaths=`` would; nothing
else changes, and the mounts vanish with the process.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNITS_DIR = ROOT / "contrib" / "systemd"
SETPRIV = shutil.which("setpriv")
UNSHARE = shutil.which("unshare")


@dataclass(frozen=True, slots=True)
class ServiceCredentials:
    """The [Service] settings of a unit that decide what its process may do."""

    unit: str
    exec_start: tuple[str, ...]
    user: str
    group: str
    supplementary_groups: tuple[str, ...]
    no_new_privileges: bool
    capability_bounding_set: tuple[str, ...]  # () = none at all

    @property
    def subcommand(self) -> str:
        """The ``mqpolicy`` subcommand the unit runs (``serve``, ``release-agent``...)."""
        return self.exec_start[1]


def read_service(unit: str) -> ServiceCredentials:
    """Parse ``contrib/systemd/<unit>`` ([Service] only; list settings accumulate and an
    empty assignment resets them, as systemd reads them)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS_DIR / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section != "Service":
            continue
        key, _, value = line.partition("=")
        if value.strip():
            values.setdefault(key, []).extend(value.split())
        else:
            values[key] = []
    caps = tuple(values.get("CapabilityBoundingSet", ["(all)"]))
    if caps == ("(all)",):
        raise ValueError(f"{unit}: no CapabilityBoundingSet=: it would keep every capability")
    return ServiceCredentials(
        unit=unit,
        exec_start=(Path(values["ExecStart"][0]).name, *values["ExecStart"][1:]),
        user=values.get("User", ["root"])[0],
        group=values.get("Group", values.get("User", ["root"]))[0],
        supplementary_groups=tuple(values.get("SupplementaryGroups", [])),
        no_new_privileges=values.get("NoNewPrivileges", ["no"])[0] in ("yes", "true", "1"),
        capability_bounding_set=caps,
    )


@dataclass(frozen=True, slots=True)
class Accounts:
    """Names in unit files → ids on this machine (``users``/``groups`` first, then the
    system's own accounts)."""

    users: dict[str, int]
    groups: dict[str, int]

    def uid(self, name: str) -> int:
        return self.users[name] if name in self.users else pwd.getpwnam(name).pw_uid

    def gid(self, name: str) -> int:
        return self.groups[name] if name in self.groups else grp.getgrnam(name).gr_gid


def throwaway_id() -> int:
    """A uid (and the same gid) no account, no group and no process has."""
    taken = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    owners = set()
    for pid in taken:
        try:
            owners.add(os.stat(f"/proc/{pid}").st_uid)
        except OSError:
            continue
    for candidate in range(61_184, 65_000, 7):
        try:
            pwd.getpwuid(candidate)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(candidate)
            continue
        except KeyError:
            pass
        if candidate not in owners:
            return candidate
    raise RuntimeError("no free uid found")


def setpriv_argv(service: ServiceCredentials, accounts: Accounts) -> list[str]:
    """``setpriv`` with the unit's user, group, supplementary groups, capability bounding
    set (nothing inheritable or ambient) and no-new-privileges."""
    assert SETPRIV is not None
    groups = [str(accounts.gid(g)) for g in service.supplementary_groups]
    caps = ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}"
                               for c in service.capability_bounding_set)])
    argv = [SETPRIV, f"--reuid={accounts.uid(service.user)}",
            f"--regid={accounts.gid(service.group)}",
            f"--groups={','.join(groups)}" if groups else "--clear-groups",
            "--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set={caps}"]
    if service.no_new_privileges:
        argv.append("--no-new-privs")
    return argv


def _closed_ancestor(path: Path) -> Path | None:
    """The first directory on ``path`` that others may not traverse, if any."""
    for parent in reversed(path.parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


def interpreter_view(workdir: Path) -> list[str]:
    """A command prefix under which an unprivileged process can run this interpreter: a
    private mount namespace where the closed directory on the interpreter's path is a
    tmpfs (mode 0755) holding just the next directory of that path, bind-mounted from the
    original (``workdir`` keeps it meanwhile). Empty when nothing is closed."""
    paths = [Path(os.path.realpath(sys.executable)), Path(sys.base_prefix).resolve()]
    closed = {c for c in map(_closed_ancestor, paths) if c is not None}
    if not closed:
        return []
    assert UNSHARE is not None
    (top,) = closed
    inner = {p.relative_to(top).parts[0] for p in paths}
    workdir.mkdir(mode=0o700, exist_ok=True)
    script = ["set -e"]
    for number, name in enumerate(sorted(inner)):
        keep = shlex.quote(str(workdir / f"keep{number}"))
        script += [f"mkdir -p {keep}", f"mount --bind {shlex.quote(str(top / name))} {keep}"]
    script.append(f"mount -t tmpfs -o mode=0755 mqpolicy-test {shlex.quote(str(top))}")
    for number, name in enumerate(sorted(inner)):
        keep = shlex.quote(str(workdir / f"keep{number}"))
        target = shlex.quote(str(top / name))
        script += [f"mkdir {target}", f"mount --move {keep} {target}"]
    script.append('exec "$@"')
    return [UNSHARE, "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
            "; ".join(script), "sh"]


def launcher(unit: str, accounts: Accounts, workdir: Path) -> list[str]:
    """What to put before ``python -m mqpolicy ...`` to run it as ``unit`` would."""
    service = read_service(unit)
    view = interpreter_view(workdir) if accounts.uid(service.user) != 0 else []
    return [*view, *setpriv_argv(service, accounts)]
