"""``mqpolicy postfix-config``: the Postfix settings a policy needs, derived from it.

Pure: :func:`generate` turns a :class:`~mqpolicy.policy.model.Policy` into a
:class:`~mqpolicy.postfix.settings.PostfixConfig` (the settings and their commented text).
``--check`` compares it with an installed Postfix (:mod:`mqpolicy.postfix.config_check`),
read by running ``postconf`` (:mod:`mqpolicy.postfix.postconf`); the command is
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mqpolicy.policy.endpoints import Endpoint, parse_endpoint
from mqpolicy.policy.model import Destination, Lane, Policy, PostfixDelivery
from mqpolicy.postfix.installed_config import list_tokens
from mqpolicy.postfix.settings import (
    DEFAULT_POSTFIX_DIR,
    DEFAULT_QUEUE_DIR,
    GROUP_DESTINATIONS,
    GROUP_LANES,
    GROUP_MILTER,
    HEADER_CHECKS_FILE,
    LANE_HEADER,
    TRANSPORT_MAP_FILE,
    DestinationTransport,
    HeaderRule,
    ListEntry,
    PostfixConfig,
    Service,
    Setting,
    TransportRule,
)

DESTINATION_TRANSPORT_PREFIX = "mq-dest-"
DEFAULT_POLICY_ACTION = "451 4.3.5 Policy service unavailable, try again later"


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
