"""``mqpolicy postfix-config --check``: an installed Postfix's configuration against what a
policy needs. Pure: :func:`compare` turns a
:class:`~mqpolicy.postfix.installed_config.PostfixState` and the generated
:class:`~mqpolicy.postfix.settings.PostfixConfig` into findings, one per requirement
(ok, missing, different, warning)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from mqpolicy.postfix.config_generator import queue_relative
from mqpolicy.postfix.installed_config import PostfixState, header_map_path, list_tokens
from mqpolicy.postfix.settings import GROUP_POLICY, PostfixConfig


class Status(Enum):
    OK = "ok"
    MISSING = "missing"
    DIFFERENT = "different"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Finding:
    status: Status
    where: str  # main.cf, master.cf, or the map's path
    what: str
    detail: str = ""

    def __str__(self) -> str:
        text = f"{self.status.value:<9} {self.where}: {self.what}"
        return f"{text}  ({self.detail})" if self.detail else text


_VAR = re.compile(r"\$(\{(\w+)\}|\((\w+)\)|(\w+))")
_TIME = re.compile(r"^(\d+)(ms|s|m|h|d|w)?$")
_TIME_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


_UNIX_ADDRESS = re.compile(r"unix:(\S+)")


def _queue_relative_entry(entry: str, queue_directory: str) -> str:
    """A list entry with its unix socket, if any, named as :func:`queue_relative` names
    it."""
    return _UNIX_ADDRESS.sub(
        lambda m: "unix:" + queue_relative(m.group(1), queue_directory), entry)


def _entries(value: str) -> list[str]:
    """Restriction or milter list → entries, joining ``check_* ADDRESS`` pairs."""
    tokens = list_tokens(value)
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("check_") and i + 1 < len(tokens):
            target = tokens[i + 1]
            if target.startswith("{"):
                inner = list_tokens(target.strip("{} "))
                target = inner[0] if inner else ""
            out.append(f"{token} {target}")
            i += 2
            continue
        if token.startswith("{"):
            inner = list_tokens(token.strip("{} "))
            token = inner[0] if inner else token
        out.append(token)
        i += 1
    return out


def _expand(value: str, params: Mapping[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(2) or match.group(3) or match.group(4)
        return params.get(name, "")

    return _VAR.sub(sub, value)


def _same_value(name: str, want: str, have: str) -> bool:
    norm_want, norm_have = " ".join(want.split()), " ".join(have.split())
    if norm_want == norm_have:
        return True
    if name.endswith(("_rate_delay", "_timeout", "_max_idle")):
        a, b = _TIME.match(norm_want), _TIME.match(norm_have)
        if a and b:
            return int(a[1]) * _TIME_MS[a[2] or "s"] == int(b[1]) * _TIME_MS[b[2] or "s"]
    return False


def compare(config: PostfixConfig, state: PostfixState) -> list[Finding]:
    """What is there against what the policy needs, one finding per requirement."""
    found: list[Finding] = []
    main = "main.cf"
    for entry in config.lists:
        if entry.name.endswith("_milters") and not config.milter_enabled:
            continue
        value = state.expanded.get(entry.name, state.params.get(entry.name, ""))
        entries = _entries(value)
        want = entry.entry
        if want not in entries:
            same = [e for e in entries
                    if _queue_relative_entry(e, config.queue_directory) == want]
            if same:  # the same socket by its absolute name: never a second entry
                found.append(Finding(
                    Status.DIFFERENT, main, f"{entry.name}: replace {same[0]} with {want}",
                    "the same socket; a chrooted Postfix daemon reaches only the name "
                    "relative to the queue directory"))
                continue
            found.append(Finding(Status.MISSING, main, f"{entry.name}: add {want}",
                                 f"now: {value or '(empty)'}"))
            continue
        found.append(Finding(Status.OK, main, f"{entry.name} has {want}"))
        if entry.first and entries.index(want) > 0:
            before = entries[: entries.index(want)]
            found.append(Finding(
                Status.WARNING, main, f"{entry.name}: {', '.join(before)} before {want}",
                "an earlier table's entry for a destination's domain wins over the "
                "destination's transport",
            ))
        if entry.name == "smtpd_recipient_restrictions":
            before = entries[: entries.index(want)]
            permits = [e for e in before if e.startswith("permit")]
            if permits:
                found.append(Finding(
                    Status.WARNING, main,
                    f"{entry.name}: {', '.join(permits)} before check_policy_service",
                    "mail accepted by those is never seen by the policy server",
                ))
    for setting in config.all_settings:
        have = state.params.get(setting.name)
        if have is None:
            default = state.effective.get(setting.name)
            want_x = _expand(setting.value, state.expanded)
            if default is not None and _same_value(setting.name, want_x, default):
                found.append(Finding(Status.OK, main, f"{setting.name} = {default}",
                                     "Postfix's default"))
            else:
                now = f"now: {default or '(empty)'}" if default is not None else ""
                found.append(Finding(Status.MISSING, main,
                                     f"{setting.name} = {setting.value}", now))
            continue
        if _same_value(setting.name, setting.value, have):
            found.append(Finding(Status.OK, main, f"{setting.name} = {have}"))
            continue
        want_x = _expand(setting.value, state.expanded)
        have_x = state.expanded.get(setting.name, have)
        if "$" in setting.value and want_x and _same_value(setting.name, want_x, have_x):
            found.append(Finding(Status.OK, main, f"{setting.name} = {have}",
                                 f"same as {setting.value}"))
            continue
        found.append(Finding(Status.DIFFERENT, main, f"{setting.name} = {setting.value}",
                             f"now: {have}"))
    for service in config.services:
        key = f"{service.name}/{service.kind}"
        installed = state.services.get(key)
        if installed is None:
            found.append(Finding(Status.MISSING, "master.cf",
                                 f"service {service.name} ({service.kind}, {service.command})"))
            continue
        if installed.command != service.command:
            found.append(Finding(Status.DIFFERENT, "master.cf",
                                 f"service {service.name} runs {service.command}",
                                 f"now: {installed.command}"))
            continue
        found.append(Finding(Status.OK, "master.cf", f"service {service.name}"))
        overrides = state.service_params.get(key, {})
        for name, value in service.options:
            have = overrides.get(name)
            if have is None:
                found.append(Finding(Status.WARNING, "master.cf",
                                     f"service {service.name}: no -o {name}",
                                     f"the log will not show the {service.role}"))
            elif have != value:
                found.append(Finding(Status.OK, "master.cf",
                                     f"service {service.name}: -o {name}={have}",
                                     f"suggested {value}"))
    found.extend(_compare_service_overrides(config, state))
    found.extend(_compare_header_checks(config, state))
    found.extend(_compare_transport_map(config, state))
    return found


def _compare_service_overrides(config: PostfixConfig, state: PostfixState) -> list[Finding]:
    """A master.cf service (submission, smtps...) that sets its own restriction or milter
    list with ``-o`` bypasses what main.cf says for the mail it receives."""
    found = []
    wanted = {e.name: e.entry for e in config.lists if e.group == GROUP_POLICY
              and (config.milter_enabled or not e.name.endswith("_milters"))}
    for service, overrides in sorted(state.service_params.items()):
        for name, value in overrides.items():
            entry = wanted.get(name)
            if entry is None:
                continue
            if entry not in _entries(_expand(value, state.expanded)):
                found.append(Finding(
                    Status.WARNING, "master.cf",
                    f"service {service} sets -o {name}={value} without {entry}",
                    "mail received by that service is not seen by mqpolicy",
                ))
    return found


def _compare_header_checks(config: PostfixConfig, state: PostfixState) -> list[Finding]:
    if not config.header_rules:
        return []
    value = state.expanded.get("milter_header_checks", state.params.get("milter_header_checks"))
    path = header_map_path(value or "")
    if path is None:
        return []  # already reported as a missing or different setting
    text = state.files.get(path)
    if text is None:
        return [Finding(Status.MISSING, path, "the header-checks map (file not readable)")]
    lines = {" ".join(line.split()) for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")}
    found = []
    for rule in config.header_rules:
        status = Status.OK if " ".join(rule.line().split()) in lines else Status.MISSING
        found.append(Finding(status, path, rule.line()))
    return found


def _compare_transport_map(config: PostfixConfig, state: PostfixState) -> list[Finding]:
    """The transport map holds the generated lines, in order, and nothing else: its
    first match wins, so a stale line (an old relay host, a removed destination) would
    still route mail."""
    rules = config.transport_rules
    if not rules:
        return []
    value = state.expanded.get("transport_maps", state.params.get("transport_maps", ""))
    path = config.transport_map_path
    if f"regexp:{path}" not in list_tokens(value or ""):
        return []  # already reported as a missing list entry
    text = state.files.get(path)
    if text is None:
        return [Finding(Status.MISSING, path, "the transport map (file not readable)")]
    have = [" ".join(line.split()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    want = [" ".join(line.split()) for rule in rules for line in rule.lines()]
    found = []
    for rule in rules:
        line = " ".join(rule.lines()[len(rule.excluded)].split())
        status = Status.OK if line in have else Status.MISSING
        found.append(Finding(status, path, line, f"destination {rule.destination}"))
    extra = [line for line in have if line not in want]
    for line in extra:
        found.append(Finding(Status.DIFFERENT, path, f"remove {line}",
                             "not generated for this policy (a stale entry?)"))
    complete = all(f.status is Status.OK for f in found)
    if complete and have != want:
        found.append(Finding(Status.DIFFERENT, path, "the lines are not in the generated order",
                             "the first match wins: write the generated block"))
    return found
