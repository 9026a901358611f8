"""The key a limit counts a request under: ``alice@example.com``, ``192.0.2.0/24``, ...

Each limit's key spec (``sender``, ``client_network/24``, ``sasl_username+recipient_domain``)
is compiled once, at load, into one function of the request (:func:`key_function`); the
engine calls it for every limit of every request. Pure.

A key is its parts, each escaped by :func:`escape_key_part`, joined by ``|``: one text for
one tuple of parts and never for another (a ``|`` inside a part, a byte that is not UTF-8
kept by the codecs as a lone surrogate, are escaped), and text that encodes to UTF-8 (what
Redis is sent). Parts that need no escape, the usual ones, are kept as they are.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mqpolicy.policy.conditions import parse_ip
from mqpolicy.policy.request import Request, domain_of, recipient_destination

RECIPIENT_KEY_PARTS = frozenset({"recipient", "recipient_domain", "destination"})
KEY_PARTS = frozenset(
    {
        "sender",
        "sender_domain",
        "sasl_username",
        "client_address",
        "client_network",
        "client_name",
        "helo_name",
        *RECIPIENT_KEY_PARTS,
    }
)


@dataclass(frozen=True, slots=True)
class KeyPart:
    name: str
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64

    def __str__(self) -> str:
        if self.name == "client_network":
            return f"client_network/{self.ipv4_prefix}/{self.ipv6_prefix}"
        return self.name


KeyFunction = Callable[[Request], "str | None"]
"""A request's key value for one limit; None when a part of it is missing."""

_NEEDS_ESCAPE = re.compile("[%|\ud800-\udfff]")
"""What :func:`escape_key_part` replaces: its escape character, the parts' separator, and
lone surrogates (bytes that are not UTF-8, as ``surrogateescape`` decoding keeps them)."""


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "%":
        return "%25"
    if char == "|":
        return "%7c"
    return f"%u{ord(char):04x}"


def escape_key_part(text: str) -> str:
    """``text`` with ``%`` as ``%25``, ``|`` as ``%7c`` and each lone surrogate as
    ``%u`` and its four hex digits (``\\udcff``, a raw byte 0xff, as ``%udcff``):
    injective over all strings (``%`` always starts an escape, whose form says its
    length), never contains ``|`` and always encodes to UTF-8."""
    if text.isascii() and "%" not in text and "|" not in text:
        return text
    return _NEEDS_ESCAPE.sub(_escape, text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def escape_surrogates(text: str) -> str:
    """``text`` with lone surrogates escaped as :func:`escape_key_part` does and nothing
    else: the same as that for a key already escaped; for a key typed by an operator
    (``counters``), the bucket a raw byte in it names."""
    if text.isascii():
        return text
    return _SURROGATE.sub(_escape, text)


_READABLE = re.compile("%(25|7c)")


def readable_key(key: str) -> str:
    """A key as a client reads it in a reply (``{key}``): ``%`` and ``|`` inside its parts
    as they were (a lone surrogate stays escaped). Not unambiguous: logs, ``explain`` and
    ``counters`` show the key itself."""
    if "%" not in key:
        return key
    return _READABLE.sub(lambda m: "%" if m.group(1) == "25" else "|", key)


def join_key_parts(parts: Sequence[str]) -> str:
    """One key text for a tuple of one or more parts (see the module docstring)."""
    return "|".join(map(escape_key_part, parts))


@functools.lru_cache(maxsize=65536)
def client_network(address: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """``192.0.2.0/24`` for ``192.0.2.77``; '' for what is not an address. Cached: the
    same clients come back all day, and parsing an address is the costly part."""
    parts = address.split(".")
    if len(parts) == 4 and all(p.isdigit() and len(p) <= 3 for p in parts):
        # IPv4, the common case, without the ipaddress module (20x cheaper)
        value = 0
        for part in parts:
            octet = int(part)
            if octet > 255 or (len(part) > 1 and part[0] == "0"):
                return ""
            value = value << 8 | octet
        value &= (0xFFFFFFFF << (32 - ipv4_prefix)) & 0xFFFFFFFF
        dotted = ".".join(str(value >> shift & 0xFF) for shift in (24, 16, 8, 0))
        return f"{dotted}/{ipv4_prefix}"
    ip = parse_ip(address)
    if ip is None:
        return ""
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _part_function(part: KeyPart) -> Callable[[Request], str]:
    name = part.name
    if name == "client_network":
        v4, v6 = part.ipv4_prefix, part.ipv6_prefix
        return lambda r: client_network(r.client_address, v4, v6)
    if name == "sender_domain":
        return lambda r: domain_of(r.sender)
    if name == "recipient_domain":
        return lambda r: domain_of(r.recipient)
    if name == "destination":
        return recipient_destination
    function = _LOWER_CASED.get(name)
    if function is None:
        raise ValueError(f"unknown key part {name!r}")
    return function


_LOWER_CASED: dict[str, Callable[[Request], str]] = {
    "sender": lambda r: r.sender.lower(),
    "sasl_username": lambda r: r.sasl_username.lower(),
    "client_address": lambda r: r.client_address.lower(),
    "client_name": lambda r: r.client_name.lower(),
    "helo_name": lambda r: r.helo_name.lower(),
    "recipient": lambda r: r.recipient.lower(),
}


def key_function(parts: Sequence[KeyPart]) -> KeyFunction:
    """One function for a limit's key parts: their values escaped and joined by ``|``
    (:func:`join_key_parts`), or None when one of them is empty."""
    functions = tuple(_part_function(part) for part in parts)
    if len(functions) == 1:
        only = functions[0]
        return lambda r: escape_key_part(only(r)) or None

    def composite(r: Request) -> str | None:
        values = []
        for function in functions:
            value = function(r)
            if not value:
                return None
            values.append(value)
        return join_key_parts(values)

    return composite
