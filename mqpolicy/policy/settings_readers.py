"""The readers of the policy file's settings sections: ``listen``, ``server``, ``store``,
``log``, ``metrics``, ``admin``, ``milter``, ``scheduler``, ``dns``, ``feedback`` and
``messages``. Each takes the :class:`~mqpolicy.policy.value_readers.Reader` and the top-level
mapping, and returns the section's settings (its defaults where a value is wrong: the error is
recorded)."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mqpolicy.policy.backoff import BackoffSettings
from mqpolicy.policy.endpoints import (
    Endpoint,
    EndpointSyntaxError,
    parse_endpoint,
    parse_milter_endpoint,
)
from mqpolicy.policy.model import (
    DEFAULT_LISTEN_MODE,
    AdminSettings,
    DnsSettings,
    ErrorAction,
    FeedbackRule,
    FeedbackSettings,
    LoadThresholds,
    LogSettings,
    Messages,
    MetricsSettings,
    MilterSettings,
    MtaKind,
    RcptLimits,
    SchedulerSettings,
    ScheduleSettings,
    ServerSettings,
    StoreSettings,
)
from mqpolicy.policy.rates import parse_duration_ms, parse_size
from mqpolicy.policy.value_readers import (
    PLAIN_NAME,
    Reader,
    boolean,
    enum_value,
    file_mode,
    items_of,
    kind_of,
    nonempty_string,
    positive_duration,
    positive_int,
    read_condition,
    reply_template,
    store_error_mode,
)


def read_listen(r: Reader, top: Mapping[str, Any], mode: int) -> Iterator[Endpoint]:
    value = top["listen"]
    if isinstance(value, str):
        ep = r.convert(top, "listen", "listen", lambda v: parse_endpoint(v, mode=mode))
        if ep is not None:
            yield ep
        return
    for i, container, path in items_of(r, top, "listen"):
        item = container[i]
        if not isinstance(item, str):
            r.error(container, i, path, f"expected HOST:PORT or unix:/path, got {kind_of(item)}")
            continue
        try:
            yield parse_endpoint(item, mode=mode)
        except EndpointSyntaxError as exc:
            r.error(container, i, path, str(exc))


def read_server(r: Reader, top: Mapping[str, Any]) -> ServerSettings:
    m = r.mapping(
        top,
        "server",
        "server",
        {"idle_timeout", "max_request_size", "max_connections", "drain_timeout", "reuse_port"},
    )
    d = ServerSettings()
    if m is None:
        return d
    idle = r.optional(m, "idle_timeout", "server", positive_duration)
    size = r.optional(m, "max_request_size", "server", parse_size)
    conns = r.optional(m, "max_connections", "server", positive_int)
    drain = r.optional(m, "drain_timeout", "server", parse_duration_ms)
    if size is not None and size < 1024:
        r.error(m, "max_request_size", "server.max_request_size", "must be at least 1KiB")
    reuse_port = bool(r.optional(m, "reuse_port", "server", boolean))
    return ServerSettings(
        reuse_port=reuse_port,
        idle_timeout_s=idle / 1000 if idle is not None else d.idle_timeout_s,
        max_request_size=size or d.max_request_size,
        max_connections=conns or d.max_connections,
        drain_timeout_s=drain / 1000 if drain is not None else d.drain_timeout_s,
    )


def read_store(r: Reader, top: Mapping[str, Any]) -> StoreSettings:
    m = r.mapping(top, "store", "store", {"url", "timeout_ms", "on_store_error", "key_prefix",
                                          "max_entries", "once_ttl"})
    d = StoreSettings()
    if m is None:
        return d
    return StoreSettings(
        url=r.optional(m, "url", "store", lambda value: _store_url(r, value)) or d.url,
        timeout_ms=r.optional(m, "timeout_ms", "store", positive_int) or d.timeout_ms,
        on_store_error=(r.optional(m, "on_store_error", "store", store_error_mode)
                        or d.on_store_error),
        key_prefix=r.optional(m, "key_prefix", "store", nonempty_string) or d.key_prefix,
        max_entries=r.optional(m, "max_entries", "store", positive_int) or d.max_entries,
        once_ttl_ms=r.optional(m, "once_ttl", "store", positive_duration) or d.once_ttl_ms,
    )


def _store_url(r: Reader, value: Any) -> str:
    text = nonempty_string(value)
    if r.check_store_url is not None:
        r.check_store_url(text)  # the store's own parser: what serve would refuse, check refuses
    return text


def read_log(r: Reader, top: Mapping[str, Any]) -> LogSettings:
    m = r.mapping(top, "log", "log", {"format", "level", "decisions"})
    d = LogSettings()
    if m is None:
        return d
    fmt, level, decisions = d.format, d.level, d.decisions
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
    if "decisions" in m:
        if m["decisions"] in ("notable", "all"):
            decisions = m["decisions"]
        else:
            r.error(m, "decisions", "log.decisions",
                    f"expected notable or all, got {m['decisions']!r}")
    return LogSettings(format=fmt, level=level, decisions=decisions)


def read_metrics(r: Reader, top: Mapping[str, Any]) -> MetricsSettings:
    m = r.mapping(top, "metrics", "metrics", {"listen"})
    if m is None or "listen" not in m:
        return MetricsSettings()
    endpoint = r.convert(m, "listen", "metrics.listen", parse_endpoint)
    if endpoint is not None and endpoint.is_unix:
        r.error(m, "listen", "metrics.listen", "metrics listen on HOST:PORT (HTTP)")
        return MetricsSettings()
    return MetricsSettings(listen=endpoint)


_UNIX_PATH_MAX = 107  # bytes of a unix socket path (sun_path less its NUL)


def read_admin(r: Reader, top: Mapping[str, Any]) -> AdminSettings | None:
    m = r.mapping(top, "admin", "admin", {"listen", "mode"})
    if m is None:
        return None
    if "listen" not in m:
        r.error(top, "admin", "admin.listen", "required: the admin socket, unix:/path")
        return None
    mode = r.optional(m, "mode", "admin", file_mode)
    endpoint = r.convert(m, "listen", "admin.listen", lambda v: parse_endpoint(
        nonempty_string(v), mode=DEFAULT_LISTEN_MODE if mode is None else mode))
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


def read_milter(r: Reader, top: Mapping[str, Any], store: StoreSettings) -> MilterSettings:
    d = MilterSettings()
    m = r.mapping(top, "milter", "milter", _MILTER_KEYS)
    if m is None:
        return d

    def opt(key: str, fn: Callable[[Any], Any]) -> Any:
        return r.optional(m, key, "milter", fn)

    listen = opt("listen", lambda v: parse_milter_endpoint(nonempty_string(v)))
    mode = opt("listen_mode", file_mode)
    on_error = opt("on_error", lambda v: enum_value(ErrorAction, v))
    header = opt("lane_header", _header_name)
    timeout = opt("timeout", positive_duration)
    rcpt = opt("rcpt_limits", lambda v: enum_value(RcptLimits, v))
    mta_timeout = opt("mta_timeout", positive_duration)
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


def _header_name(value: Any) -> str:
    text = nonempty_string(value)
    if not _HEADER_NAME.match(text):
        raise ValueError(f"not a header name: {text!r}")
    return text


_SCHEDULER_KEYS = frozenset(
    {"mta", "instance", "postfix_config_dir", "sendmail_cf", "interval",
     "max_releases_per_pass", "lock_ttl", "schedule", "load", "release_agent"}
)


def read_scheduler(r: Reader, top: Mapping[str, Any]) -> SchedulerSettings:
    d = SchedulerSettings()
    m = r.mapping(top, "scheduler", "scheduler", _SCHEDULER_KEYS)
    if m is None:
        return d

    def opt(key: str, fn: Callable[[Any], Any]) -> Any:
        return r.optional(m, key, "scheduler", fn)

    mta = opt("mta", lambda v: enum_value(MtaKind, v))
    instance = opt("instance", _instance_name)
    config_dir = opt("postfix_config_dir", _absolute_path)
    sendmail_cf = opt("sendmail_cf", _absolute_path)
    interval = opt("interval", positive_duration)
    batch = opt("max_releases_per_pass", positive_int)
    lock_ttl = opt("lock_ttl", positive_duration)
    agent = opt("release_agent", _release_agent_endpoint)
    if lock_ttl is not None and lock_ttl <= (interval or d.interval_ms):
        r.error(m, "lock_ttl", "scheduler.lock_ttl", "must be longer than scheduler.interval")

    schedule = d.schedule
    if "schedule" in m:
        s = r.mapping(m, "schedule", "scheduler.schedule", {"allow", "max_delay"})
        if s is not None:
            allow = read_condition(r, s, "allow", "scheduler.schedule") if "allow" in s else None
            max_delay = r.optional(s, "max_delay", "scheduler.schedule", positive_duration)
            schedule = ScheduleSettings(allow=allow,
                                        max_delay_ms=max_delay or d.schedule.max_delay_ms,
                                        allow_text=_as_written(s["allow"]) if allow else "")
    load = d.load
    if "load" in m:
        keys = {"active", "incoming", "deferred", "hold_lanes"}
        lm = r.mapping(m, "load", "scheduler.load", keys)
        if lm is not None:
            values = {k: r.convert(lm, k, f"scheduler.load.{k}", positive_int)
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
    endpoint = parse_endpoint(nonempty_string(value))
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
    text = nonempty_string(value)
    if not PLAIN_NAME.match(text):
        raise ValueError(f"an instance name is letters, digits, - and _: {text!r}")
    return text


def _absolute_path(value: Any) -> str:
    text = nonempty_string(value)
    if not text.startswith("/"):
        raise ValueError(f"expected an absolute path, got {text!r}")
    return text


def read_dns(r: Reader, top: Mapping[str, Any]) -> DnsSettings:
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
    timeout = r.optional(m, "timeout", "dns", positive_duration) or d.timeout_ms
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


def read_feedback(r: Reader, top: Mapping[str, Any]) -> FeedbackSettings:
    d = FeedbackSettings()
    m = r.mapping(top, "feedback", "feedback",
                  {"log", "state_file", "poll_interval", "slow_down_patterns", "backoff",
                   "rules"})
    if m is None:
        return d
    log_path = r.optional(m, "log", "feedback", _absolute_path)
    state = r.optional(m, "state_file", "feedback", _absolute_path)
    poll = r.optional(m, "poll_interval", "feedback", positive_duration)
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
                                                    positive_int)
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
        rules=_feedback_rules(r, m, top) if "rules" in m else (),
    )


_RULE_KEYS = {"match", "action", "for", "destination"}
_RULE_ACTIONS = ("pause",)


def _feedback_rules(r: Reader, m: Mapping[str, Any],
                    top: Mapping[str, Any]) -> tuple[FeedbackRule, ...]:
    """``feedback.rules``: each a regex ``match``, ``action: pause``, a ``for`` duration
    and optionally a configured ``destination``."""
    items = m["rules"]
    if not isinstance(items, list):
        r.error(m, "rules", "feedback.rules", f"expected a list, got {kind_of(items)}")
        return ()
    raw_destinations = top.get("destinations")
    names = {str(d.get("name")) for d in raw_destinations if isinstance(d, Mapping)} \
        if isinstance(raw_destinations, list) else set()
    rules = []
    for i, _ in enumerate(items):
        path = f"feedback.rules[{i}]"
        rule = r.mapping(items, i, path, _RULE_KEYS)
        if rule is None:
            continue
        missing = [key for key in ("match", "action", "for") if key not in rule]
        for key in missing:
            r.error(items, i, path, f"missing {key}")
        if missing:
            continue
        pattern = None
        match = rule["match"]
        if not isinstance(match, str) or not match:
            r.error(rule, "match", f"{path}.match", "expected a regex")
        else:
            try:
                pattern = re.compile(match, re.IGNORECASE)
            except re.error as exc:
                r.error(rule, "match", f"{path}.match", f"bad regex {match!r}: {exc}")
        if rule["action"] not in _RULE_ACTIONS:
            r.error(rule, "action", f"{path}.action",
                    f"expected one of {', '.join(_RULE_ACTIONS)}, got {rule['action']!r}")
        for_ms = r.convert(rule, "for", f"{path}.for", positive_duration)
        destination = rule.get("destination")
        if destination is not None and destination not in names:
            r.error(rule, "destination", f"{path}.destination",
                    f"no destination named {destination!r}"
                    f" (destinations: {', '.join(sorted(names)) or 'none'})")
            destination = None
        if pattern is not None and for_ms is not None and rule["action"] in _RULE_ACTIONS:
            rules.append(FeedbackRule(pattern, for_ms, destination))
    return tuple(rules)


def read_messages(r: Reader, top: Mapping[str, Any]) -> Messages:
    d = Messages()
    m = r.mapping(top, "messages", "messages", {"defer", "hold", "reject", "store_error"})
    if m is None:
        return d
    values = {key: r.optional(m, key, "messages", reply_template)
              for key in ("defer", "hold", "reject", "store_error")}
    return Messages(**{key: text for key, text in values.items() if text is not None})
