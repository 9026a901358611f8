"""The Postfix settings a policy needs, as data and as the text an operator pastes.

:class:`PostfixConfig` holds what :func:`mqpolicy.postfix.config_generator.generate` derives
from a policy (main.cf settings and list entries, master.cf services, the header-checks and
transport map rules) and renders it: one commented block per file (:meth:`PostfixConfig.render`,
:meth:`PostfixConfig.section`); :func:`split_sections` reads the blocks back. What
``--check`` compares is the same data (:mod:`mqpolicy.postfix.config_check`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mqpolicy.policy.model import Destination, Lane

DEFAULT_POSTFIX_DIR = "/etc/postfix"
DEFAULT_QUEUE_DIR = "/var/spool/postfix"
HEADER_CHECKS_FILE = "mqpolicy_header_checks"
TRANSPORT_MAP_FILE = "mqpolicy_transport"
LANE_HEADER = "X-MQ-Lane"

SECTION_MAIN = "main.cf"
SECTION_MASTER = "master.cf"
SECTION_HEADER_CHECKS = "header_checks"
SECTION_TRANSPORT = "transport"
SECTIONS = (SECTION_MAIN, SECTION_MASTER, SECTION_HEADER_CHECKS, SECTION_TRANSPORT)


GROUP_POLICY = "policy"
GROUP_MILTER = "milter"
GROUP_LANES = "lanes"
GROUP_DESTINATIONS = "destinations"


@dataclass(frozen=True, slots=True)
class Setting:
    """``name = value`` in main.cf, preceded by comment lines; ``group``: the block of
    main.cf it is printed in."""

    name: str
    value: str
    comment: tuple[str, ...] = ()
    group: str = GROUP_POLICY


@dataclass(frozen=True, slots=True)
class ListEntry:
    """An entry that must appear in a list parameter (restrictions, milters)."""

    name: str  # the parameter, e.g. smtpd_recipient_restrictions
    entry: str  # e.g. "check_policy_service inet:127.0.0.1:10040"
    comment: tuple[str, ...] = ()
    group: str = GROUP_POLICY
    first: bool = False  # must come first in the list (a warning otherwise)


@dataclass(frozen=True, slots=True)
class Service:
    """A master.cf service: ``name unix - - - - - smtp -o syslog_name=...``."""

    name: str
    command: str
    options: tuple[tuple[str, str], ...]
    comment: tuple[str, ...] = ()
    kind: str = "unix"
    role: str = "lane"  # what its syslog_name shows: the lane or the destination

    def line(self) -> str:
        columns = "  ".join(["-"] * 5)
        head = f"{self.name:<10} {self.kind:<5} {columns}  {self.command}"
        return "\n".join([head, *(f"  -o {k}={v}" for k, v in self.options)])


@dataclass(frozen=True, slots=True)
class HeaderRule:
    lane: str
    pattern: str  # the regexp, between slashes
    action: str  # FILTER transport:

    def line(self) -> str:
        return f"/{self.pattern}/ {self.action}"


@dataclass(frozen=True, slots=True)
class TransportRule:
    """One domain pattern of a destination in the transport map: ``/regex/ transport:nexthop``,
    inside ``if !/regex/`` blocks for overlapping patterns of earlier destinations that
    have no transport (mqpolicy matches those first; Postfix must not route them here)."""

    destination: str
    pattern: str  # the destination's domain pattern: example.com or *.example.com
    regex: str  # between slashes
    action: str  # transport:nexthop
    excluded: tuple[str, ...] = ()  # regexes of earlier patterns, for if !/.../

    def lines(self) -> list[str]:
        return [*(f"if !/{e}/" for e in self.excluded), f"/{self.regex}/ {self.action}",
                *("endif" for _ in self.excluded)]


@dataclass(frozen=True, slots=True)
class DestinationTransport:
    """A destination's transport: its main.cf settings, notes and map rules."""

    destination: Destination
    transport: str
    settings: tuple[Setting, ...]
    notes: tuple[str, ...]
    rules: tuple[TransportRule, ...]


@dataclass(frozen=True, slots=True)
class PostfixConfig:
    """The generated configuration: text blocks and what ``--check`` compares."""

    policy_source: str
    policy_address: str
    header_checks_path: str
    lists: tuple[ListEntry, ...]
    settings: tuple[Setting, ...]
    milter_settings: tuple[Setting, ...]  # commented out unless a milter address is given
    milter_enabled: bool
    lane_settings: tuple[tuple[Lane, tuple[Setting, ...], tuple[str, ...]], ...]
    services: tuple[Service, ...]
    header_rules: tuple[HeaderRule, ...]
    notes: tuple[str, ...] = ()
    lane_header: str = LANE_HEADER
    transport_map_path: str = str(Path(DEFAULT_POSTFIX_DIR) / TRANSPORT_MAP_FILE)
    destination_transports: tuple[DestinationTransport, ...] = ()
    queue_directory: str = DEFAULT_QUEUE_DIR  # unix sockets inside it are named relative
    transport_nexthop: str | None = None  # what the map's entries name; None: unknown

    @property
    def all_settings(self) -> tuple[Setting, ...]:
        lanes = tuple(s for _, settings, _ in self.lane_settings for s in settings)
        milter = self.milter_settings if self.milter_enabled else ()
        dests = tuple(s for d in self.destination_transports for s in d.settings)
        return (*self.settings, *milter, *lanes, *dests)

    @property
    def transport_rules(self) -> tuple[TransportRule, ...]:
        return tuple(r for d in self.destination_transports for r in d.rules)

    # ------------------------------------------------------------ text

    def main_cf(self) -> str:
        out: list[str] = []
        out.append("# --- mqpolicy: the policy server, per recipient and per message")
        for entry in self.lists:
            if entry.name.endswith("_milters") or entry.group != GROUP_POLICY:
                continue
            out.extend(f"# {c}" for c in entry.comment)
            out.append(f"{entry.name} =\n    {entry.entry}")
        for setting in self.settings:
            if setting.group == GROUP_POLICY:
                out.extend(_setting_lines(setting))
        out.append("")
        out.append("# --- mqpolicy: the milter (header-based lanes, locally submitted mail)")
        if not self.milter_enabled:
            out.append("# Uncomment when the mqpolicy milter runs (or run postfix-config with")
            out.append("# --milter ADDRESS). Already running milters? Add it to your lists.")
        for entry in self.lists:
            if entry.name.endswith("_milters"):
                out.extend(f"# {c}" for c in entry.comment)
                line = f"{entry.name} = {entry.entry}"
                out.append(line if self.milter_enabled else f"#{line}")
        for setting in self.milter_settings:
            lines = _setting_lines(setting)
            if not self.milter_enabled:
                lines = [ln if ln.startswith("#") else f"#{ln}" for ln in lines]
            out.extend(lines)
        for setting in self.settings:
            if setting.group == GROUP_MILTER:
                out.extend(_setting_lines(setting))
        out.append("")
        out.append("# --- mqpolicy: lanes as transports (the queue manager reads these here only)")
        for setting in self.settings:
            if setting.group == GROUP_LANES:
                out.extend(_setting_lines(setting))
        for lane, settings, lane_notes in self.lane_settings:
            out.append(f"# lane {lane.name} (priority {lane.priority + 1}): "
                       f"transport {lane.transport}")
            out.extend(f"# {n}" for n in lane_notes)
            for setting in settings:
                out.extend(_setting_lines(setting))
        if self.destination_transports:
            out.append("")
            out.append("# --- mqpolicy: destinations as transports (recipient domain -> its "
                       "destination's transport)")
            for entry in self.lists:
                if entry.group == GROUP_DESTINATIONS:
                    out.extend(f"# {c}" for c in entry.comment)
                    out.append(f"{entry.name} = {entry.entry}")
            for dest in self.destination_transports:
                out.append(f"# destination {dest.destination.name}: transport {dest.transport}")
                out.extend(f"# {n}" for n in dest.notes)
                for setting in dest.settings:
                    out.extend(_setting_lines(setting))
        return "\n".join(out) + "\n"

    def master_cf(self) -> str:
        out = ["# --- mqpolicy: one smtp client per lane; its syslog_name puts the lane in the log"]
        if any(s.role == "destination" for s in self.services):
            out = ["# --- mqpolicy: one smtp client per lane and per destination transport; its",
                   "# syslog_name puts the lane or destination in the log"]
        if not self.services:
            out.append("# (every lane uses Postfix's default smtp transport: nothing to add)")
        for service in self.services:
            out.extend(f"# {c}" for c in service.comment)
            out.append(service.line())
        return "\n".join(out) + "\n"

    def header_checks(self) -> str:
        out = [
            f"# {self.lane_header}: <lane> (added by the mqpolicy milter) -> the lane's "
            "transport.",
            "# A regexp table: no postmap needed; postfix reload after a change.",
        ]
        if not self.header_rules:
            out.append("# (no lane has its own transport: no rules)")
        out.extend(rule.line() for rule in self.header_rules)
        return "\n".join(out) + "\n"

    def transport_map(self) -> str:
        out = [
            "# Recipient address -> the transport of its mqpolicy destination (destinations",
            "# with Postfix delivery settings and domains), in the policy's order: the first",
            "# match wins, as in mqpolicy. A regexp table: no postmap needed; postfix reload",
            "# after a change.",
        ]
        if not self.transport_rules:
            # no entries: no next hop to name (mail goes where main.cf sends it)
            out.append("# (no destination has Postfix delivery settings and domains: "
                       "nothing to write)")
            return "\n".join(out) + "\n"
        hop = self.transport_nexthop
        if hop:
            out.append(f"# Next hop {hop}: your relayhost. Regenerate this file when "
                       "relayhost changes.")
        elif hop == "":
            out.append("# No relayhost: an empty next hop, i.e. the recipient domain's MX "
                       "(as without this map).")
        else:
            out.extend([
                "# Relay host unknown: an empty next hop sends this mail to the recipient",
                "# domain's MX, bypassing relayhost. Regenerate with --relayhost or where",
                "# postconf can read main.cf.",
            ])
        for dest in self.destination_transports:
            out.append(f"# destination {dest.destination.name}")
            for rule in dest.rules:
                out.extend(rule.lines())
        return "\n".join(out) + "\n"

    def section(self, name: str) -> str:
        if name == SECTION_MAIN:
            return self.main_cf()
        if name == SECTION_MASTER:
            return self.master_cf()
        if name == SECTION_HEADER_CHECKS:
            return self.header_checks()
        if name == SECTION_TRANSPORT:
            return self.transport_map()
        raise ValueError(f"no section {name!r} (sections: {', '.join(SECTIONS)})")

    def render(self) -> str:
        names = ", ".join(f"{lane.name}={lane.transport}" for lane, _, _ in self.lane_settings)
        head = [
            f"# Postfix settings for the mqpolicy policy {self.policy_source}",
            f"# policy server: {self.policy_address}; lanes with their own transport: "
            f"{names or 'none'}",
            "# Add each block to the file named in its header, then run:",
            "#   postfix check && postfix reload",
            "# and verify with: mqpolicy postfix-config -c POLICY --check /etc/postfix",
        ]
        head.extend(f"# NOTE: {n}" for n in self.notes)
        blocks = [
            _banner(SECTION_MAIN, "add to main.cf"),
            self.main_cf(),
            _banner(SECTION_MASTER, "add to master.cf"),
            self.master_cf(),
            _banner(SECTION_HEADER_CHECKS, f"write to {self.header_checks_path}"),
            self.header_checks(),
        ]
        if self.destination_transports:
            dests = ", ".join(f"{d.destination.name}={d.transport}"
                              for d in self.destination_transports)
            head.insert(2, f"# destinations with their own transport: {dests}")
            blocks += [_banner(SECTION_TRANSPORT, f"write to {self.transport_map_path}"),
                       self.transport_map()]
        return "\n".join(head) + "\n\n" + "\n".join(blocks)


def _banner(section: str, what: str) -> str:
    return f"# ======== {section}: {what} ========"


_BANNER = re.compile(r"^# =+ (\S+): .* =+$")


def split_sections(text: str) -> dict[str, str]:
    """The blocks of :meth:`PostfixConfig.render` output by section name."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _BANNER.match(line)
        if match and match.group(1) in SECTIONS:
            current = sections.setdefault(match.group(1), [])
            continue
        if current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip("\n") + "\n" for name, lines in sections.items()}


def _setting_lines(setting: Setting) -> list[str]:
    return [*(f"# {c}" for c in setting.comment), f"{setting.name} = {setting.value}"]
