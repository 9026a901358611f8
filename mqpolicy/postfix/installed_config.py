"""What an installed Postfix holds, as ``postconf`` prints it: main.cf parameters
(``postconf -n``, ``-nx``, ``-x``), master.cf services (``-M``) and their ``-o`` overrides
(``-P``), and the values of Postfix's list parameters. Pure: the runs are in
:mod:`mqpolicy.postfix.postconf`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class InstalledService:
    name: str
    kind: str
    command: str
    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PostfixState:
    """What a Postfix config directory holds, as postconf reports it."""

    params: Mapping[str, str]  # postconf -n (raw, $names unexpanded)
    expanded: Mapping[str, str]  # postconf -nx
    services: Mapping[str, InstalledService]  # postconf -M, by name (inet: host:port)
    service_params: Mapping[str, Mapping[str, str]]  # postconf -P: service -> -o overrides
    files: Mapping[str, str | None] = field(default_factory=dict)  # map path -> text
    # postconf -x NAME...: effective values (defaults included) of the settings compared
    effective: Mapping[str, str] = field(default_factory=dict)


def parse_postconf_n(text: str) -> dict[str, str]:
    """``name = value`` lines (continuation lines start with white space)."""
    params: dict[str, str] = {}
    name: str | None = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and name is not None:
            params[name] = f"{params[name]} {line.strip()}".strip()
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        name = key.strip()
        params[name] = value.strip()
    return params


def parse_postconf_m(text: str) -> dict[str, InstalledService]:
    """``postconf -M`` lines: name type private unpriv chroot wakeup maxproc command args."""
    services: dict[str, InstalledService] = {}
    joined: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and joined:
            joined[-1] += " " + line.strip()
        else:
            joined.append(line.strip())
    for line in joined:
        fields = line.split()
        if len(fields) < 8:
            continue
        name, kind = fields[0], fields[1]
        services[f"{name}/{kind}"] = InstalledService(name, kind, fields[7], tuple(fields[8:]))
    return services


def parse_postconf_p(text: str) -> dict[str, dict[str, str]]:
    """``postconf -P`` lines: ``service/type/name = value``."""
    result: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        parts = key.strip().split("/")
        if len(parts) != 3:
            continue
        result.setdefault(f"{parts[0]}/{parts[1]}", {})[parts[2]] = value.strip()
    return result


_TOKEN = re.compile(r"\{[^}]*\}|[^\s,]+")


def list_tokens(value: str) -> list[str]:
    """A Postfix list value as items; ``{ ... }`` groups stay whole."""
    return _TOKEN.findall(value)


def header_map_path(value: str) -> str | None:
    """``regexp:/path`` (or pcre:) → /path; None for other map types."""
    kind, sep, path = value.partition(":")
    if sep and kind in ("regexp", "pcre") and path.startswith("/"):
        return path
    return None


def transport_map_paths(value: str) -> list[str]:
    """The regexp/pcre files named in a ``transport_maps`` value."""
    return [p for p in (header_map_path(t) for t in list_tokens(value)) if p is not None]
