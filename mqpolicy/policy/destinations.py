"""Destinations: which budget a recipient domain belongs to, by its name or its MX hosts.
Pure: the patterns and the matching; the MX lookups are
:class:`~mqpolicy.decision.mx_resolver.MxResolver`'s.

:func:`match_destination`: a domain and its MX hosts against the configured destination
groups. Domain patterns of every group are tried first (no DNS needed), then MX patterns:
for each MX host in preference order, the first group (in config order) with a matching
MX pattern wins. So ``gmail.com`` and a company domain hosted at Google both land in the
group ``mx: "*.google.com"`` and share its budget.

Patterns are ``example.com`` (exact) or ``*.example.com`` (any name below
``example.com``, not ``example.com`` itself), compared case-insensitively without a
trailing dot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------- patterns (pure)

_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def normalize_domain(name: str) -> str:
    """Lower case, no trailing dot, no surrounding blanks."""
    return name.strip().rstrip(".").lower()


def parse_pattern(text: str) -> str:
    """Validate and normalise a domain or MX host pattern: ``example.com`` or
    ``*.example.com``. Raises :class:`ValueError` with a message fit for a config error."""
    if not isinstance(text, str):
        raise ValueError(f"expected a domain pattern, got {type(text).__name__} {text!r}")
    pattern = normalize_domain(text)
    body = pattern[2:] if pattern.startswith("*.") else pattern
    if not body:
        raise ValueError(f"empty domain pattern {text!r}")
    labels = body.split(".")
    for label in labels:
        if not label:
            raise ValueError(f"empty label in domain pattern {text!r}")
        if "*" in label:
            raise ValueError(
                f"bad wildcard in {text!r}: only a leading '*.' is allowed (e.g. *.google.com)"
            )
        if len(label) > 63 or not (label.isascii() and set(label) <= _LABEL_CHARS):
            raise ValueError(f"not a domain name: {text!r} (use the IDNA a-label form)")
    if len(body) > 253:
        raise ValueError(f"domain pattern too long: {text!r}")
    return pattern


def pattern_matches(pattern: str, name: str) -> bool:
    """``pattern`` (normalised by :func:`parse_pattern`) against a normalised ``name``."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


@dataclass(frozen=True, slots=True)
class DestinationMatcher:
    """One destination group as far as matching goes: its name and its patterns.

    Patterns are normalised at construction; a bad one raises :class:`ValueError`.
    """

    name: str
    domains: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a destination needs a name")
        object.__setattr__(self, "domains", tuple(parse_pattern(p) for p in self.domains))
        object.__setattr__(self, "mx", tuple(parse_pattern(p) for p in self.mx))

    def matches_domain(self, domain: str) -> bool:
        return any(pattern_matches(p, domain) for p in self.domains)

    def matches_mx(self, host: str) -> bool:
        return any(pattern_matches(p, host) for p in self.mx)


def match_destination(
    domain: str, mx_hosts: Sequence[str], groups: Sequence[DestinationMatcher]
) -> str | None:
    """The name of the group ``domain`` belongs to, or None.

    Domain patterns first (every group, in order); then, for each MX host in the order
    given (preference order), the first group with a matching MX pattern.
    """
    name = normalize_domain(domain)
    for group in groups:
        if group.matches_domain(name):
            return group.name
    for host in mx_hosts:
        host_name = normalize_domain(host)
        for group in groups:
            if group.matches_mx(host_name):
                return group.name
    return None


def needs_mx(groups: Sequence[DestinationMatcher]) -> bool:
    """Whether any group matches by MX (else no lookup is ever needed)."""
    return any(group.mx for group in groups)
