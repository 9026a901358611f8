"""What Sentinel says, read without I/O: a sentinel's ``SENTINEL MASTER`` and ``SENTINEL
REPLICAS`` answers as a :class:`SentinelView`, the master to write to from every
sentinel's view (:func:`choose_master`), the service and server its pub/sub events name,
and which errors say a server is no longer the master to write to. The I/O that asks and
listens is :mod:`mqpolicy.store.sentinel` (:class:`~mqpolicy.store.sentinel.MasterTracker`)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError

TRY_FAILOVER: Final = "+try-failover"
SENTINEL_EVENTS: Final = (
    TRY_FAILOVER,  # a sentinel starts a failover: SENTINEL FAILOVER, or the master is down
    "+promoted-slave",  # the replica it chose answers as master (the switch is decided)
    "+switch-master",  # this sentinel names the new master
    "+convert-to-slave",  # a server that answers as master is told to be a replica
    "-failover-abort-not-elected",
    "-failover-abort-no-good-slave",
    "-failover-abort-slave-timeout",
)
_PROMOTED_STATES: Final = frozenset({"reconf_slaves", "update_config"})
DEFAULT_FAILOVER_TIMEOUT_MS: Final = 180_000
Address = tuple[str, int]


def address_text(address: Address | None) -> str:
    if address is None:
        return "none"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def event_service(channel: str, data: str) -> str | None:
    """The service a sentinel event (``channel`` and its message) is about."""
    words = data.split()
    if channel == "+switch-master":  # <service> <old ip> <old port> <new ip> <new port>
        return words[0] if words else None
    if "@" in words:  # <type> <name> <ip> <port> @ <service> <master ip> <master port>
        at = words.index("@")
        return words[at + 1] if at + 1 < len(words) else None
    if len(words) > 1 and words[0] == "master":  # master <service> <ip> <port>
        return words[1]
    return None


def event_address(channel: str, data: str) -> Address | None:
    """The server an event names: the new master for ``+switch-master``, otherwise the
    instance the event is about."""
    words = data.split()
    at = (3, 4) if channel == "+switch-master" else (2, 3)
    try:
        return words[at[0]], int(words[at[1]])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class SentinelView:
    """What one sentinel says of the service.

    ``master``: the server it names as master, None when that one is down or while its
    own failover has not promoted a replica yet; ``switching``: a failover it runs has not
    had its replica promoted (the old master may stop being one at any moment);
    ``config_epoch``: the epoch of the configuration it names (a later failover's is
    higher)."""

    config_epoch: int
    master: Address | None
    switching: bool = False
    failover_timeout_ms: int = DEFAULT_FAILOVER_TIMEOUT_MS


def _flags(fields: Mapping[str, str]) -> set[str]:
    return set(fields.get("flags", "").split(","))


def read_view(
    master: Mapping[str, str], replicas: Sequence[Mapping[str, str]] = ()
) -> SentinelView:
    """A sentinel's ``SENTINEL MASTER`` and ``SENTINEL REPLICAS`` answers as a view.

    During a failover the sentinel running it still names the old master until the end
    (``+switch-master``), but once it has seen its replica answer as master
    (``failover-state`` ``reconf_slaves``, the configuration epoch already the
    failover's) that replica is the master: the switch can no longer be undone."""
    epoch = int(master.get("config-epoch") or 0)
    failover_timeout = int(master.get("failover-timeout") or DEFAULT_FAILOVER_TIMEOUT_MS)
    flags = _flags(master)
    if "failover_in_progress" in flags:
        if master.get("failover-state") in _PROMOTED_STATES:
            for replica in replicas:
                if "promoted" in _flags(replica) and replica.get("role-reported") == "master":
                    address = (replica["ip"], int(replica["port"]))
                    return SentinelView(epoch, address, False, failover_timeout)
        return SentinelView(epoch, None, True, failover_timeout)
    if flags & {"s_down", "o_down"}:
        return SentinelView(epoch, None, False, failover_timeout)
    return SentinelView(epoch, (master["ip"], int(master["port"])), False, failover_timeout)


def choose_master(
    views: Sequence[SentinelView | None], awaited: Collection[int] = ()
) -> Address | None:
    """The master to write to, from every sentinel's view (None: a sentinel that did not
    answer), or None when there is none to write to safely now.

    The newest configuration wins (highest ``config_epoch``); none while a sentinel runs
    a failover whose replica is not promoted yet and no newer configuration is known
    (writes to the old master could be dropped by its resync), while the views of the
    newest epoch disagree, or while a sentinel in ``awaited`` (one that announced a
    failover) does not answer."""
    if any(views[i] is None for i in awaited if i < len(views)):
        return None
    answered = [v for v in views if v is not None]
    named = [v for v in answered if v.master is not None]
    if not named:
        return None
    newest = max(v.config_epoch for v in named)
    masters = {v.master for v in named if v.config_epoch == newest}
    if len(masters) != 1 or any(v.switching and v.config_epoch >= newest for v in answered):
        return None
    return masters.pop()


def reply_text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def server_fields(reply: object) -> dict[str, str]:
    """A Sentinel answer about one server (a map, or a flat list of pairs) as text."""
    if isinstance(reply, Mapping):
        return {reply_text(k): reply_text(v) for k, v in reply.items()}
    if isinstance(reply, list | tuple):
        return {reply_text(reply[i]): reply_text(reply[i + 1]) for i in range(0, len(reply) - 1, 2)}
    raise ValueError(f"unexpected sentinel answer: {reply!r:.200}")


def master_unwritable(exc: BaseException) -> bool:
    """An error that says the server is no longer the master to write to: READONLY (a
    replica now), NOREPLICAS (min-replicas-to-write: its replicas have left it, as they
    do in a switchover), or a connection that failed (not a mere timeout)."""
    if isinstance(exc, ReadOnlyError):
        return True
    if isinstance(exc, ResponseError):
        return str(exc).startswith("NOREPLICAS")
    return isinstance(exc, RedisConnectionError | OSError) and not isinstance(exc, TimeoutError)
