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
    """The domain part of an address, lower-cased ('' when there is none)."""
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
        return cls(
            stage=(get("protocol_state") or STAGE_RCPT).upper(),
            client_address=get("client_address", ""),
            client_name=get("client_name", ""),
            reverse_client_name=get("reverse_client_name", ""),
            helo_name=get("helo_name", ""),
            sasl_username=get("sasl_username", ""),
            sender=get("sender", ""),
            recipient=get("recipient", ""),
            recipient_count=_int(get("recipient_count")),
            size=_int(get("size")),
            queue_id=get("queue_id", ""),
            instance=get("instance", ""),
            protocol_name=get("protocol_name", ""),
        )
