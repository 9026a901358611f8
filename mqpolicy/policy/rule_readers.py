"""The readers of the policy file's rules: ``lanes``, ``classify``, ``limits`` and
``destinations`` (a destination's budget becomes a limit of its own). Each takes the
:class:`~mqpolicy.policy.value_readers.Reader` and the top-level mapping and yields what it
could read; an item with an error is skipped, its errors recorded."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mqpolicy.policy.conditions import uses_headers
from mqpolicy.policy.destinations import DestinationMatcher
from mqpolicy.policy.keys import KEY_PARTS, KeyPart
from mqpolicy.policy.model import (
    ActionKind,
    ClassifyRule,
    Count,
    Destination,
    Lane,
    Limit,
    Oversize,
    PostfixDelivery,
    StoreErrorMode,
    StoreSettings,
)
from mqpolicy.policy.rates import (
    Rate,
    exactness_problem,
    parse_duration_ms,
    parse_rate,
    parse_size,
)
from mqpolicy.policy.value_readers import (
    PLAIN_NAME,
    Reader,
    boolean,
    items_of,
    kind_of,
    oversize_mode,
    positive_int,
    read_condition,
    reply_template,
    store_error_mode,
    suggest,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


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
    "oversize",
}


def _key_part(text: Any) -> KeyPart:
    if not isinstance(text, str):
        raise ValueError(f"expected a key name, got {kind_of(text)}")
    name, _, rest = text.partition("/")
    if name not in KEY_PARTS:
        raise ValueError(f"unknown key {name!r}{suggest(name, KEY_PARTS)}")
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


def unknown_lane(name: Any, lane_names: set[str]) -> str:
    return f"unknown lane {name!r} (lanes: {', '.join(sorted(lane_names))})"


def _read_delivery(r: Reader, m: Mapping[str, Any], path: str) -> PostfixDelivery:
    def opt(key: str, fn: Callable[[Any], Any]) -> Any:
        return r.optional(m, key, path, fn)

    rate_delay = opt("rate_delay", parse_duration_ms)
    if rate_delay is not None and rate_delay % 1000 and rate_delay >= 1000:
        r.error(m, "rate_delay", f"{path}.rate_delay", "Postfix takes whole seconds here")
    return PostfixDelivery(opt("concurrency", positive_int),
                           opt("initial_concurrency", positive_int), rate_delay,
                           opt("recipient_limit", positive_int))


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
    oversize: Oversize


def _read_budget(r: Reader, container: Any, i: int, m: Mapping[str, Any], path: str,
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
    message = r.optional(m, "message", path, reply_template)
    monitor = bool(r.optional(m, "monitor", path, boolean))
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
                        f"{path}.lanes", unknown_lane(lane_name, lanes),
                    )
            scope = frozenset(str(n) for n in names)
    on_error = store.on_store_error
    if "on_store_error" in m:
        on_error = r.convert(m, "on_store_error", f"{path}.on_store_error", store_error_mode)
    oversize = Oversize.REJECT
    if "oversize" in m:
        oversize = r.convert(m, "oversize", f"{path}.oversize", oversize_mode)
    if rate is None or on_error is None or oversize is None:
        return None
    inexact = exactness_problem(rate.count, rate.period_ms, burst or rate.count, str(rate))
    if inexact is not None:
        r.error(m, "burst" if burst else "rate", path, inexact)
        return None
    return _Budget(rate, burst or rate.count, action, demote_to, message, monitor, scope,
                   on_error, oversize)


def read_lanes(r: Reader, top: Mapping[str, Any]) -> Iterator[Lane]:
    seen: set[str] = set()
    priority = 0
    for i, container, path in items_of(r, top, "lanes"):
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
        if not isinstance(transport, str) or not PLAIN_NAME.match(transport):
            r.error(m, "transport", f"{path}.transport", f"bad transport name {transport!r}")
            transport = "smtp"

        def opt(
            key: str, fn: Callable[[Any], Any], m: Mapping[str, Any] = m, lane_path: str = path
        ) -> Any:
            return r.optional(m, key, lane_path, fn)

        release_rate, release_burst = opt("release_rate", parse_rate), opt("release_burst",
                                                                           positive_int)
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
            hold=bool(opt("hold", boolean)),
            release_rate=release_rate,
            release_burst=release_burst,
        )
        priority += 1
    if not seen and isinstance(top["lanes"], list):
        r.error(top, "lanes", "lanes", "at least one lane is needed")


def read_classify(r: Reader, top: Mapping[str, Any], lanes: set[str]) -> Iterator[ClassifyRule]:
    for i, container, path in items_of(r, top, "classify"):
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
            r.error(m, "lane", f"{path}.lane", unknown_lane(lane, lanes))
            lane = None
        when = None
        if "when" not in m:
            r.error(container, i, path, "a classify rule needs a when")
        else:
            when = read_condition(r, m, "when", path)
        if when is not None and lane is not None:
            yield ClassifyRule(name=name, when=when, lane=lane,
                               needs_headers=uses_headers(m["when"]))


def read_limits(
    r: Reader, top: Mapping[str, Any], lanes: set[str], store: StoreSettings
) -> Iterator[Limit]:
    seen: set[str] = set()
    for i, container, path in items_of(r, top, "limits", by_name=True):
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

        when = read_condition(r, m, "when", path) if "when" in m else None
        exempt = read_condition(r, m, "except", path) if "except" in m else None
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
            oversize=budget.oversize,
            needs_headers=uses_headers(m.get("when")) or uses_headers(m.get("except")),
        )


def _read_action(
    r: Reader, m: Mapping[str, Any], path: str, lanes: set[str]
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
            r.error(value, "demote", f"{where}.demote", unknown_lane(target, lanes))
            return ActionKind.DEFER, None
        return ActionKind.DEMOTE, str(target)
    if value in ("defer", "hold", "reject"):
        return ActionKind(value), None
    r.error(m, "action", where, f"expected defer, hold, reject or {{demote: LANE}}, got {value!r}")
    return ActionKind.DEFER, None


_DESTINATION_KEYS = frozenset(
    {"name", "domains", "mx", "rate", "burst", "action", "message", "lanes", "monitor",
     "on_store_error", "oversize", "concurrency", "initial_concurrency", "rate_delay",
     "recipient_limit"}
)


def read_destinations(
    r: Reader, top: Mapping[str, Any], lanes: set[str], store: StoreSettings,
    limit_names: set[str],
) -> Iterator[tuple[Destination, Limit]]:
    seen: set[str] = set()
    for i, container, path in items_of(r, top, "destinations", by_name=True):
        m = r.mapping(container, i, path, _DESTINATION_KEYS)
        if m is None:
            continue
        before = len(r.issues)
        name = m.get("name")
        if not isinstance(name, str) or not PLAIN_NAME.match(name):
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
            oversize=budget.oversize,
        )
        yield Destination(name=name, matcher=matcher, delivery=delivery), limit
