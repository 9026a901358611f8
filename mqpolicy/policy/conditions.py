"""Match conditions for ``classify`` rules and the ``when``/``except`` of limits.

Conditions are compiled once at config load into plain predicates ``Request -> bool``.
Compilation reports problems through :class:`ConditionError` with the YAML path; the
config loader adds the file and line. Evaluation is pure and never raises.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqpolicy.policy.rates import RateSyntaxError, parse_size
from mqpolicy.policy.request import Request, domain_of

Predicate = Callable[[Request], bool]


class ConditionError(ValueError):
    """A condition that cannot be compiled. ``key`` is the offending sub-key, if any."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------- string matchers


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """Case-insensitive exact / glob / regex matching of one string."""

    exact: frozenset[str]
    pattern: re.Pattern[str] | None

    def __call__(self, value: str) -> bool:
        value = value.lower()
        if value in self.exact:
            return True
        return self.pattern is not None and self.pattern.search(value) is not None


@dataclass(frozen=True, slots=True)
class AddressMatcher:
    """Addresses: exact, ``@domain``, ``@.domain`` (domain and subdomains), glob, regex."""

    exact: frozenset[str]
    domains: frozenset[str]
    suffixes: tuple[str, ...]
    pattern: re.Pattern[str] | None

    def __call__(self, address: str) -> bool:
        address = address.lower()
        if address in self.exact:
            return True
        if self.domains or self.suffixes:
            domain = domain_of(address)
            if domain in self.domains:
                return True
            for suffix in self.suffixes:
                if domain == suffix or domain.endswith("." + suffix):
                    return True
        return self.pattern is not None and self.pattern.search(address) is not None


def _as_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConditionError(f"{what}: expected a string or a list of strings, got {value!r}")


def _regex(text: str, what: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ConditionError(f"{what}: bad regex {text!r}: {exc}") from None
    return text


def _join(patterns: list[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)


def _read_list_file(path_text: str) -> list[str]:
    path = Path(path_text)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConditionError(f"cannot read list file {path_text!r}: {exc.strerror}") from None
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append(line)
    return entries


_STRING_FORMS = frozenset({"exact", "glob", "regex", "file"})
_ADDRESS_FORMS = frozenset({"exact", "domain", "glob", "regex", "file"})


class _Collected:
    """What the items of a string or address matcher add up to."""

    def __init__(self, what: str, with_domains: bool) -> None:
        self.what = what
        self.with_domains = with_domains
        self.exact: set[str] = set()
        self.domains: set[str] = set()
        self.suffixes: list[str] = []
        self.patterns: list[str] = []

    def add(self, form: str, item: str) -> None:
        if form == "exact":
            self.exact.add(item.lower())
        elif form == "domain":
            item = item.lower().lstrip("@")
            if item.startswith("."):
                self.suffixes.append(item[1:])
            elif item:
                self.domains.add(item)
            else:
                raise ConditionError(f"{self.what}: empty domain")
        elif form == "glob":
            self.patterns.append(fnmatch.translate(item.lower()))
        elif form == "regex":
            self.patterns.append(_regex(item, self.what))
        elif form == "file":
            for entry in _read_list_file(item):
                self.add_auto(entry)
        else:
            self.add_auto(item)

    def add_auto(self, item: str) -> None:
        """``/regex/``, a glob, ``@domain`` (addresses only) or an exact value."""
        if len(item) >= 2 and item.startswith("/") and item.endswith("/"):
            self.add("regex", item[1:-1])
        elif any(c in item for c in "*?["):
            self.add("glob", item)
        elif self.with_domains and item.startswith("@"):
            self.add("domain", item)
        else:
            self.add("exact", item)


def _collect(value: Any, what: str, forms: frozenset[str], with_domains: bool) -> _Collected:
    found = _Collected(what, with_domains)
    if isinstance(value, Mapping):
        for form, items in value.items():
            if form not in forms:
                raise ConditionError(
                    f"{what}: unknown matcher {form!r} (use {', '.join(sorted(forms))})",
                    key=str(form),
                )
            for item in _as_list(items, f"{what}.{form}"):
                found.add(str(form), item)
    else:
        for item in _as_list(value, what):
            found.add_auto(item)
    return found


def compile_string_matcher(value: Any, what: str) -> StringMatcher:
    """A string, a list, or ``{exact, glob, regex, file}``; ``/re/`` and globs auto-detected."""
    found = _collect(value, what, _STRING_FORMS, with_domains=False)
    return StringMatcher(frozenset(found.exact), _join(found.patterns))


def compile_address_matcher(value: Any, what: str) -> AddressMatcher:
    """Like strings, plus ``@domain`` and ``@.domain`` forms (and ``domain:`` lists)."""
    found = _collect(value, what, _ADDRESS_FORMS, with_domains=True)
    return AddressMatcher(frozenset(found.exact), frozenset(found.domains),
                          tuple(found.suffixes), _join(found.patterns))


# ---------------------------------------------------------------- networks and ranges


def compile_networks(
    value: Any, what: str
) -> tuple[tuple[ipaddress.IPv4Network, ...], tuple[ipaddress.IPv6Network, ...]]:
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for item in _as_list(value, what):
        try:
            net = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise ConditionError(f"{what}: bad address or CIDR {item!r}") from None
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    return tuple(v4), tuple(v6)


@functools.lru_cache(maxsize=65536)
def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client address as Postfix sends it (``ipv6:`` prefix tolerated), or None."""
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _range(value: Any, what: str, *, sizes: bool) -> tuple[int | None, int | None]:
    def number(v: Any, sub: str) -> int:
        try:
            if sizes:
                return parse_size(v)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise RateSyntaxError(f"{v!r}")
            return v
        except RateSyntaxError:
            message = f"{what}.{sub}: not a non-negative number: {v!r}"
            raise ConditionError(message, key=sub) from None

    if not isinstance(value, Mapping) or not value:
        raise ConditionError(f"{what}: expected {{min: N, max: N}}, got {value!r}")
    low = high = None
    for sub, v in value.items():
        if sub == "min":
            low = number(v, sub)
        elif sub == "max":
            high = number(v, sub)
        else:
            raise ConditionError(f"{what}: unknown key {sub!r} (use min, max)", key=str(sub))
    if low is not None and high is not None and low > high:
        raise ConditionError(f"{what}: min {low} is above max {high}")
    return low, high


# ---------------------------------------------------------------- the compiler

_STRING_FIELDS = {
    "client_name": "client_name",
    "reverse_client_name": "reverse_client_name",
    "helo_name": "helo_name",
    "sasl_username": "sasl_username",
    "protocol_name": "protocol_name",
}

CONDITION_KEYS = frozenset(
    {
        "sender",
        "recipient",
        "client_address",
        "authenticated",
        "size",
        "recipient_count",
        "protocol_state",
        "header",
        "header_present",
        "bulk_signals",
        "priority",
        "any",
        "all",
        "not",
        *_STRING_FIELDS,
    }
)


def compile_condition(spec: Any, what: str = "when") -> Predicate:
    """Compile a condition mapping (all keys must hold) into a predicate."""
    if not isinstance(spec, Mapping):
        raise ConditionError(f"{what}: expected a mapping of conditions, got {spec!r}")
    if not spec:
        raise ConditionError(f"{what}: empty condition (leave it out to match everything)")
    parts: list[Predicate] = []
    for key, value in spec.items():
        try:
            parts.append(_compile_one(str(key), value, f"{what}.{key}"))
        except ConditionError as exc:
            if exc.key is None:
                exc.key = str(key)
            raise
    if len(parts) == 1:
        return parts[0]
    return _all_of(tuple(parts))


# Plain loops: a generator inside any()/all() costs more than the tests themselves.
def _any_of(preds: tuple[Predicate, ...]) -> Predicate:
    def any_of(req: Request) -> bool:
        for pred in preds:  # noqa: SIM110 - a loop is faster than any() over a generator
            if pred(req):
                return True
        return False

    return any_of


def _all_of(preds: tuple[Predicate, ...]) -> Predicate:
    def all_of(req: Request) -> bool:
        for pred in preds:  # noqa: SIM110 - a loop is faster than all() over a generator
            if not pred(req):
                return False
        return True

    return all_of


def _compile_list(value: Any, what: str) -> tuple[Predicate, ...]:
    if not isinstance(value, list) or not value:
        raise ConditionError(f"{what}: expected a non-empty list of conditions")
    return tuple(compile_condition(item, f"{what}[{i}]") for i, item in enumerate(value))


def _compile_one(key: str, value: Any, what: str) -> Predicate:
    if key == "any":
        return _any_of(_compile_list(value, what))
    if key == "all":
        return _all_of(_compile_list(value, what))
    if key == "not":
        inner = compile_condition(value, what)
        return lambda req: not inner(req)
    if key == "sender":
        match = compile_address_matcher(value, what)
        return lambda req: match(req.sender)
    if key == "recipient":
        rmatch = compile_address_matcher(value, what)

        def recipient(req: Request) -> bool:
            if req.recipient and rmatch(req.recipient):
                return True
            return any(rmatch(r) for r in req.recipients)

        return recipient
    if key in _STRING_FIELDS:
        smatch = compile_string_matcher(value, what)
        attr = _STRING_FIELDS[key]
        return lambda req: smatch(getattr(req, attr))
    if key == "client_address":
        v4, v6 = compile_networks(value, what)

        def client_address(req: Request) -> bool:
            ip = parse_ip(req.client_address)
            if ip is None:
                return False
            nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (
                v4 if ip.version == 4 else v6
            )
            return any(ip in net for net in nets)

        return client_address
    if key == "authenticated":
        if not isinstance(value, bool):
            raise ConditionError(f"{what}: expected true or false, got {value!r}")
        want = value
        return lambda req: bool(req.sasl_username) is want
    if key == "size":
        low, high = _range(value, what, sizes=True)
        return lambda req: (low is None or req.size >= low) and (high is None or req.size <= high)
    if key == "recipient_count":
        low, high = _range(value, what, sizes=False)

        def recipient_count(req: Request) -> bool:
            # before DATA Postfix sends 0; the milter knows the recipients themselves
            n = req.recipient_count or len(req.recipients)
            return (low is None or n >= low) and (high is None or n <= high)

        return recipient_count
    if key == "protocol_state":
        states = frozenset(s.upper() for s in _as_list(value, what))
        return lambda req: req.stage in states
    if key == "header_present":
        names = frozenset(n.lower() for n in _as_list(value, what))

        def header_present(req: Request) -> bool:
            if req.headers is None:
                return False
            return any(name.lower() in names for name, _ in req.headers)

        return header_present
    if key == "header":
        return _compile_header(value, what)
    if key == "bulk_signals":
        return _compile_bulk_signals(value, what)
    if key == "priority":
        return _compile_priority(value, what)
    raise ConditionError(
        f"{what}: unknown condition {key!r} (use one of {', '.join(sorted(CONDITION_KEYS))})"
    )


def _compile_header(value: Any, what: str) -> Predicate:
    items = value if isinstance(value, list) else [value]
    tests: list[tuple[str, re.Pattern[str]]] = []
    for i, item in enumerate(items):
        where = f"{what}[{i}]" if isinstance(value, list) else what
        if not isinstance(item, Mapping) or set(item) - {"name", "regex"} or "name" not in item:
            raise ConditionError(f"{where}: expected {{name: HEADER, regex: PATTERN}}")
        name = item["name"]
        pattern = item.get("regex", ".*")
        if not isinstance(name, str) or not isinstance(pattern, str):
            raise ConditionError(f"{where}: name and regex must be strings")
        tests.append((name.lower(), re.compile(_regex(pattern, where), re.IGNORECASE)))
    frozen = tuple(tests)

    def header(req: Request) -> bool:
        if req.headers is None:
            return False
        for want, rx in frozen:
            for name, val in req.headers:
                if name.lower() == want and rx.search(val):
                    break
            else:
                return False
        return True

    return header


# Ready-made header signals (milter only: like header conditions they never match a request
# without headers, whatever the value asked for).
#
# bulk_signals: true   the message says it is bulk or automatic: "Precedence: bulk|list|junk",
#                      a List-Id, List-Unsubscribe or Feedback-ID header, or Auto-Submitted
#                      with any value but "no" (RFC 3834).
# bulk_signals: false  headers known and none of those present.
# priority: high | normal | low (or a list of them): the priority the sender asked for, from
#                      X-Priority (1-2 high, 3 normal, 4-5 low), Importance (high/normal/low),
#                      Priority (urgent/normal/non-urgent) and X-MSMail-Priority (high/normal/
#                      low). A message asking for both high and low counts as high; a message
#                      with none of these headers is normal.

_PRECEDENCE_BULK = frozenset({"bulk", "list", "junk"})
_BULK_PRESENT = frozenset({"list-id", "list-unsubscribe", "feedback-id"})
_PRIORITIES = ("high", "normal", "low")
_PRIORITY_WORDS = {
    "importance": {"high": "high", "normal": "normal", "low": "low"},
    "priority": {"urgent": "high", "normal": "normal", "non-urgent": "low"},
    "x-msmail-priority": {"high": "high", "normal": "normal", "low": "low"},
}
_X_PRIORITY = {"1": "high", "2": "high", "3": "normal", "4": "low", "5": "low"}


def has_bulk_signal(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether any header marks the message as bulk, list or automatic mail."""
    for name, value in headers:
        lname = name.lower()
        if lname in _BULK_PRESENT:
            return True
        if lname == "precedence" and value.strip().lower() in _PRECEDENCE_BULK:
            return True
        if lname == "auto-submitted" and value.split(";", 1)[0].strip().lower() != "no":
            return True
    return False


def message_priority(headers: Iterable[tuple[str, str]]) -> str:
    """``high``, ``normal`` or ``low``: what the priority headers ask for."""
    seen: set[str] = set()
    for name, value in headers:
        lname = name.lower()
        word = value.strip().lower()
        if lname == "x-priority":
            level = _X_PRIORITY.get(word[:1])
        else:
            words = _PRIORITY_WORDS.get(lname)
            if words is None:
                continue
            level = words.get(word.split(None, 1)[0] if word else "")
        if level is not None:
            seen.add(level)
    if "high" in seen:
        return "high"
    return "low" if "low" in seen else "normal"


def _compile_bulk_signals(value: Any, what: str) -> Predicate:
    if not isinstance(value, bool):
        raise ConditionError(f"{what}: expected true or false, got {value!r}")
    want = value

    def bulk_signals(req: Request) -> bool:
        if req.headers is None:
            return False
        return has_bulk_signal(req.headers) is want

    return bulk_signals


def _compile_priority(value: Any, what: str) -> Predicate:
    levels = frozenset(v.lower() for v in _as_list(value, what))
    unknown = levels - set(_PRIORITIES)
    if unknown or not levels:
        raise ConditionError(f"{what}: expected high, normal or low, got {value!r}")

    def priority(req: Request) -> bool:
        if req.headers is None:
            return False
        return message_priority(req.headers) in levels

    return priority




HEADER_CONDITION_KEYS = frozenset({"header", "header_present", "bulk_signals", "priority"})


def condition_keys(spec: Any) -> frozenset[str]:
    """Every condition key a condition (as written in YAML) uses, also under
    ``any``/``all``/``not``: what it needs to know of a message."""
    if isinstance(spec, Mapping):
        keys: set[str] = set()
        for key, value in spec.items():
            if key in ("any", "all", "not"):
                keys |= condition_keys(value)
            else:
                keys.add(str(key))
        return frozenset(keys)
    if isinstance(spec, list):
        return frozenset().union(*(condition_keys(item) for item in spec))
    return frozenset()


SIGNAL_HEADERS = frozenset({"precedence", "auto-submitted", *_BULK_PRESENT, "x-priority",
                            *_PRIORITY_WORDS})
"""The headers ``bulk_signals`` and ``priority`` read (lower case)."""


def header_names(spec: Any) -> frozenset[str]:
    """The headers (lower case) a condition (as written in YAML) reads, also under
    ``any``/``all``/``not``: what a decision's log line keeps for ``mqpolicy replay``."""
    if isinstance(spec, list):
        return frozenset().union(*(header_names(item) for item in spec))
    if not isinstance(spec, Mapping):
        return frozenset()
    names: set[str] = set()
    for key, value in spec.items():
        if key in ("any", "all", "not"):
            names |= header_names(value)
        elif key == "header_present":
            names.update(str(n).lower() for n in (value if isinstance(value, list)
                                                    else [value]))
        elif key == "header":
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, Mapping) and isinstance(item.get("name"), str):
                    names.add(item["name"].lower())
        elif key in ("bulk_signals", "priority"):
            names |= SIGNAL_HEADERS
    return frozenset(names)


def uses_headers(spec: Any) -> bool:
    """Whether a condition looks at headers anywhere. Without headers (the policy server)
    its answer is unknown, so such rules and limits are left to the milter, which sees
    them."""
    return not condition_keys(spec).isdisjoint(HEADER_CONDITION_KEYS)
