"""The policy as the engine and every part read it: frozen dataclasses, built once by
:mod:`mqpolicy.policy.loader` from the YAML file (or in code), never changed afterwards
(a reload builds a new one). Everything a decision needs is derived here at build time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from mqpolicy.policy.backoff import BackoffSettings
from mqpolicy.policy.conditions import SIGNAL_HEADERS, Predicate
from mqpolicy.policy.destinations import DestinationMatcher
from mqpolicy.policy.endpoints import Endpoint, MilterEndpoint
from mqpolicy.policy.keys import RECIPIENT_KEY_PARTS, KeyFunction, KeyPart, key_function
from mqpolicy.policy.rates import BUCKET_VERSION, DEFAULT_ONCE_TTL_MS, Rate, bucket_scale


class Count(Enum):
    MESSAGES = "messages"
    RECIPIENTS = "recipients"
    BYTES = "bytes"


class ActionKind(Enum):
    DEFER = "defer"
    HOLD = "hold"
    REJECT = "reject"
    DEMOTE = "demote"


class StoreErrorMode(Enum):
    ACCEPT = "accept"
    DEFER = "defer"


class Oversize(Enum):
    """What a blocking limit (defer, hold) does with a message that can never fit: its
    cost is larger than the limit's burst, so retrying cannot help."""

    REJECT = "reject"  # 550 5.7.1 message exceeds limit NAME: ...
    HOLD = "hold"  # the hold queue; released when the budget is full, spending the burst


@dataclass(frozen=True, slots=True)
class PostfixDelivery:
    """Postfix's queue manager settings for a lane's or a destination's transport
    (``postfix-config`` writes them to main.cf); None = not set."""

    concurrency: int | None = None
    initial_concurrency: int | None = None
    rate_delay_ms: int | None = None
    recipient_limit: int | None = None

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.concurrency, self.initial_concurrency,
                                           self.rate_delay_ms, self.recipient_limit))


NO_DELIVERY_SETTINGS = PostfixDelivery()


@dataclass(frozen=True, slots=True)
class Lane:
    name: str
    transport: str
    priority: int  # 0 = highest
    delivery: PostfixDelivery = NO_DELIVERY_SETTINGS
    hold: bool = False
    release_rate: Rate | None = None  # how fast the scheduler releases held mail; None: no cap
    release_burst: int | None = None

    @property
    def uses_default_transport(self) -> bool:
        return self.transport == "smtp"


@dataclass(frozen=True, slots=True)
class ClassifyRule:
    name: str
    when: Predicate
    lane: str
    needs_headers: bool = False  # decided by the milter only (see conditions.uses_headers)


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    rate: Rate
    burst: int
    key: tuple[KeyPart, ...]
    count: Count
    action: ActionKind
    demote_to: str | None
    message: str | None
    monitor: bool
    lanes: frozenset[str] | None
    when: Predicate | None
    exempt: Predicate | None
    on_store_error: StoreErrorMode
    destination: str | None = None  # the destination this limit budgets (backoff scales it)
    needs_headers: bool = False  # when/except look at headers: the milter's limit only
    oversize: Oversize = Oversize.REJECT  # a message whose cost exceeds the burst
    # Derived once at load (decisions read them on every request):
    recipient_keyed: bool = field(init=False)
    # recipient-keyed, and lane-scoped or looking at headers: spent at the end of the
    # message, per recipient, in the lane the message leaves in (not at RCPT)
    spent_at_end: bool = field(init=False)
    blocking: bool = field(init=False)  # a spent budget stops the decision (spends nothing)
    rate_text: str = field(init=False)
    refill: int = field(init=False)  # the bucket's tokens per ms and per unit (bucket_scale)
    unit: int = field(init=False)
    key_text: str = field(init=False)
    counted_one: str = field(init=False)  # how a decision that spends 1 says so: "1 messages"
    # The request's key value (None: a part is missing), compiled from ``key``.
    key_of: KeyFunction = field(init=False, compare=False, repr=False)
    # Where the limit's buckets live: its name plus rate, burst and the arithmetic's
    # version, so a reload that changes the rate starts fresh buckets instead of
    # misreading the old ones.
    bucket_prefix: str = field(init=False)

    def __post_init__(self) -> None:
        derived = {
            "recipient_keyed": any(part.name in RECIPIENT_KEY_PARTS for part in self.key),
            "spent_at_end": (any(part.name in RECIPIENT_KEY_PARTS for part in self.key)
                             and self.destination is None
                             and (self.lanes is not None or self.needs_headers)),
            "blocking": not self.monitor and self.action is not ActionKind.DEMOTE,
            "rate_text": str(self.rate),
            **dict(zip(("refill", "unit"),
                       bucket_scale(self.rate.count, self.rate.period_ms, self.burst),
                       strict=True)),
            "key_text": "+".join(str(p) for p in self.key),
            "counted_one": f"1 {self.count.value}",
            "key_of": key_function(self.key),
            "bucket_prefix": (
                f"rl:{self.name}:{self.rate.count}/{self.rate.period_ms}/{self.burst}/"
                f"{BUCKET_VERSION}:"
            ),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True, slots=True)
class Messages:
    defer: str = "Rate limit {limit} reached for {key}, try again in {retry_after}s"
    hold: str = "held by mqpolicy limit {limit}"
    reject: str = "Quota {limit} exceeded for {key}"
    store_error: str = "Policy store unavailable, try again later"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    idle_timeout_s: float = 300.0
    max_request_size: int = 65536
    max_connections: int = 4096
    drain_timeout_s: float = 10.0
    # Several `mqpolicy serve` processes on the same TCP port (SO_REUSEPORT), sharing a
    # Redis store: the kernel spreads Postfix's connections over them (one core each).
    reuse_port: bool = False


@dataclass(frozen=True, slots=True)
class StoreSettings:
    url: str = "memory://"
    timeout_ms: int = 50
    on_store_error: StoreErrorMode = StoreErrorMode.ACCEPT
    key_prefix: str = "mqpolicy:"
    max_entries: int = 1_000_000  # memory://: buckets and once keys (store/memory.py)
    once_ttl_ms: int = DEFAULT_ONCE_TTL_MS  # how long a message is remembered as counted

    @property
    def in_process(self) -> bool:
        """``memory://``: the budgets and hold records live inside the serving process."""
        return self.url.strip().lower().startswith("memory:")


class ErrorAction(Enum):
    """What the milter answers when no verdict comes in time."""

    TEMPFAIL = "tempfail"
    ACCEPT = "accept"


class RcptLimits(Enum):
    """Who decides RCPT for SMTP mail: the milter, or Postfix's policy server."""

    MILTER = "milter"
    POLICY_SERVER = "policy_server"


DEFAULT_TIMEOUT_MARGIN_MS = 50
DEFAULT_LISTEN_MODE = 0o660  # unix sockets: owner and group (Postfix in the group)
DEFAULT_MILTER_LISTEN = MilterEndpoint("unix", path="/run/mqpolicy/milter.sock")


@dataclass(frozen=True, slots=True)
class MilterSettings:
    """The ``milter:`` section of the policy file."""

    listen: MilterEndpoint = DEFAULT_MILTER_LISTEN
    listen_mode: int = DEFAULT_LISTEN_MODE
    on_error: ErrorAction = ErrorAction.TEMPFAIL
    lane_header: str = "X-MQ-Lane"
    timeout_ms: int | None = None  # None: the store deadline + DEFAULT_TIMEOUT_MARGIN_MS
    rcpt_limits: RcptLimits = RcptLimits.MILTER
    mta_timeout_s: int = 300  # libmilter's read/write timeout towards the MTA
    drain_timeout_s: float = 10.0
    name: str = "mqpolicy"

    def wait_s(self, store_timeout_ms: int) -> float:
        """How long a callback waits for a decision."""
        ms = self.timeout_ms
        if ms is None:
            ms = store_timeout_ms + DEFAULT_TIMEOUT_MARGIN_MS
        return ms / 1000


class MtaKind(Enum):
    POSTFIX = "postfix"
    SENDMAIL = "sendmail"


@dataclass(frozen=True, slots=True)
class ScheduleSettings:
    """Delivery at a time the message asks for (``Deferred-Delivery:``,
    ``X-MQ-Deliver-After:``), honoured only for mail that ``allow`` matches."""

    # None: nobody may schedule (the headers are stripped). A compiled condition is a new
    # function on every load: two loads of one file compare by ``allow_text`` instead.
    allow: Predicate | None = field(default=None, compare=False)
    max_delay_ms: int = 7 * 86_400_000
    allow_text: str = ""  # the condition as written, keys sorted ("" without one)


@dataclass(frozen=True, slots=True)
class LoadThresholds:
    """Queue sizes above which the lowest lanes wait (0 = that queue is not watched)."""

    active: int = 0
    incoming: int = 0
    deferred: int = 0
    hold_lanes: int = 1  # how many of the lowest lanes wait when a threshold is crossed


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """The hold-queue scheduler (``mqpolicy scheduler`` or inside ``serve``)."""

    mta: MtaKind = MtaKind.POSTFIX
    # Which MTA's hold queue the records belong to: MTAs that share one Redis each need
    # their own name (their budgets stay shared).
    instance: str = "default"
    postfix_config_dir: str = "/etc/postfix"
    sendmail_cf: str = "/etc/mail/sendmail.cf"
    interval_ms: int = 5_000
    max_releases_per_pass: int = 500
    lock_ttl_ms: int = 30_000
    schedule: ScheduleSettings = ScheduleSettings()
    load: LoadThresholds = LoadThresholds()
    # ``mqpolicy release-agent``'s socket: set, the scheduler asks that root process to
    # release (and, for Sendmail, to list); unset, it runs the MTA's commands itself.
    release_agent: Endpoint | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    """A destination: recipient domains (exact, ``*.suffix``) and/or an MX group
    (every domain whose MX hosts match), with its own budget. Its limit is in
    ``Policy.limits`` (named ``destination:<name>``); backoff scales that budget."""

    name: str
    matcher: DestinationMatcher
    # for the destination's own transport, applied to its ``domains`` only: Postfix routes
    # by domain, not MX
    delivery: PostfixDelivery = NO_DELIVERY_SETTINGS


@dataclass(frozen=True, slots=True)
class DnsSettings:
    nameservers: tuple[tuple[str, int], ...] | None = None  # None: /etc/resolv.conf
    timeout_ms: int = 200


@dataclass(frozen=True, slots=True)
class FeedbackRule:
    """``{match: REGEX, action: pause, for: 2h, destination: NAME}``: a delivery result
    (deferred or bounced) whose DSN or reply matches pauses its destination (only
    ``destination``, or every configured one) for ``for_ms``."""

    match: re.Pattern[str]  # case-insensitive
    for_ms: int
    destination: str | None = None
    action: str = "pause"


@dataclass(frozen=True, slots=True)
class FeedbackSettings:
    """``mqpolicy feedback``: follow the MTA's delivery log and back destinations off."""

    log: str = "/var/log/mail.log"
    state_file: str | None = None
    poll_interval_ms: int = 1000
    slow_down_patterns: tuple[str, ...] = ()
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    rules: tuple[FeedbackRule, ...] = ()


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Prometheus metrics over HTTP; ``listen`` None = off."""

    listen: Endpoint | None = None


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The admin socket of ``serve`` (``queue``, ``counters`` and ``explain`` reach a
    memory:// server through it): a unix socket only, whose file mode decides who may
    read and reset budgets."""

    listen: Endpoint


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: str = "kv"
    level: str = "info"
    # "notable": decisions that refuse, hold, find a limit spent or end a message are
    # logged at info, the others at debug; "all": every decision at info, with every fact
    # a policy can read (what ``mqpolicy replay`` reads back)
    decisions: str = "notable"


_DEFAULT_LANES = (Lane(name="normal", transport="smtp", priority=0),)


@dataclass(frozen=True, slots=True)
class Policy:
    source: str = "<default>"
    listen: tuple[Endpoint, ...] = (Endpoint(host="127.0.0.1", port=10040),)
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    admin: AdminSettings | None = None  # None: no admin socket
    milter: MilterSettings | None = None  # None: no milter section, no milter
    scheduler: SchedulerSettings | None = None  # None: no scheduler section
    destinations: tuple[Destination, ...] = ()
    dns: DnsSettings = DnsSettings()
    feedback: FeedbackSettings | None = None  # None: no feedback section
    lanes: tuple[Lane, ...] = _DEFAULT_LANES
    default_lane: str = "normal"
    classify: tuple[ClassifyRule, ...] = ()
    limits: tuple[Limit, ...] = ()
    messages: Messages = Messages()
    # The condition keys of every rule, limit and schedule (None: not known, e.g. a Policy
    # built in code: then it may use anything).
    condition_keys: frozenset[str] | None = None
    # The headers (lower case) those conditions read.
    header_names: frozenset[str] = frozenset()
    # Derived: lanes and limits by name (the engine, the scheduler), and the destination
    # budgets found by the request's destination name in one lookup.
    lanes_by_name: Mapping[str, Lane] = field(init=False)
    limits_by_name: Mapping[str, Limit] = field(init=False)
    destination_limits: Mapping[str, Limit] = field(init=False)
    # (lane name, at RCPT) -> the general limits that may apply there: in that lane's scope,
    # and recipient-keyed ones only at RCPT. What is left to test per request is dynamic.
    limits_by_stage: Mapping[tuple[str, bool], tuple[Limit, ...]] = field(init=False)
    # Whether any decision looks at the message's size (a `size` condition, a bytes budget)
    # or at the HELO name (a condition or a key): the milter skips what none does.
    uses_size: bool = field(init=False)
    uses_helo: bool = field(init=False)
    # Wiring B (both policy hooks and the milter, the milter spending at its end of
    # message): the policy server's END-OF-MESSAGE decision only checks.
    end_checks_only: bool = field(init=False)
    # Some recipient-keyed limit is spent at the end of the message (Limit.spent_at_end):
    # the policy server then remembers a message's recipients until its END-OF-MESSAGE.
    recipients_at_end: bool = field(init=False)
    # Some limit demotes: an end-of-message plan may add the target lane's limits:
    # (lane, demote target) -> the end-of-message limits scoped to the target, not the lane.
    demotes: bool = field(init=False)
    demotion_limits: Mapping[tuple[str, str], tuple[Limit, ...]] = field(init=False)
    # log.decisions is "all": the headers (lower case) a decision's line keeps, those the
    # conditions read and those of bulk_signals and priority; None: lines keep no facts
    logged_headers: frozenset[str] | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lanes_by_name", {lane.name: lane for lane in self.lanes})
        object.__setattr__(self, "limits_by_name", {x.name: x for x in self.limits})
        general = tuple(x for x in self.limits if x.destination is None)
        object.__setattr__(self, "destination_limits",
                           {x.destination: x for x in self.limits if x.destination is not None})
        object.__setattr__(self, "limits_by_stage", {
            (lane.name, at_rcpt): tuple(
                x for x in general
                if (at_rcpt or not x.recipient_keyed or x.spent_at_end)
                and (x.lanes is None or lane.name in x.lanes))
            for lane in self.lanes for at_rcpt in (True, False)
        })
        keys = self.condition_keys
        object.__setattr__(self, "uses_size", keys is None or "size" in keys or any(
            x.count is Count.BYTES for x in self.limits))
        object.__setattr__(self, "recipients_at_end", any(x.spent_at_end for x in self.limits))
        object.__setattr__(self, "demotes", any(x.action is ActionKind.DEMOTE
                                                for x in self.limits))
        by_stage = self.limits_by_stage
        object.__setattr__(self, "demotion_limits", {
            (lane.name, x.demote_to): tuple(
                y for y in by_stage[x.demote_to, False]
                if y.lanes is not None and lane.name not in y.lanes)
            for lane in self.lanes for x in self.limits
            if x.demote_to is not None and x.demote_to in self.lanes_by_name})
        object.__setattr__(self, "end_checks_only", self.milter is not None
                           and self.milter.rcpt_limits is RcptLimits.POLICY_SERVER)
        object.__setattr__(self, "uses_helo", keys is None or "helo_name" in keys or any(
            part.name == "helo_name" for x in self.limits for part in x.key))
        object.__setattr__(self, "logged_headers", SIGNAL_HEADERS | self.header_names
                           if self.log.decisions == "all" else None)

    def lane(self, name: str) -> Lane:
        return self.lanes_by_name[name]
