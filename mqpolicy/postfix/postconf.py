"""The I/O of ``postfix-config``: ``postconf`` (``$MQPOLICY_POSTCONF`` or
``/usr/sbin/postconf``, :mod:`mqpolicy.postfix.programs`) run on a Postfix config directory,
and the header-checks and transport maps it names read."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

from mqpolicy.postfix.installed_config import (
    PostfixState,
    header_map_path,
    parse_postconf_m,
    parse_postconf_n,
    parse_postconf_p,
    transport_map_paths,
)
from mqpolicy.postfix.programs import POSTCONF


def _postconf(config_dir: str, *args: str) -> str:
    """postconf's output for ``config_dir``; OSError with its message when it fails."""
    proc = subprocess.run(
        [POSTCONF.path, "-c", config_dir, *args], capture_output=True, text=True,
        timeout=30, check=False, stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise OSError(f"postconf -c {config_dir} {' '.join(args)}: "
                      f"{proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def read_postfix(config_dir: str, names: Iterable[str] = ()) -> PostfixState:
    """Run postconf on ``config_dir`` (``names``: settings whose effective value is
    wanted) and read the header-checks and transport maps it names."""

    def run(*args: str) -> str:
        return _postconf(config_dir, *args)

    params = parse_postconf_n(run("-n"))
    expanded = parse_postconf_n(run("-nx"))
    services = parse_postconf_m(run("-M"))
    service_params = parse_postconf_p(run("-P"))
    files: dict[str, str | None] = {}
    paths = [header_map_path(expanded.get("milter_header_checks", "")),
             *transport_map_paths(expanded.get("transport_maps", ""))]
    for path in paths:
        if path is None or path in files:
            continue
        try:
            files[path] = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            files[path] = None
    wanted = sorted(set(names))
    effective = parse_postconf_n(run("-x", *wanted)) if wanted else {}
    return PostfixState(params, expanded, services, service_params, files, effective)


def read_parameters(config_dir: str, *names: str) -> dict[str, str]:
    """Postfix's parameters ``names`` in ``config_dir``, expanded ('' when unset): one
    postconf run."""
    values = _postconf(config_dir, "-xh", *names).split("\n")
    return {name: value.strip() for name, value in zip(names, values, strict=False)}
