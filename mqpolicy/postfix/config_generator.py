"""``mqpolicy postfix-config``: the Postfix settings a policy needs, and a check of them.

Pure: :func:`generate` turns a :class:`~mqpolicy.policy.model.Policy` into three commented
blocks, and :func:`compare` turns ``postconf`` output into findings. The only I/O is in
:func:`read_postfix` (runs ``postconf``, reads the header-checks map) and in the command,
:mod:`mqpolicy.commands.postfix_config`.

How a policy reaches Postfix:

* ``check_policy_service`` in ``smtpd_recipient_restrictions`` (per recipient) and in
  ``smtpd_end_of_data_restrictions`` (per message): the policy server answers ``DUNNO``,
  ``450 4.7.1 ...``, ``HOLD ...``, ``550 5.7.1 ...`` or ``FILTER <transport>:`` for a lane
  decided from the envelope. ``FILTER`` works at both stages; the last one wins.
* Each lane with its own transport is a ``smtp`` service in master.cf with its own
  ``syslog_name`` (logs show the lane); its concurrency and rate delay are
  ``<transport>_destination_*`` parameters in main.cf (the queue manager reads them only
  there, never from ``-o`` in master.cf).
* The milter adds ``X-MQ-Lane: <lane>``; ``milter_header_checks`` turns it into
  ``FILTER <transport>:``.
* ``FILTER transport:`` names no next hop: Postfix then uses ``default_filter_nexthop``,
  else the recipient domain's MX, *bypassing relayhost*. ``default_filter_nexthop =
  $relayhost`` keeps lane mail on the relay host when there is one.
* A destination with Postfix delivery settings (concurrency, rate delay...) and ``domains``
  patterns gets a transport of its own (``mq-dest-<name>``, a ``smtp`` service like a
  lane's) and a ``transport_maps`` regexp table mapping its domains to it, in the policy's
  order (first match wins, as in mqpolicy). A transport-table result with an empty next
  hop means the *recipient domain* (transport(5)), bypassing relayhost, and the table has
  no ``default_filter_nexthop``: the entries name the relay host itself (read from
  Postfix's ``relayhost``, or ``--relayhost``). FILTER (a lane's transport) replaces the
  transport table's result, transport and next hop, for every recipient of the message.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath

from mqpolicy.policy.endpoints import Endpoint, parse_endpoint
from mqpolicy.policy.model import Destination, Lane, Policy, PostfixDelivery

DEFAULT_POSTFIX_DIR = "/etc/postfix"
DEFAULT_QUEUE_DIR = "/var/spool/postfix"
HEADER_CHECKS_FILE = "mqpolicy_header_checks"
TRANSPORT_MAP_FILE = "mqpolicy_transport"
DESTINATION_TRANSPORT_PREFIX = "mq-dest-"
LANE_HEADER = "X-MQ-Lane"
DEFAULT_POLICY_ACTION = "451 4.3.5 Policy service unavailable, try again later"
POSTCONF = "/usr/sbin/postconf"

SECTION_MAIN = "main.cf"
SECTION_MASTER = "master.cf"
SECTION_HEADER_CHECKS = "header_checks"
SECTION_TRANSPORT = "transport"
SECTIONS = (SECTION_MAIN, SECTION_MASTER, SECTION_HEADER_CHECKS, SECTION_TRANSPORT)


# ---------------------------------------------------------------- what the policy needs


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
class PostfixConfigOptions:
    """What the policy file does not say: where Postfix reaches mqpolicy, and how."""

    policy_endpoint: str | None = None  # default: policy_endpoint(policy.listen, ...)
    milter: str | None = None  # the milter's address; None: milter lines commented out
    config_directory: str = DEFAULT_POSTFIX_DIR  # where the header-checks map lives
    # Postfix's queue_directory: its daemons run there (chrooted or not), so a unix socket
    # inside it is named relative to it, which a chrooted smtpd reaches too
    queue_directory: str = DEFAULT_QUEUE_DIR
    default_action: str = DEFAULT_POLICY_ACTION
    policy_timeout_s: int = 10
    lane_header: str = LANE_HEADER  # the header the milter sets
    # The next hop of destination transports: Postfix's relayhost (expanded); "" = no
    # relayhost (MX delivery); None = unknown (entries name no next hop, with a NOTE).
    relayhost: str | None = None


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


# ---------------------------------------------------------------- generate


def queue_relative(path: str, queue_directory: str) -> str:
    """A unix socket path as Postfix's daemons reach it best: relative to the queue
    directory when it lies inside it (they run there; a chrooted one sees nothing else,
    and an absolute path inside its chroot would not resolve), else as given."""
    try:
        inside = PurePosixPath(path).relative_to(PurePosixPath(queue_directory))
    except ValueError:
        return path
    if inside.parts and ".." not in inside.parts:
        return str(inside)
    return path


def postfix_address(endpoint: Endpoint, queue_directory: str) -> str:
    """How ``check_policy_service`` / ``smtpd_milters`` name an endpoint; a wildcard
    listen address is reached on loopback, a unix socket inside ``queue_directory``
    relative to it."""
    if endpoint.is_unix:
        return f"unix:{queue_relative(endpoint.path, queue_directory)}"
    host = endpoint.host
    if host in ("", "0.0.0.0"):  # a listen wildcard: connect on loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        return f"inet:[{host}]:{endpoint.port}"
    return f"inet:{host}:{endpoint.port}"


def parse_address(text: str, queue_directory: str) -> str:
    """An address given on the command line (``127.0.0.1:10041``, ``inet:h:p``,
    ``unix:/path``) in Postfix form; raises EndpointSyntaxError."""
    return postfix_address(parse_endpoint(text), queue_directory)


def policy_endpoint(listen: Sequence[Endpoint], queue_directory: str) -> Endpoint:
    """The listen entry Postfix is pointed at: a unix socket inside the queue directory
    (no TCP on the way, reachable from a chrooted smtpd), else the first TCP one, else
    the first."""
    for endpoint in listen:
        if endpoint.is_unix and queue_relative(endpoint.path, queue_directory) != endpoint.path:
            return endpoint
    tcp = [e for e in listen if not e.is_unix]
    return (tcp or list(listen))[0]


def _seconds(ms: int) -> str:
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def transport_settings(t: str, delivery: PostfixDelivery) -> tuple[list[Setting], list[str]]:
    """main.cf parameters and notes for one transport's queue manager limits."""
    concurrency, initial_concurrency = delivery.concurrency, delivery.initial_concurrency
    rate_delay_ms, recipient_limit = delivery.rate_delay_ms, delivery.recipient_limit
    settings: list[Setting] = []
    notes: list[str] = []
    if concurrency is not None:
        settings.append(Setting(f"{t}_destination_concurrency_limit", str(concurrency)))
    if initial_concurrency is not None:
        settings.append(Setting(f"{t}_initial_destination_concurrency", str(initial_concurrency)))
        if concurrency is not None and initial_concurrency > concurrency:
            notes.append(f"initial_concurrency {initial_concurrency} is above the "
                         f"concurrency limit {concurrency}: the limit wins")
    if rate_delay_ms is not None:
        delay = rate_delay_ms
        if 0 < delay < 1000:
            notes.append(f"rate_delay {delay}ms: Postfix waits at least 1s between deliveries")
        settings.append(Setting(f"{t}_destination_rate_delay", _seconds(delay)))
        if delay > 0 and (concurrency or 0) > 1:
            notes.append(f"with a rate delay Postfix delivers to one destination one at a "
                         f"time: concurrency {concurrency} has no effect")
    if recipient_limit is not None:
        settings.append(Setting(f"{t}_destination_recipient_limit", str(recipient_limit)))
    return settings, notes


def lane_transport_settings(lane: Lane) -> tuple[tuple[Setting, ...], tuple[str, ...]]:
    """main.cf parameters and notes for one lane's transport."""
    settings, notes = transport_settings(lane.transport, lane.delivery)
    if lane.uses_default_transport and settings:
        notes.append("smtp is Postfix's default transport: these apply to all mail that has "
                     "no lane transport")
    return tuple(settings), tuple(notes)


def _regex_escape(text: str) -> str:
    return re.sub(r"([.\\^$|?*+()\[\]{}/])", r"\\\1", text)


def _lane_pattern(lane: Lane, header: str) -> str:
    name = re.sub(r"([.\\^$|?*+()\[\]{}])", r"\\\1", lane.name)
    return f"^{header}:[[:space:]]*{name}[[:space:]]*$"


def domain_regex(pattern: str) -> str:
    """A destination's domain pattern as a regexp on the full recipient address (Postfix
    looks regexp transport tables up with ``user@domain`` only, case-insensitively)."""
    if pattern.startswith("*."):
        return f"@[^@]+\\.{_regex_escape(pattern[2:])}$"
    return f"@{_regex_escape(pattern)}$"


def _covers(outer: str, inner: str) -> bool:
    """Every domain matched by pattern ``inner`` is matched by pattern ``outer``."""
    if not outer.startswith("*."):
        return outer == inner
    suffix = outer[1:]  # .example.com
    body = inner[2:] if inner.startswith("*.") else inner
    return body.endswith(suffix) or (inner.startswith("*.") and body == outer[2:])


def destination_transport_name(destination: Destination) -> str:
    return f"{DESTINATION_TRANSPORT_PREFIX}{destination.name}"


def needs_destination_transports(policy: Policy) -> bool:
    """Whether the policy has a destination that gets a Postfix transport."""
    return any(d.delivery.is_set and d.matcher.domains for d in policy.destinations)


def _nexthop(relayhost: str) -> str:
    """``relayhost`` as one next-hop field: its destinations joined by commas."""
    return ",".join(list_tokens(relayhost))


def destination_transports(
    policy: Policy, nexthop: str | None, lane_transports: Mapping[str, Lane],
) -> tuple[list[DestinationTransport], list[str]]:
    """A transport for each destination with delivery settings and domain patterns;
    notes for the rest (mx-only, names taken, patterns matched first elsewhere)."""
    out: list[DestinationTransport] = []
    notes: list[str] = []
    claimed: list[tuple[str, str]] = []  # (pattern, destination) without a transport
    for dest in policy.destinations:
        matcher = dest.matcher
        if not dest.delivery.is_set:
            claimed.extend((p, dest.name) for p in matcher.domains)
            continue
        if not matcher.domains:
            notes.append(f"destination {dest.name} is matched by mx patterns only: it gets "
                         "its budget but no Postfix transport (Postfix routes by recipient "
                         "domain, not by MX), so its delivery settings are not applied")
            continue
        transport = destination_transport_name(dest)
        if transport in lane_transports:
            notes.append(f"destination {dest.name}: transport {transport} is lane "
                         f"{lane_transports[transport].name}'s: rename one; no transport "
                         "for the destination")
            claimed.extend((p, dest.name) for p in matcher.domains)
            continue
        action = f"{transport}:{nexthop or ''}"
        rules: list[TransportRule] = []
        for pattern in matcher.domains:
            first = next(((p, n) for p, n in claimed if _covers(p, pattern)), None)
            if first is not None:
                notes.append(f"destination {dest.name}: {pattern} is matched first by "
                             f"destination {first[1]} ({first[0]}), which has no transport")
                continue
            excluded = tuple(domain_regex(p) for p, _ in claimed if _covers(pattern, p))
            rules.append(TransportRule(dest.name, pattern, domain_regex(pattern),
                                       action, excluded))
        if not rules:
            continue
        settings, dest_notes = transport_settings(transport, dest.delivery)
        if matcher.mx:
            dest_notes.append("domains found by its mx patterns get its budget but leave "
                              "through Postfix's default transport")
        out.append(DestinationTransport(dest, transport, tuple(settings), tuple(dest_notes),
                                        tuple(rules)))
    return out, notes


def _chroot_note(what: str, daemons: str, queue_dir: str, socket_name: str) -> str:
    inside = PurePosixPath(queue_dir) / "mqpolicy" / socket_name
    return (f"a unix-socket {what} outside {queue_dir} is unreachable from a chrooted "
            f"{daemons}: set the chroot column in master.cf to n, or listen inside it "
            f"(unix:{inside})")


def generate(policy: Policy, options: PostfixConfigOptions | None = None) -> PostfixConfig:
    """Every setting the policy needs, derived from the policy file and the options."""
    opts = options or PostfixConfigOptions()
    notes: list[str] = []
    queue_dir = opts.queue_directory
    if opts.policy_endpoint:
        address = parse_address(opts.policy_endpoint, queue_dir)
    else:
        address = postfix_address(policy_endpoint(policy.listen, queue_dir), queue_dir)
        if len(policy.listen) > 1:
            notes.append(f"the policy listens on {len(policy.listen)} endpoints; Postfix is "
                         f"pointed at {address} (choose another with --policy-endpoint)")
    if address.startswith("unix:/"):  # not named relative: outside the queue directory
        notes.append(_chroot_note("policy server", "smtpd", queue_dir, "policy.sock"))
    header_path = str(Path(opts.config_directory) / HEADER_CHECKS_FILE)
    check = f"check_policy_service {address}"
    lists = [
        ListEntry(
            "smtpd_recipient_restrictions", check,
            (
                "Per recipient (RCPT): admission, and lanes decided from the envelope.",
                "Have your own list? Add the entry to it BEFORE any permit (permit_mynetworks,",
                "permit_sasl_authenticated...): a permit ends the list and the policy never",
                "sees that mail. Relay control belongs in smtpd_relay_restrictions.",
            ),
        ),
        ListEntry(
            "smtpd_end_of_data_restrictions", check,
            ("Per message (END-OF-MESSAGE): recipient count and size known; budgets are",
             "spent here, once per message."),
        ),
    ]
    idle = max(1, int(policy.server.idle_timeout_s * 0.9))
    settings = [
        Setting("smtpd_policy_service_default_action", opts.default_action,
                ("When the policy server does not answer (Postfix's default: 451 4.3.5).",)),
        Setting("smtpd_policy_service_timeout", f"{opts.policy_timeout_s}s",
                (f"The server answers within store.timeout_ms ({policy.store.timeout_ms} ms) "
                 "plus little; Postfix's default wait is 100s.",)),
        Setting("smtpd_policy_service_request_limit", "0",
                ("Keep each connection for any number of requests (the server answers",
                 "them in order).")),
        Setting("smtpd_policy_service_max_idle", f"{idle}s",
                (f"Close an idle connection before the server does "
                 f"(server.idle_timeout {int(policy.server.idle_timeout_s)}s).",)),
    ]
    milter_address = (parse_address(opts.milter, queue_dir) if opts.milter
                      else "inet:127.0.0.1:10041")
    if opts.milter and milter_address.startswith("unix:/"):
        notes.append(_chroot_note("milter", "smtpd or cleanup", queue_dir, "milter.sock"))
    lists.append(ListEntry("smtpd_milters", milter_address, ("Mail received by smtpd.",)))
    lists.append(ListEntry(
        "non_smtpd_milters", milter_address,
        ("Locally submitted mail (sendmail, pickup): it never meets the policy server.",),
    ))
    milter_settings = (
        Setting("milter_default_action", "tempfail",
                ("A dead milter defers mail (451) rather than letting it through unchecked.",)),
    )
    header_setting = Setting(
        "milter_header_checks", f"regexp:{header_path}",
        (f"The milter's {opts.lane_header} header -> FILTER <transport>: (the header_checks block;",
         "harmless while no milter runs)."),
        GROUP_MILTER,
    )
    settings.append(header_setting)
    settings.append(Setting(
        "default_filter_nexthop", "$relayhost",
        ("FILTER <transport>: names no next hop: Postfix then uses this, else the",
         "recipient domain's MX -- bypassing relayhost, transport_maps and",
         "sender_dependent_relayhost_maps. $relayhost keeps lane mail on your relay",
         "host (and on MX delivery when relayhost is empty)."),
        GROUP_LANES,
    ))

    lane_settings: list[tuple[Lane, tuple[Setting, ...], tuple[str, ...]]] = []
    services: list[Service] = []
    rules: list[HeaderRule] = []
    seen: dict[str, Lane] = {}
    for lane in policy.lanes:
        lane_set, lane_notes = lane_transport_settings(lane)
        if lane.transport in seen:
            first = seen[lane.transport]
            lane_notes = (*lane_notes, f"shares transport {lane.transport} with lane "
                          f"{first.name}: its settings come from lane {first.name}")
            lane_set = ()
        if lane_set or lane_notes or not lane.uses_default_transport:
            lane_settings.append((lane, lane_set, lane_notes))
        if lane.uses_default_transport:
            continue
        rules.append(HeaderRule(lane.name, _lane_pattern(lane, opts.lane_header),
                                f"FILTER {lane.transport}:"))
        if lane.transport in seen:
            continue
        seen[lane.transport] = lane
        services.append(Service(
            lane.transport, "smtp", (("syslog_name", f"postfix/{lane.transport}"),),
            (f"lane {lane.name}",),
        ))

    transport_path = str(Path(opts.config_directory) / TRANSPORT_MAP_FILE)
    nexthop = None if opts.relayhost is None else _nexthop(opts.relayhost)
    dests, dest_notes = destination_transports(policy, nexthop, seen)
    notes.extend(dest_notes)
    if dests:
        lists.append(ListEntry(
            "transport_maps", f"regexp:{transport_path}",
            ("A destination's domains -> its transport (the transport block). Have your own",
             "transport_maps? Put this map FIRST in your list, e.g.",
             f"  transport_maps = regexp:{transport_path}, hash:/etc/postfix/transport",
             "(the first table with a match wins: your entries for these domains no longer",
             "apply). A lane's FILTER wins over transport_maps: mail in a lane with its own",
             "transport leaves through the lane's transport and next hop, not the",
             "destination's."),
            GROUP_DESTINATIONS, first=True,
        ))
        for dest in dests:
            services.append(Service(
                dest.transport, "smtp", (("syslog_name", f"postfix/{dest.transport}"),),
                (f"destination {dest.destination.name}",), role="destination",
            ))
        if nexthop is None:
            notes.append("relay host unknown: the transport map's entries name no next hop, "
                          "so Postfix sends destination mail to the recipient domain's MX, "
                          "bypassing any relayhost (pass --relayhost, or run where postconf "
                          "can read the Postfix configuration)")
        elif not nexthop:
            notes.append("no relayhost: destination transports deliver to each recipient "
                         "domain's MX, and Postfix applies their concurrency and rate delay "
                         "per recipient domain (its queues are per transport and next hop)")
        own = sorted({lane.transport for lane in seen.values()})
        if own:
            notes.append(f"mail in a lane with its own transport ({', '.join(own)}) leaves "
                         "through the lane's transport, not the destination's: FILTER "
                         "replaces the transport_maps result (transport and next hop) for "
                         "every recipient of the message")
    return PostfixConfig(
        policy_source=policy.source,
        policy_address=address,
        header_checks_path=header_path,
        lists=tuple(lists),
        settings=tuple(settings),
        milter_settings=milter_settings,
        milter_enabled=opts.milter is not None,
        lane_settings=tuple(lane_settings),
        services=tuple(services),
        header_rules=tuple(rules),
        notes=tuple(notes),
        lane_header=opts.lane_header,
        transport_map_path=transport_path,
        destination_transports=tuple(dests),
        transport_nexthop=nexthop,
        queue_directory=queue_dir,
    )


# ---------------------------------------------------------------- check: parsing postconf


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


# ---------------------------------------------------------------- check: comparing


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


_TOKEN = re.compile(r"\{[^}]*\}|[^\s,]+")
_VAR = re.compile(r"\$(\{(\w+)\}|\((\w+)\)|(\w+))")
_TIME = re.compile(r"^(\d+)(ms|s|m|h|d|w)?$")
_TIME_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def list_tokens(value: str) -> list[str]:
    """A Postfix list value as items; ``{ ... }`` groups stay whole."""
    return _TOKEN.findall(value)


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


def header_map_path(value: str) -> str | None:
    """``regexp:/path`` (or pcre:) → /path; None for other map types."""
    kind, sep, path = value.partition(":")
    if sep and kind in ("regexp", "pcre") and path.startswith("/"):
        return path
    return None


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


def transport_map_paths(value: str) -> list[str]:
    """The regexp/pcre files named in a ``transport_maps`` value."""
    return [p for p in (header_map_path(t) for t in list_tokens(value)) if p is not None]


# ---------------------------------------------------------------- I/O


def _postconf(postconf: str, config_dir: str, *args: str) -> str:
    """postconf's output for ``config_dir``; OSError with its message when it fails."""
    proc = subprocess.run(
        [postconf, "-c", config_dir, *args], capture_output=True, text=True,
        timeout=30, check=False, stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise OSError(f"postconf -c {config_dir} {' '.join(args)}: "
                      f"{proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def read_postfix(config_dir: str, names: Iterable[str] = (),
                 postconf: str = POSTCONF) -> PostfixState:
    """Run postconf on ``config_dir`` (``names``: settings whose effective value is
    wanted) and read the header-checks and transport maps it names."""

    def run(*args: str) -> str:
        return _postconf(postconf, config_dir, *args)

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


def read_parameters(config_dir: str, *names: str, postconf: str = POSTCONF) -> dict[str, str]:
    """Postfix's parameters ``names`` in ``config_dir``, expanded ('' when unset): one
    postconf run."""
    values = _postconf(postconf, config_dir, "-xh", *names).split("\n")
    return {name: value.strip() for name, value in zip(names, values, strict=False)}
