"""Reading the YAML policy: loaded with ``yaml.safe_load`` semantics, validated, built into
the frozen :class:`~mqpolicy.policy.model.Policy`.

Every problem is collected with its file and line; :class:`ConfigError` lists them all.
Rates, CIDRs, regexes and message templates are compiled here, once, so that no
decision repeats work that the load could do.

``store.url`` is parsed by the store's own parser, which the caller passes in
(:func:`mqpolicy.store.urls.check_store_url`): the policy language knows no store family,
and what serve would refuse to open, ``check`` refuses with the line.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from mqpolicy.policy.backoff import BackoffSettings
from mqpolicy.policy.conditions import (
    ConditionError,
    Predicate,
    compile_condition,
    condition_keys,
    uses_headers,
)
from mqpolicy.policy.destinations import DestinationMatcher
from mqpolicy.policy.endpoints import (
    Endpoint,
    EndpointSyntaxError,
    parse_endpoint,
    parse_milter_endpoint,
)
from mqpolicy.policy.keys import KEY_PARTS, KeyPart
from mqpolicy.policy.model import (
    DEFAULT_LISTEN_MODE,
    ActionKind,
    AdminSettings,
    ClassifyRule,
    Count,
    Destination,
    DnsSettings,
    ErrorAction,
    FeedbackSettings,
    Lane,
    Limit,
    LoadThresholds,
    LogSettings,
    Messages,
    MetricsSettings,
    MilterSettings,
    MtaKind,
    Policy,
    PostfixDelivery,
    RcptLimits,
    SchedulerSettings,
    ScheduleSettings,
    ServerSettings,
    StoreErrorMode,
    StoreSettings,
)
from mqpolicy.policy.rates import (
    Rate,
    RateSyntaxError,
    exactness_problem,
    parse_duration_ms,
    parse_rate,
    parse_size,
)

# ---------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    source: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The policy file is not valid. ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


# ---------------------------------------------------------------- YAML with line numbers


class _LineMap(dict[Any, Any]):
    line: int = 0
    key_lines: dict[Any, int]


class _LineList(list[Any]):
    line: int = 0
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key and list item."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineMap:
    result = _LineMap()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result.key_lines:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _LineList:
    result = _LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _line_of(container: Any, key: Any = None) -> int:
    if isinstance(container, _LineMap):
        if key is not None and key in container.key_lines:
            return container.key_lines[key]
        return container.line
    if isinstance(container, _LineList):
        if isinstance(key, int) and 0 <= key < len(container.item_lines):
            return container.item_lines[key]
        return container.line
    return 0


# ---------------------------------------------------------------- the loader

TEMPLATE_FIELDS = frozenset({"limit", "key", "rate", "retry_after", "remaining", "lane"})


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TRANSPORT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


class _Reader:
    """Walks the loaded YAML, converting values and collecting issues with lines."""

    def __init__(self, source: str, check_store_url: StoreUrlCheck | None) -> None:
        self.source = source
        self.check_store_url = check_store_url
        self.issues: list[ConfigIssue] = []
        self.condition_keys: frozenset[str] = frozenset()  # of every condition read

    def error(self, container: Any, key: Any, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.source, _line_of(container, key), path, message))

    def mapping(
        self, container: Any, key: Any, path: str, allowed: set[str] | frozenset[str]
    ) -> Mapping[str, Any] | None:
        value = container[key] if key is not None else container
        if not isinstance(value, Mapping):
            self.error(container, key, path, f"expected a mapping, got {_kind(value)}")
            return None
        for k in value:
            if k not in allowed:
                hint = _suggest(str(k), allowed)
                self.error(
                    value, k, f"{path}.{k}" if path else str(k), f"unknown key{hint}"
                )
        return value

    def convert(
        self, container: Mapping[str, Any], key: str, path: str, fn: Callable[[Any], Any]
    ) -> Any:
        try:
            return fn(container[key])
        except (RateSyntaxError, EndpointSyntaxError, ValueError, TypeError) as exc:
            self.error(container, key, path, str(exc))
            return None

    def strings(self, m: Mapping[str, Any], key: str, section: str,
                expected: str) -> tuple[str, ...] | None:
        """``m[key]``, a string or a list of strings, as a tuple; None (an error saying
        ``expected``) when it is something else."""
        raw = m[key]
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            self.error(m, key, f"{section}.{key}", expected)
            return None
        return tuple(items)

    def optional(self, m: Mapping[str, Any], key: str, section: str,
                 fn: Callable[[Any], Any]) -> Any:
        """``fn`` of ``m[key]`` (an error at ``section.key``, at ``key`` for a top-level
        one (section ""), when it fails); None when the key is absent or wrong."""
        if key not in m:
            return None
        return self.convert(m, key, f"{section}.{key}" if section else key, fn)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _suggest(word: str, allowed: set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(word, sorted(allowed), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (allowed: {', '.join(sorted(allowed))})"


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {_kind(value)}")
    return value


def _template(value: Any) -> str:
    text = _string(value)
    if "\n" in text or "\r" in text:
        raise ValueError("a reply text must be one line")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise ValueError(f"bad template {text!r}: {exc}") from None
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(
            f"unknown placeholder(s) {', '.join('{' + f + '}' for f in sorted(unknown))} "
            f"(use {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS))})"
        )
    return text


def _store_error_mode(value: Any) -> StoreErrorMode:
    mode: StoreErrorMode = _enum(StoreErrorMode, value)
    return mode


def _mode(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)  # YAML 0660 without quotes is octal already: 432
        if value > 0o777:
            return int(text, 8)
        return value
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    raise ValueError(f"expected a file mode like \"0660\", got {value!r}")


def _key_part(text: Any) -> KeyPart:
    if not isinstance(text, str):
        raise ValueError(f"expected a key name, got {_kind(text)}")
    name, _, rest = text.partition("/")
    if name not in KEY_PARTS:
        raise ValueError(f"unknown key {name!r}{_suggest(name, KEY_PARTS)}")
    if not rest:
        return KeyPart(name)
    if name != "client_network":
        raise ValueError(f"only client_network takes a prefix length: {text!r}")
    parts = rest.split("/")
    try:
        v4 = int(parts[0])
        v6 = int(parts[1]) if len(parts) > 1 else 64
    except ValueError:
        raise ValueError(f"bad prefix length in {text!r}") from None
    if len(parts) > 2 or not 1 <= v4 <= 32 or not 1 <= v6 <= 128:
        raise ValueError(f"bad prefix length in {text!r} (IPv4 1-32, IPv6 1-128)")
    return KeyPart(name, v4, v6)


_TOP_KEYS = {
    "listen",
    "listen_mode",
    "server",
    "store",
    "log",
    "metrics",
    "admin",
    "milter",
    "scheduler",
    "destinations",
    "dns",
    "feedback",
    "lanes",
    "default_lane",
    "classify",
    "limits",
    "messages",
}
_LANE_KEYS = {
    "name",
    "transport",
    "concurrency",
    "initial_concurrency",
    "rate_delay",
    "recipient_limit",
    "hold",
    "release_rate",
    "release_burst",
}
_LIMIT_KEYS = {
    "name",
    "rate",
    "burst",
    "key",
    "count",
    "action",
    "message",
    "monitor",
    "lanes",
    "when",
    "except",
    "on_store_error",
}


StoreUrlCheck = Callable[[str], object]
"""A store family's parser of ``store.url`` as its store opens it: ValueError saying what
to write instead (:func:`mqpolicy.store.urls.check_store_url`)."""


def load_policy(path: str | Path, check_store_url: StoreUrlCheck) -> Policy:
    """Read and validate a policy file; raise :class:`ConfigError` listing every problem,
    ``store.url`` parsed by ``check_store_url``."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(source, 0, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(source, 0, "", "not UTF-8 text")]) from None
    return parse_policy(text, source, check_store_url)


def parse_policy(text: str, source: str = "<string>",
                 check_store_url: StoreUrlCheck | None = None) -> Policy:
    """A policy from its YAML text (``source`` names it in the issues). Without
    ``check_store_url``, ``store.url`` is taken as written: for policies made in code, whose
    store is opened by the caller."""
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError([ConfigIssue(source, line, "", f"YAML syntax: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(source, 0, "", f"YAML: {exc}")]) from None
    if data is None:
        data = _LineMap()
        data.key_lines = {}
    reader = _Reader(source, check_store_url)
    policy = _read_policy(reader, data)
    if reader.issues or policy is None:
        raise ConfigError(reader.issues)
    return policy


def _read_policy(r: _Reader, data: Any) -> Policy | None:
    top = r.mapping(data, None, "", _TOP_KEYS)
    if top is None:
        return None
    defaults = Policy()

    mode = r.optional(top, "listen_mode", "", _mode)
    listen_mode = DEFAULT_LISTEN_MODE if mode is None else mode  # "0000" is a mode too
    listen = defaults.listen
    if "listen" in top:
        listen = tuple(_read_listen(r, top, listen_mode))

    server = _read_server(r, top) if "server" in top else defaults.server
    store = _read_store(r, top) if "store" in top else defaults.store
    if server.reuse_port and store.url.startswith("memory:"):
        r.error(top["server"], "reuse_port", "server.reuse_port",
                "several processes need a shared store (redis://...): with memory:// each "
                "would count its own budgets")
    log = _read_log(r, top) if "log" in top else defaults.log
    metrics = _read_metrics(r, top) if "metrics" in top else defaults.metrics
    admin = _read_admin(r, top) if "admin" in top else None
    if admin is not None and server.reuse_port:
        r.error(top["admin"], "listen", "admin.listen",
                "several processes (server.reuse_port) cannot share one admin socket; they "
                "share a redis:// store, which the commands read themselves")
    messages = _read_messages(r, top) if "messages" in top else defaults.messages

    lanes = tuple(_read_lanes(r, top)) if "lanes" in top else defaults.lanes
    lane_names = {lane.name for lane in lanes}
    default_lane = defaults.default_lane
    if "default_lane" in top:
        default_lane = top["default_lane"]
        if default_lane not in lane_names:
            r.error(top, "default_lane", "default_lane", _unknown_lane(default_lane, lane_names))
    elif len(lanes) == 1:
        default_lane = lanes[0].name
    elif lanes and default_lane not in lane_names:
        r.error(top, "lanes", "default_lane", "set default_lane: the lane of unmatched mail")

    milter = _read_milter(r, top, store) if "milter" in top else None
    scheduler = _read_scheduler(r, top) if "scheduler" in top else None
    classify = tuple(_read_classify(r, top, lane_names)) if "classify" in top else ()
    limits = tuple(_read_limits(r, top, lane_names, store)) if "limits" in top else ()
    destinations: tuple[Destination, ...] = ()
    if "destinations" in top:
        pairs = list(_read_destinations(r, top, lane_names, store, {x.name for x in limits}))
        destinations = tuple(d for d, _ in pairs)
        limits = limits + tuple(limit for _, limit in pairs)
    dns_settings = _read_dns(r, top) if "dns" in top else defaults.dns
    feedback = _read_feedback(r, top) if "feedback" in top else None
    return Policy(
        source=r.source,
        listen=listen,
        server=server,
        store=store,
        log=log,
        metrics=metrics,
        admin=admin,
        milter=milter,
        scheduler=scheduler,
        destinations=destinations,
        dns=dns_settings,
        feedback=feedback,
        lanes=lanes,
        default_lane=default_lane,
        classify=classify,
        limits=limits,
        messages=messages,
        condition_keys=r.condition_keys,
    )


def _unknown_lane(name: Any, lane_names: set[str]) -> str:
    return f"unknown lane {name!r} (lanes: {', '.join(sorted(lane_names))})"


def _items(r: _Reader, top: Mapping[str, Any], key: str,
           by_name: bool = False) -> Iterator[tuple[int, Any, str]]:
    """(index, the list, path) of each item of ``top[key]``; with ``by_name`` an item that
    has a name is called by it in messages (``limits[per-sender]``)."""
    value = top[key]
    if not isinstance(value, list):
        r.error(top, key, key, f"expected a list, got {_kind(value)}")
        return
    for i, item in enumerate(value):
        named = by_name and isinstance(item, Mapping) and isinstance(item.get("name"), str)
        yield i, value, f"{key}[{item['name']}]" if named else f"{key}[{i}]"


def _read_listen(r: _Reader, top: Mapping[str, Any], mode: int) -> Iterator[Endpoint]:
    value = top["listen"]
    if isinstance(value, str):
        ep = r.convert(top, "listen", "listen", lambda v: parse_endpoint(v, mode=mode))
        if ep is not None:
            yield ep
        return
    for i, container, path in _items(r, top, "listen"):
        item = container[i]
        if not isinstance(item, str):
            r.error(container, i, path, f"expected HOST:PORT or unix:/path, got {_kind(item)}")
            continue
        try:
            yield parse_endpoint(item, mode=mode)
        except EndpointSyntaxError as exc:
            r.error(container, i, path, str(exc))


def _read_server(r: _Reader, top: Mapping[str, Any]) -> ServerSettings:
    m = r.mapping(
        top,
        "server",
        "server",
        {"idle_timeout", "max_request_size", "max_connections", "drain_timeout", "reuse_port"},
    )
    d = ServerSettings()
    if m is None:
        return d
    idle = r.optional(m, "idle_timeout", "server", _positive_duration)
    size = r.optional(m, "max_request_size", "server", parse_size)
    conns = r.optional(m, "max_connections", "server", _positive_int)
    drain = r.optional(m, "drain_timeout", "server", parse_duration_ms)
    if size is not None and size < 1024:
        r.error(m, "max_request_size", "server.max_request_size", "must be at least 1KiB")
    reuse_port = bool(r.optional(m, "reuse_port", "server", _bool))
    return ServerSettings(
        reuse_port=reuse_port,
        idle_timeout_s=idle / 1000 if idle is not None else d.idle_timeout_s,
        max_request_size=size or d.max_request_size,
        max_connections=conns or d.max_connections,
        drain_timeout_s=drain / 1000 if drain is not None else d.drain_timeout_s,
    )


def _read_store(r: _Reader, top: Mapping[str, Any]) -> StoreSettings:
    m = r.mapping(top, "store", "store", {"url", "timeout_ms", "on_store_error", "key_prefix",
                                          "max_entries", "once_ttl"})
    d = StoreSettings()
    if m is None:
        return d
    return StoreSettings(
        url=r.optional(m, "url", "store", lambda value: _store_url(r, value)) or d.url,
        timeout_ms=r.optional(m, "timeout_ms", "store", _positive_int) or d.timeout_ms,
        on_store_error=(r.optional(m, "on_store_error", "store", _store_error_mode)
                        or d.on_store_error),
        key_prefix=r.optional(m, "key_prefix", "store", _string) or d.key_prefix,
        max_entries=r.optional(m, "max_entries", "store", _positive_int) or d.max_entries,
        once_ttl_ms=r.optional(m, "once_ttl", "store", _positive_duration) or d.once_ttl_ms,
    )


def _store_url(r: _Reader, value: Any) -> str:
    text = _string(value)
    if r.check_store_url is not None:
        r.check_store_url(text)  # the store's own parser: what serve would refuse, check refuses
    return text


def _read_log(r: _Reader, top: Mapping[str, Any]) -> LogSettings:
    m = r.mapping(top, "log", "log", {"format", "level"})
    d = LogSettings()
    if m is None:
        return d
    fmt, level = d.format, d.level
    if "format" in m:
        if m["format"] in ("kv", "json"):
            fmt = m["format"]
        else:
            r.error(m, "format", "log.format", f"expected kv or json, got {m['format']!r}")
    if "level" in m:
        lv = str(m["level"]).lower()
        if lv in ("debug", "info", "warning", "error"):
            level = lv
        else:
            r.error(m, "level", "log.level", "expected debug, info, warning or error")
    return LogSettings(format=fmt, level=level)


def _read_metrics(r: _Reader, top: Mapping[str, Any]) -> MetricsSettings:
    m = r.mapping(top, "metrics", "metrics", {"listen"})
    if m is None or "listen" not in m:
        return MetricsSettings()
    endpoint = r.convert(m, "listen", "metrics.listen", parse_endpoint)
    if endpoint is not None and endpoint.is_unix:
        r.error(m, "listen", "metrics.listen", "metrics listen on HOST:PORT (HTTP)")
        return MetricsSettings()
    return MetricsSettings(listen=endpoint)


_UNIX_PATH_MAX = 107  # bytes of a unix socket path (sun_path less its NUL)


def _read_admin(r: _Reader, top: Mapping[str, Any]) -> AdminSettings | None:
    m = r.mapping(top, "admin", "admin", {"listen", "mode"})
    if m is None:
        return None
    if "listen" not in m:
        r.error(top, "admin", "admin.listen", "required: the admin socket, unix:/path")
        return None
    mode = r.optional(m, "mode", "admin", _mode)
    endpoint = r.convert(m, "listen", "admin.listen", lambda v: parse_endpoint(
        _string(v), mode=DEFAULT_LISTEN_MODE if mode is None else mode))
    if endpoint is None:
        return None
    if not endpoint.is_unix:
        r.error(m, "listen", "admin.listen",
                "the admin socket is a unix socket only (unix:/path): its file mode decides "
                "who may read and reset budgets, which TCP could not")
        return None
    if len(endpoint.path.encode()) > _UNIX_PATH_MAX:
        r.error(m, "listen", "admin.listen", f"unix socket path too long: {endpoint.path!r}")
        return None
    return AdminSettings(listen=endpoint)


_MILTER_KEYS = frozenset(
    {"listen", "listen_mode", "on_error", "lane_header", "timeout", "rcpt_limits",
     "mta_timeout", "drain_timeout"}
)
_HEADER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _read_milter(r: _Reader, top: Mapping[str, Any], store: StoreSettings) -> MilterSettings:
    d = MilterSettings()
    m = r.mapping(top, "milter", "milter", _MILTER_KEYS)
    if m is None:
        return d

    def opt(key: str, fn: Callable[[Any], Any]) -> Any:
        return r.optional(m, key, "milter", fn)

    listen = opt("listen", lambda v: parse_milter_endpoint(_string(v)))
    mode = opt("listen_mode", _mode)
    on_error = opt("on_error", lambda v: _enum(ErrorAction, v))
    header = opt("lane_header", _header_name)
    timeout = opt("timeout", _positive_duration)
    rcpt = opt("rcpt_limits", lambda v: _enum(RcptLimits, v))
    mta_timeout = opt("mta_timeout", _positive_duration)
    drain = opt("drain_timeout", parse_duration_ms)
    if timeout is not None and timeout <= store.timeout_ms:
        r.error(m, "timeout", "milter.timeout",
                f"must be above store.timeout_ms ({store.timeout_ms} ms): the store "
                "deadline applies on_store_error, this one on_error")
    return MilterSettings(
        listen=listen or d.listen,
        listen_mode=d.listen_mode if mode is None else mode,
        on_error=on_error or d.on_error,
        lane_header=header or d.lane_header,
        timeout_ms=timeout,
        rcpt_limits=rcpt or d.rcpt_limits,
        mta_timeout_s=max(1, -(-mta_timeout // 1000)) if mta_timeout else d.mta_timeout_s,
        drain_timeout_s=drain / 1000 if drain is not None else d.drain_timeout_s,
    )


_SCHEDULER_KEYS = frozenset(
    {"mta", "instance", "postfix_config_dir", "sendmail_cf", "interval",
     "max_releases_per_pass", "lock_ttl", "schedule", "load", "release_agent"}
)


def _read_scheduler(r: _Reader, top: Mapping[str, Any]) -> SchedulerSettings:
    d = SchedulerSettings()
    m = r.mapping(top, "scheduler", "scheduler", _SCHEDULER_KEYS)
    if m is None:
        return d

    def opt(key: str, fn: Callable[[Any], Any]) -> Any:
        return r.optional(m, key, "scheduler", fn)

    mta = opt("mta", lambda v: _enum(MtaKind, v))
    instance = opt("instance", _instance_name)
    config_dir = opt("postfix_config_dir", _absolute_path)
    sendmail_cf = opt("sendmail_cf", _absolute_path)
    interval = opt("interval", _positive_duration)
    batch = opt("max_releases_per_pass", _positive_int)
    lock_ttl = opt("lock_ttl", _positive_duration)
    agent = opt("release_agent", _release_agent_endpoint)
    if lock_ttl is not None and lock_ttl <= (interval or d.interval_ms):
        r.error(m, "lock_ttl", "scheduler.lock_ttl", "must be longer than scheduler.interval")

    schedule = d.schedule
    if "schedule" in m:
        s = r.mapping(m, "schedule", "scheduler.schedule", {"allow", "max_delay"})
        if s is not None:
            allow = _condition(r, s, "allow", "scheduler.schedule") if "allow" in s else None
            max_delay = r.optional(s, "max_delay", "scheduler.schedule", _positive_duration)
            schedule = ScheduleSettings(allow=allow,
                                        max_delay_ms=max_delay or d.schedule.max_delay_ms,
                                        allow_text=_as_written(s["allow"]) if allow else "")
    load = d.load
    if "load" in m:
        keys = {"active", "incoming", "deferred", "hold_lanes"}
        lm = r.mapping(m, "load", "scheduler.load", keys)
        if lm is not None:
            values = {k: r.convert(lm, k, f"scheduler.load.{k}", _positive_int)
                      for k in keys if k in lm}
            load = LoadThresholds(**{k: v for k, v in values.items() if v is not None})
    return SchedulerSettings(
        mta=mta or d.mta,
        instance=instance or d.instance,
        postfix_config_dir=config_dir or d.postfix_config_dir,
        sendmail_cf=sendmail_cf or d.sendmail_cf,
        interval_ms=interval or d.interval_ms,
        max_releases_per_pass=batch or d.max_releases_per_pass,
        lock_ttl_ms=lock_ttl or d.lock_ttl_ms,
        schedule=schedule,
        load=load,
        release_agent=agent,
    )


def _release_agent_endpoint(value: Any) -> Endpoint:
    endpoint = parse_endpoint(_string(value))
    if not endpoint.is_unix:
        raise ValueError("the release agent listens on a unix socket "
                         "(unix:/run/mqpolicy-agent/agent.sock): its peers are checked "
                         "by their credentials")
    return endpoint


def _as_written(value: Any) -> str:
    """A YAML value as one canonical text (mapping keys sorted): equal for equal values,
    however the file lays them out."""
    return json.dumps(value, sort_keys=True, default=str)


def _instance_name(value: Any) -> str:
    text = _string(value)
    if not _DESTINATION_NAME.match(text):
        raise ValueError(f"an instance name is letters, digits, - and _: {text!r}")
    return text


def _absolute_path(value: Any) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"expected an absolute path, got {text!r}")
    return text


_DESTINATION_KEYS = frozenset(
    {"name", "domains", "mx", "rate", "burst", "action", "message", "lanes", "monitor",
     "on_store_error", "concurrency", "initial_concurrency", "rate_delay", "recipient_limit"}
)
_DESTINATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def _read_destinations(
    r: _Reader, top: Mapping[str, Any], lanes: set[str], store: StoreSettings,
    limit_names: set[str],
) -> Iterator[tuple[Destination, Limit]]:
    seen: set[str] = set()
    for i, container, path in _items(r, top, "destinations", by_name=True):
        m = r.mapping(container, i, path, _DESTINATION_KEYS)
        if m is None:
            continue
        before = len(r.issues)
        name = m.get("name")
        if not isinstance(name, str) or not _DESTINATION_NAME.match(name):
            # no dots: a group name can never be mistaken for a domain in the same key space
            r.error(m, "name", f"{path}.name",
                    f"a destination needs a name of letters, digits, - and _: {name!r}")
            continue
        if name in seen:
            r.error(m, "name", f"{path}.name", f"duplicate destination {name!r}")
        seen.add(name)

        def patterns(key: str, m: Mapping[str, Any] = m, path: str = path) -> tuple[str, ...]:
            if key not in m:
                return ()
            return r.strings(m, key, path, "expected a pattern or a list of patterns") or ()

        domains, mx = patterns("domains"), patterns("mx")
        if not domains and not mx:
            r.error(container, i, path, "a destination needs domains or mx patterns")
        try:
            matcher = DestinationMatcher(name, domains, mx)
        except ValueError as exc:
            r.error(m, "mx" if "mx" in m else "domains", path, str(exc))
            continue
        budget = _read_budget(r, container, i, m, path, "a destination", lanes, store)
        delivery = _read_delivery(r, m, path)
        limit_name = f"destination:{name}"
        if limit_name in limit_names:
            r.error(m, "name", f"{path}.name", f"a limit is already named {limit_name!r}")
        if len(r.issues) > before or budget is None:
            continue

        limit = Limit(
            name=limit_name, rate=budget.rate, burst=budget.burst,
            key=(KeyPart("destination"),), count=Count.RECIPIENTS, action=budget.action,
            demote_to=budget.demote_to, message=budget.message, monitor=budget.monitor,
            lanes=budget.lanes, when=None, exempt=None,
            on_store_error=budget.on_store_error, destination=name,
        )
        yield Destination(name=name, matcher=matcher, delivery=delivery), limit


def _read_dns(r: _Reader, top: Mapping[str, Any]) -> DnsSettings:
    d = DnsSettings()
    m = r.mapping(top, "dns", "dns", {"nameservers", "timeout"})
    if m is None:
        return d
    nameservers = d.nameservers
    if "nameservers" in m:
        raw = m["nameservers"]
        items = [raw] if isinstance(raw, str) else raw
        found: list[tuple[str, int]] = []
        if not isinstance(items, list):
            r.error(m, "nameservers", "dns.nameservers", "expected a list of IP[:PORT]")
        else:
            for j, text in enumerate(items):
                try:
                    found.append(_nameserver(text))
                except ValueError as exc:
                    r.error(items if isinstance(raw, list) else m,
                            j if isinstance(raw, list) else "nameservers",
                            "dns.nameservers", str(exc))
        nameservers = tuple(found) or None
    timeout = r.optional(m, "timeout", "dns", _positive_duration) or d.timeout_ms
    return DnsSettings(nameservers=nameservers, timeout_ms=timeout)


def _nameserver(text: Any) -> tuple[str, int]:
    if not isinstance(text, str):
        raise ValueError(f"expected IP or IP:PORT, got {text!r}")
    try:
        return str(ipaddress.ip_address(text)), 53
    except ValueError:
        pass
    endpoint = parse_endpoint(text)
    try:
        ipaddress.ip_address(endpoint.host)
    except ValueError:
        raise ValueError(f"a nameserver is an IP address, got {text!r}") from None
    return endpoint.host, endpoint.port


_BACKOFF_KEYS = {"decrease", "min_factor", "cooldown", "recover_step", "recover_after",
                 "recover_interval"}


def _read_feedback(r: _Reader, top: Mapping[str, Any]) -> FeedbackSettings:
    d = FeedbackSettings()
    m = r.mapping(top, "feedback", "feedback",
                  {"log", "state_file", "poll_interval", "slow_down_patterns", "backoff"})
    if m is None:
        return d
    log_path = r.optional(m, "log", "feedback", _absolute_path)
    state = r.optional(m, "state_file", "feedback", _absolute_path)
    poll = r.optional(m, "poll_interval", "feedback", _positive_duration)
    patterns: tuple[str, ...] = ()
    if "slow_down_patterns" in m:
        items = r.strings(m, "slow_down_patterns", "feedback", "expected a list of regexes")
        if items is not None:
            for text in items:
                try:
                    re.compile(text)
                except re.error as exc:
                    r.error(m, "slow_down_patterns", "feedback.slow_down_patterns",
                            f"bad regex {text!r}: {exc}")
            patterns = tuple(items)
    backoff = d.backoff
    if "backoff" in m:
        b = r.mapping(m, "backoff", "feedback.backoff", _BACKOFF_KEYS)
        if b is not None:
            values: dict[str, Any] = {}
            for key in ("decrease", "min_factor", "recover_step"):
                if key in b:
                    value = b[key]
                    if isinstance(value, bool) or not isinstance(value, int | float):
                        r.error(b, key, f"feedback.backoff.{key}", "expected a number")
                    else:
                        values[key] = float(value)
            if "recover_after" in b:
                values["recover_after"] = r.convert(b, "recover_after",
                                                    "feedback.backoff.recover_after",
                                                    _positive_int)
            for key in ("cooldown", "recover_interval"):
                if key in b:
                    values[f"{key}_ms"] = r.convert(b, key, f"feedback.backoff.{key}",
                                                    parse_duration_ms)
            values = {k: v for k, v in values.items() if v is not None}
            try:
                backoff = BackoffSettings(**values)
            except ValueError as exc:
                r.error(m, "backoff", "feedback.backoff", str(exc))
    return FeedbackSettings(
        log=log_path or d.log,
        state_file=state,
        poll_interval_ms=poll or d.poll_interval_ms,
        slow_down_patterns=patterns,
        backoff=backoff,
    )


def _enum(enum: type[Enum], value: Any) -> Any:
    try:
        return enum(value)
    except ValueError:
        allowed = " or ".join(str(m.value) for m in enum)
        raise ValueError(f"expected {allowed}, got {value!r}") from None


def _header_name(value: Any) -> str:
    text = _string(value)
    if not _HEADER_NAME.match(text):
        raise ValueError(f"not a header name: {text!r}")
    return text


def _positive_duration(value: Any) -> int:
    ms = parse_duration_ms(value)
    if ms <= 0:
        raise ValueError(f"expected a positive duration, got {value!r}")
    return ms


def _read_messages(r: _Reader, top: Mapping[str, Any]) -> Messages:
    d = Messages()
    m = r.mapping(top, "messages", "messages", {"defer", "hold", "reject", "store_error"})
    if m is None:
        return d
    values = {key: r.optional(m, key, "messages", _template)
              for key in ("defer", "hold", "reject", "store_error")}
    return Messages(**{key: text for key, text in values.items() if text is not None})


def _read_delivery(r: _Reader, m: Mapping[str, Any], path: str) -> PostfixDelivery:
    def opt(key: str, fn: Callable[[Any], Any]) -> Any:
        return r.optional(m, key, path, fn)

    rate_delay = opt("rate_delay", parse_duration_ms)
    if rate_delay is not None and rate_delay % 1000 and rate_delay >= 1000:
        r.error(m, "rate_delay", f"{path}.rate_delay", "Postfix takes whole seconds here")
    return PostfixDelivery(opt("concurrency", _positive_int),
                           opt("initial_concurrency", _positive_int), rate_delay,
                           opt("recipient_limit", _positive_int))


@dataclass(frozen=True, slots=True)
class _Budget:
    """What limits and destinations share: rate, burst and what a spent budget does."""

    rate: Rate
    burst: int
    action: ActionKind
    demote_to: str | None
    message: str | None
    monitor: bool
    lanes: frozenset[str] | None
    on_store_error: StoreErrorMode


def _read_budget(r: _Reader, container: Any, i: int, m: Mapping[str, Any], path: str,
                 what: str, lanes: set[str], store: StoreSettings) -> _Budget | None:
    """The budget fields of a limit or a destination; None when one is unusable (its
    error is recorded; reading goes on so that every error is reported)."""
    rate = None
    if "rate" not in m:
        r.error(container, i, path, f"{what} needs a rate (e.g. 100/1h)")
    else:
        rate = r.convert(m, "rate", f"{path}.rate", parse_rate)
    burst = r.optional(m, "burst", path, parse_size)
    if burst == 0:
        r.error(m, "burst", f"{path}.burst", "burst must be at least 1")
    action, demote_to = ActionKind.DEFER, None
    if "action" in m:
        action, demote_to = _read_action(r, m, path, lanes)
    message = r.optional(m, "message", path, _template)
    monitor = bool(r.optional(m, "monitor", path, _bool))
    scope: frozenset[str] | None = None
    if "lanes" in m:
        raw_lanes = m["lanes"]
        names = [raw_lanes] if isinstance(raw_lanes, str) else raw_lanes
        if not isinstance(names, list) or not names:
            r.error(m, "lanes", f"{path}.lanes", "expected a lane name or a list of lanes")
        else:
            for j, lane_name in enumerate(names):
                if lane_name not in lanes:
                    where = names if isinstance(raw_lanes, list) else m
                    r.error(
                        where, j if isinstance(raw_lanes, list) else "lanes",
                        f"{path}.lanes", _unknown_lane(lane_name, lanes),
                    )
            scope = frozenset(str(n) for n in names)
    on_error = store.on_store_error
    if "on_store_error" in m:
        on_error = r.convert(m, "on_store_error", f"{path}.on_store_error", _store_error_mode)
    if rate is None or on_error is None:
        return None
    inexact = exactness_problem(rate.count, rate.period_ms, burst or rate.count, str(rate))
    if inexact is not None:
        r.error(m, "burst" if burst else "rate", path, inexact)
        return None
    return _Budget(rate, burst or rate.count, action, demote_to, message, monitor, scope,
                   on_error)


def _read_lanes(r: _Reader, top: Mapping[str, Any]) -> Iterator[Lane]:
    seen: set[str] = set()
    priority = 0
    for i, container, path in _items(r, top, "lanes"):
        m = r.mapping(container, i, path, _LANE_KEYS)
        if m is None:
            continue
        name = m.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            r.error(m, "name", f"{path}.name", f"a lane needs a name ([A-Za-z0-9_.-]): {name!r}")
            continue
        if name in seen:
            r.error(m, "name", f"{path}.name", f"duplicate lane {name!r}")
            continue
        seen.add(name)
        transport = m.get("transport", "smtp")
        if not isinstance(transport, str) or not _TRANSPORT.match(transport):
            r.error(m, "transport", f"{path}.transport", f"bad transport name {transport!r}")
            transport = "smtp"

        def opt(
            key: str, fn: Callable[[Any], Any], m: Mapping[str, Any] = m, lane_path: str = path
        ) -> Any:
            return r.optional(m, key, lane_path, fn)

        release_rate, release_burst = opt("release_rate", parse_rate), opt("release_burst",
                                                                           _positive_int)
        inexact = release_rate and release_burst and exactness_problem(
            release_rate.count, release_rate.period_ms, release_burst, str(release_rate))
        if inexact:
            r.error(m, "release_burst", path, f"lane {name}'s release budget: {inexact}")
            release_burst = None
        yield Lane(
            name=name,
            transport=transport,
            priority=priority,
            delivery=_read_delivery(r, m, path),
            hold=bool(opt("hold", _bool)),
            release_rate=release_rate,
            release_burst=release_burst,
        )
        priority += 1
    if not seen and isinstance(top["lanes"], list):
        r.error(top, "lanes", "lanes", "at least one lane is needed")


def _condition(r: _Reader, m: Mapping[str, Any], key: str, path: str) -> Predicate | None:
    r.condition_keys |= condition_keys(m[key])
    try:
        return compile_condition(m[key], f"{path}.{key}")
    except ConditionError as exc:
        line = _find_line(m[key], exc.key) or _line_of(m, key)
        r.issues.append(ConfigIssue(r.source, line, "", str(exc)))
        return None


def _find_line(value: Any, key: str | None) -> int:
    """The line of ``key`` anywhere inside ``value`` (first found, depth-first)."""
    if key is None:
        return 0
    if isinstance(value, _LineMap):
        if key in value.key_lines:
            return value.key_lines[key]
        for v in value.values():
            line = _find_line(v, key)
            if line:
                return line
    if isinstance(value, _LineList):
        for v in value:
            line = _find_line(v, key)
            if line:
                return line
    return 0


def _read_classify(r: _Reader, top: Mapping[str, Any], lanes: set[str]) -> Iterator[ClassifyRule]:
    for i, container, path in _items(r, top, "classify"):
        m = r.mapping(container, i, path, {"name", "when", "lane"})
        if m is None:
            continue
        name = m.get("name", f"rule-{i + 1}")
        if not isinstance(name, str):
            r.error(m, "name", f"{path}.name", "expected a string")
            name = f"rule-{i + 1}"
        lane = m.get("lane")
        if lane is None:
            r.error(container, i, path, "a classify rule needs a lane")
        elif lane not in lanes:
            r.error(m, "lane", f"{path}.lane", _unknown_lane(lane, lanes))
            lane = None
        when = None
        if "when" not in m:
            r.error(container, i, path, "a classify rule needs a when")
        else:
            when = _condition(r, m, "when", path)
        if when is not None and lane is not None:
            yield ClassifyRule(name=name, when=when, lane=lane,
                               needs_headers=uses_headers(m["when"]))


def _read_limits(
    r: _Reader, top: Mapping[str, Any], lanes: set[str], store: StoreSettings
) -> Iterator[Limit]:
    seen: set[str] = set()
    for i, container, path in _items(r, top, "limits", by_name=True):
        m = r.mapping(container, i, path, _LIMIT_KEYS)
        if m is None:
            continue
        before = len(r.issues)
        name = m.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            r.error(m, "name", f"{path}.name", f"a limit needs a name ([A-Za-z0-9_.-]): {name!r}")
            name = f"limit-{i + 1}"
        elif name in seen:
            r.error(m, "name", f"{path}.name", f"duplicate limit {name!r}")
        seen.add(name)

        budget = _read_budget(r, container, i, m, path, "a limit", lanes, store)

        key: tuple[KeyPart, ...] = ()
        if "key" not in m:
            r.error(container, i, path, "a limit needs a key (e.g. sender)")
        else:
            raw = m["key"]
            items = raw if isinstance(raw, list) else [raw]
            parts = []
            for j, item in enumerate(items):
                try:
                    parts.append(_key_part(item))
                except ValueError as exc:
                    where = raw if isinstance(raw, list) else m
                    r.error(where, j if isinstance(raw, list) else "key", f"{path}.key", str(exc))
            if not items:
                r.error(m, "key", f"{path}.key", "empty key list")
            key = tuple(parts)

        count = Count.MESSAGES
        if "count" in m:
            try:
                count = Count(m["count"])
            except ValueError:
                r.error(
                    m, "count", f"{path}.count",
                    f"expected messages, recipients or bytes, got {m['count']!r}",
                )

        when = _condition(r, m, "when", path) if "when" in m else None
        exempt = _condition(r, m, "except", path) if "except" in m else None
        if len(r.issues) > before or budget is None:
            continue
        yield Limit(
            name=name,
            rate=budget.rate,
            burst=budget.burst,
            key=key,
            count=count,
            action=budget.action,
            demote_to=budget.demote_to,
            message=budget.message,
            monitor=budget.monitor,
            lanes=budget.lanes,
            when=when,
            exempt=exempt,
            on_store_error=budget.on_store_error,
            needs_headers=uses_headers(m.get("when")) or uses_headers(m.get("except")),
        )


def _read_action(
    r: _Reader, m: Mapping[str, Any], path: str, lanes: set[str]
) -> tuple[ActionKind, str | None]:
    value = m["action"]
    where = f"{path}.action"
    if isinstance(value, str) and value.startswith("demote:"):
        value = {"demote": value.partition(":")[2].strip()}
    if isinstance(value, Mapping):
        if set(value) != {"demote"}:
            r.error(m, "action", where, "expected defer, hold, reject or {demote: LANE}")
            return ActionKind.DEFER, None
        target = value["demote"]
        if target not in lanes:
            r.error(value, "demote", f"{where}.demote", _unknown_lane(target, lanes))
            return ActionKind.DEFER, None
        return ActionKind.DEMOTE, str(target)
    if value in ("defer", "hold", "reject"):
        return ActionKind(value), None
    r.error(m, "action", where, f"expected defer, hold, reject or {{demote: LANE}}, got {value!r}")
    return ActionKind.DEFER, None
