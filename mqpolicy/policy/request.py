"""The normalised facts of one policy decision.

Every front-end (Postfix policy delegation, milter, scheduler, ``explain``) turns what it
receives into a :class:`Request`; the engine reads nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

# Postfix ``protocol_state`` values (upper case as Postfix sends them).
STAGE_RCPT = "RCPT"
STAGE_END_OF_MESSAGE = "END-OF-MESSAGE"


def _int(value: str | None) -> int:
    if not value:
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return 0


def domain_of(address: str) -> str:
    """The domain part of an address, lower-cased, without a trailing dot ('' when there is
    none). The last ``@`` separates it (a quoted local part may hold one); an empty local
    part keeps its domain: Postfix hands ``""@x`` over as ``@x`` and delivers it to x."""
    _, at, domain = address.rpartition("@")
    return domain.lower().rstrip(".") if at else ""


class Request(NamedTuple):
    """One decision's facts. Addresses are kept as sent; matching lower-cases them.

    A NamedTuple: immutable and cheap to build, once per request."""

    stage: str = STAGE_RCPT
    client_address: str = ""
    client_name: str = ""
    reverse_client_name: str = ""
    helo_name: str = ""
    sasl_username: str = ""
    sender: str = ""
    recipient: str = ""
    recipient_count: int = 0
    size: int = 0
    queue_id: str = ""
    instance: str = ""
    protocol_name: str = ""
    # The destination group of ``recipient`` (MX rollup), set by the front-end before
    # planning; '' means the recipient's domain.
    destination: str = ""
    # All recipients of the message when the front-end knows them (milter at EOM).
    recipients: tuple[str, ...] = ()
    # Message headers as (name, value) pairs in order, when the front-end has them (milter).
    headers: tuple[tuple[str, str], ...] | None = None

    @property
    def message_key(self) -> str:
        """Identifies the message for counting it once: queue id, else instance."""
        return self.queue_id or self.instance

    @classmethod
    def from_policy_attributes(cls, attrs: Mapping[str, str]) -> Request:
        """Build from a Postfix policy delegation request (``name=value`` attributes)."""
        get = attrs.get
        stage = get("protocol_state") or STAGE_RCPT
        count = get("recipient_count", "")
        size = get("size", "")
        # Positional through tuple.__new__: a NamedTuple's keyword __new__ costs twice as
        # much, and this runs for every request (order: the fields above).
        return _tuple_new(cls, (
            stage if stage.isupper() else stage.upper(),
            get("client_address", ""),
            get("client_name", ""),
            get("reverse_client_name", ""),
            get("helo_name", ""),
            get("sasl_username", ""),
            get("sender", ""),
            get("recipient", ""),
            int(count) if count.isdecimal() and len(count) < 19 else _int(count),
            int(size) if size.isdecimal() and len(size) < 19 else _int(size),
            get("queue_id", ""),
            get("instance", ""),
            get("protocol_name", ""),
            "",
            (),
            None,
        ))


_tuple_new = tuple.__new__


def recipient_destination(request: Request) -> str:
    """Where the request's recipient goes: the destination group the front-end resolved
    (MX rollup), else the recipient's domain."""
    return request.destination or domain_of(request.recipient)
