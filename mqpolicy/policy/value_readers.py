"""The reader that walks a loaded policy file, and the readers of single values.

:class:`Reader` converts values and collects every problem as a :class:`ConfigIssue` with its
file and line (reading goes on after an error, so that every one is reported); the functions
here read one value each (a positive integer, a duration, a file mode, a reply template, a
condition...), raising ValueError with what was expected. The sections are read by
:mod:`mqpolicy.policy.settings_readers` and :mod:`mqpolicy.policy.rule_readers`.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mqpolicy.policy.conditions import (
    ConditionError,
    Predicate,
    compile_condition,
    condition_keys,
    header_names,
)
from mqpolicy.policy.endpoints import EndpointSyntaxError
from mqpolicy.policy.model import Oversize, StoreErrorMode
from mqpolicy.policy.rates import RateSyntaxError, parse_duration_ms
from mqpolicy.policy.yaml_lines import find_line, line_of

TEMPLATE_FIELDS = frozenset({"limit", "key", "rate", "retry_after", "remaining", "lane"})
#: A name of letters, digits, - and _ (no dots): transports, destinations, instances.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


StoreUrlCheck = Callable[[str], object]
"""A store family's parser of ``store.url`` as its store opens it: ValueError saying what
to write instead (:func:`mqpolicy.store.urls.check_store_url`)."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    source: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class Reader:
    """Walks the loaded YAML, converting values and collecting issues with lines."""

    def __init__(self, source: str, check_store_url: StoreUrlCheck | None) -> None:
        self.source = source
        self.check_store_url = check_store_url
        self.issues: list[ConfigIssue] = []
        self.condition_keys: frozenset[str] = frozenset()  # of every condition read
        self.header_names: frozenset[str] = frozenset()  # the headers they read

    def error(self, container: Any, key: Any, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.source, line_of(container, key), path, message))

    def mapping(
        self, container: Any, key: Any, path: str, allowed: set[str] | frozenset[str]
    ) -> Mapping[str, Any] | None:
        value = container[key] if key is not None else container
        if not isinstance(value, Mapping):
            self.error(container, key, path, f"expected a mapping, got {kind_of(value)}")
            return None
        for k in value:
            if k not in allowed:
                hint = suggest(str(k), allowed)
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


def kind_of(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def suggest(word: str, allowed: set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(word, sorted(allowed), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (allowed: {', '.join(sorted(allowed))})"


def items_of(r: Reader, top: Mapping[str, Any], key: str,
           by_name: bool = False) -> Iterator[tuple[int, Any, str]]:
    """(index, the list, path) of each item of ``top[key]``; with ``by_name`` an item that
    has a name is called by it in messages (``limits[per-sender]``)."""
    value = top[key]
    if not isinstance(value, list):
        r.error(top, key, key, f"expected a list, got {kind_of(value)}")
        return
    for i, item in enumerate(value):
        named = by_name and isinstance(item, Mapping) and isinstance(item.get("name"), str)
        yield i, value, f"{key}[{item['name']}]" if named else f"{key}[{i}]"


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def nonempty_string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {kind_of(value)}")
    return value


def reply_template(value: Any) -> str:
    text = nonempty_string(value)
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


def store_error_mode(value: Any) -> StoreErrorMode:
    mode: StoreErrorMode = enum_value(StoreErrorMode, value)
    return mode


def oversize_mode(value: Any) -> Oversize:
    mode: Oversize = enum_value(Oversize, value)
    return mode


def file_mode(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)  # YAML 0660 without quotes is octal already: 432
        if value > 0o777:
            return int(text, 8)
        return value
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    raise ValueError(f"expected a file mode like \"0660\", got {value!r}")


def enum_value(enum: type[Enum], value: Any) -> Any:
    try:
        return enum(value)
    except ValueError:
        allowed = " or ".join(str(m.value) for m in enum)
        raise ValueError(f"expected {allowed}, got {value!r}") from None


def positive_duration(value: Any) -> int:
    ms = parse_duration_ms(value)
    if ms <= 0:
        raise ValueError(f"expected a positive duration, got {value!r}")
    return ms


def read_condition(r: Reader, m: Mapping[str, Any], key: str, path: str) -> Predicate | None:
    r.condition_keys |= condition_keys(m[key])
    r.header_names |= header_names(m[key])
    try:
        return compile_condition(m[key], f"{path}.{key}")
    except ConditionError as exc:
        line = find_line(m[key], exc.key) or line_of(m, key)
        r.issues.append(ConfigIssue(r.source, line, "", str(exc)))
        return None
