"""MX lookups for destinations (async, dnspython), and the finder that asks them only when
a destination group matches by MX (the matching itself is :mod:`mqpolicy.policy.destinations`).

:class:`MxResolver`: MX lookups with a TTL cache (record TTLs clamped to
``[min_ttl_s, max_ttl_s]``), negative caching, a per-lookup deadline, coalescing of
concurrent lookups of one domain into one query, an LRU bound, and stale answers kept while
the DNS is in trouble. It never raises DNS trouble into the caller:
:meth:`MxResolver.destination_of` falls back to the domain itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple, Protocol

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.resolver

from mqpolicy.policy.destinations import (
    DestinationMatcher,
    match_destination,
    needs_mx,
    normalize_domain,
)

log = logging.getLogger("mqpolicy.mx_rollup")  # the name its log lines have always had

# ---------------------------------------------------------------- the resolver


class LookupOutcome(Enum):
    MX = "mx"  # MX records found (possibly a null MX: no hosts)
    IMPLICIT = "implicit"  # the domain exists without MX: it is its own mail host
    NXDOMAIN = "nxdomain"  # the domain does not exist
    FAILED = "failed"  # timeout, SERVFAIL, refused, malformed answer...
    INVALID = "invalid"  # not a name that can be looked up (address literal, bad label)


class _Entry(NamedTuple):
    hosts: tuple[str, ...] | None
    outcome: LookupOutcome
    expires: float  # clock() value after which the entry must be refreshed
    stale_until: float  # a positive entry may still be served on failure until then


@dataclass(slots=True)
class ResolverStats:
    """Counters for metrics and tests."""

    hits: int = 0
    misses: int = 0
    queries: int = 0
    coalesced: int = 0
    failures: int = 0
    stale_served: int = 0
    evictions: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


Nameserver = tuple[str, int]


class MxResolver:
    """Cached, deadline-bound MX lookups on one asyncio loop.

    ``nameservers``: ``[(ip, port), ...]``; None uses the system's (``/etc/resolv.conf``,
    read at construction). ``deadline_s`` bounds each lookup, including retries.
    Answers are cached for their TTL clamped to ``[min_ttl_s, max_ttl_s]``; NXDOMAIN and
    no-MX answers for their negative TTL (RFC 2308: SOA TTL and minimum) clamped the
    same way; failures for ``failure_ttl_s``, during which a previous positive answer is
    served if it expired less than ``stale_ttl_s`` ago. At most ``max_entries`` domains
    are cached (least recently used dropped first). ``clock`` is monotonic seconds.

    Use from one event loop only (the milter hands its work to that loop).
    """

    def __init__(
        self,
        *,
        nameservers: Sequence[Nameserver] | None = None,
        deadline_s: float = 0.2,
        min_ttl_s: float = 60.0,
        max_ttl_s: float = 86_400.0,
        failure_ttl_s: float = 30.0,
        stale_ttl_s: float = 86_400.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        resolver: dns.asyncresolver.Resolver | None = None,
    ) -> None:
        if deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        if not 0 <= min_ttl_s <= max_ttl_s:
            raise ValueError("need 0 <= min_ttl_s <= max_ttl_s")
        if failure_ttl_s < 0 or stale_ttl_s < 0:
            raise ValueError("failure_ttl_s and stale_ttl_s must not be negative")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.deadline_s = deadline_s
        self.min_ttl_s = min_ttl_s
        self.max_ttl_s = max_ttl_s
        self.failure_ttl_s = failure_ttl_s
        self.stale_ttl_s = stale_ttl_s
        self.max_entries = max_entries
        self.stats = ResolverStats()
        self._clock = clock
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[_Entry]] = {}
        if resolver is None:
            resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
            if nameservers is not None:
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers
                ]
        resolver.cache = None  # this class caches, with its own clock and bounds
        resolver.timeout = deadline_s
        resolver.lifetime = deadline_s
        self._resolver = resolver

    # ------------------------------------------------------------ public

    async def mx_hosts(self, domain: str) -> tuple[str, ...] | None:
        """The MX hosts of ``domain`` in preference order (ties by name).

        ``(domain,)`` when the domain has no MX records (RFC 5321 implicit MX); ``()``
        for a null MX (RFC 7505: no mail accepted); None when the domain does not exist,
        is not a lookup-able name, or the lookup failed (and nothing stale is cached).
        Never raises for DNS trouble.
        """
        entry = await self._entry(normalize_domain(domain))
        return entry.hosts

    async def lookup(self, domain: str) -> tuple[tuple[str, ...] | None, LookupOutcome]:
        """Like :meth:`mx_hosts`, with how the answer came about."""
        entry = await self._entry(normalize_domain(domain))
        return entry.hosts, entry.outcome

    async def destination_of(self, domain: str, groups: Sequence[DestinationMatcher]) -> str:
        """The destination name of a recipient domain: a matching group's name, else the
        domain itself (also whenever the lookup fails or takes too long)."""
        name = normalize_domain(domain)
        if not name:
            return name
        found = match_destination(name, (), groups)
        if found is not None or not needs_mx(groups):
            return found or name
        hosts = await self.mx_hosts(name)
        if not hosts:
            return name
        return match_destination(name, hosts, groups) or name

    def cached(self, domain: str) -> tuple[str, ...] | None:
        """The cached answer for ``domain`` if fresh, without any lookup (None otherwise)."""
        entry = self._cache.get(normalize_domain(domain))
        if entry is None or entry.expires <= self._clock():
            return None
        return entry.hosts

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)

    async def aclose(self) -> None:
        """Cancel lookups in flight (their callers get the domain fallback)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._inflight.clear()

    # ------------------------------------------------------------ cache

    async def _entry(self, name: str) -> _Entry:
        now = self._clock()
        entry = self._cache.get(name)
        if entry is not None and entry.expires > now:
            self._cache.move_to_end(name)
            self.stats.hits += 1
            return entry
        self.stats.misses += 1
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._refresh(name, entry))
            self._inflight[name] = task
            task.add_done_callback(functools.partial(self._forget, name))
        else:
            self.stats.coalesced += 1
        try:
            # shield: one caller giving up must not cancel the lookup the others share
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and not _current_task_cancelling():
                # the shared lookup was cancelled (aclose), not this caller
                return _Entry(None, LookupOutcome.FAILED, now, now)
            raise

    def _forget(self, name: str, task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(name) is task:
            del self._inflight[name]

    async def _refresh(self, name: str, previous: _Entry | None) -> _Entry:
        entry = await self._query(name)
        now = self._clock()
        if entry.outcome is LookupOutcome.FAILED:
            self.stats.failures += 1
            if (
                previous is not None
                and previous.outcome in (LookupOutcome.MX, LookupOutcome.IMPLICIT)
                and previous.stale_until > now
            ):
                self.stats.stale_served += 1
                entry = previous._replace(expires=now + self.failure_ttl_s)
        self.stats.outcomes[entry.outcome.value] = (
            self.stats.outcomes.get(entry.outcome.value, 0) + 1
        )
        self._store(name, entry)
        return entry

    def _store(self, name: str, entry: _Entry) -> None:
        self._cache[name] = entry
        self._cache.move_to_end(name)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
            self.stats.evictions += 1

    def _ttl(self, ttl: float) -> float:
        return min(self.max_ttl_s, max(self.min_ttl_s, ttl))

    def _positive(self, hosts: tuple[str, ...], outcome: LookupOutcome, ttl: float) -> _Entry:
        expires = self._clock() + self._ttl(ttl)
        return _Entry(hosts, outcome, expires, expires + self.stale_ttl_s)

    def _negative(self, outcome: LookupOutcome, ttl: float) -> _Entry:
        expires = self._clock() + ttl
        return _Entry(None, outcome, expires, expires)

    # ------------------------------------------------------------ DNS

    async def _query(self, name: str) -> _Entry:
        qname = _query_name(name)
        if qname is None:
            return self._negative(LookupOutcome.INVALID, self.max_ttl_s)
        self.stats.queries += 1
        try:
            async with asyncio.timeout(self.deadline_s):
                answer = await self._resolver.resolve(
                    qname, dns.rdatatype.MX, raise_on_no_answer=False, search=False,
                    lifetime=self.deadline_s,
                )
        except dns.resolver.NXDOMAIN as exc:
            return self._negative(LookupOutcome.NXDOMAIN, self._ttl(_nxdomain_ttl(exc)))
        except (TimeoutError, dns.exception.DNSException, OSError, ValueError) as exc:
            log.info(
                "MX lookup failed, the domain is its own destination",
                extra={"fields": {"domain": name, "error": type(exc).__name__}},
            )
            return self._negative(LookupOutcome.FAILED, self.failure_ttl_s)
        except Exception:  # a resolver bug must not stop the mail either
            log.warning("MX lookup raised unexpectedly", exc_info=True,
                        extra={"fields": {"domain": name}})
            return self._negative(LookupOutcome.FAILED, self.failure_ttl_s)
        ttl = float(answer.chaining_result.minimum_ttl)
        if answer.rrset is None:
            return self._positive((name,), LookupOutcome.IMPLICIT, ttl)
        records = sorted(
            (rd.preference, normalize_domain(rd.exchange.to_text(omit_final_dot=True)))
            for rd in answer.rrset
            if isinstance(rd, dns.rdtypes.ANY.MX.MX)
        )
        hosts = tuple(dict.fromkeys(host for _, host in records if host))
        return self._positive(hosts, LookupOutcome.MX, ttl)


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _query_name(name: str) -> dns.name.Name | None:
    """The absolute DNS name to ask for, or None for what is no domain name."""
    if not name or name.startswith("["):
        return None
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return None
    try:
        qname = dns.name.from_text(name)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None
    if len(qname.labels) < 2:  # the root alone
        return None
    return qname


def _nxdomain_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    """RFC 2308 negative TTL of an NXDOMAIN answer (SOA TTL and minimum)."""
    ttls: list[float] = []
    responses = exc.kwargs.get("responses") or {}
    for response in responses.values():
        if isinstance(response, dns.message.QueryMessage):
            with contextlib.suppress(dns.exception.DNSException, KeyError):
                ttls.append(float(response.resolve_chaining().minimum_ttl))
    return min(ttls) if ttls else 0.0


_DOMAIN_CACHE_SIZE = 100_000


class _FinderState(NamedTuple):
    destinations: object  # the sequence these answers are for (compared by identity)
    groups: tuple[DestinationMatcher, ...]
    by_mx: bool
    by_domain: dict[str, str]  # answers that need no DNS, bounded


class DestinationFinder:
    """Finds the destination group of a domain for the configured destinations: by domain
    pattern without DNS, by MX when a group needs it and a resolver is given. The matchers
    are rebuilt only when the destinations change (a reload); the state is replaced whole,
    so callers on several threads (the milter's) never mix two policies' answers."""

    def __init__(self, resolver: MxResolver | None) -> None:
        self.resolver = resolver
        self._state = _FinderState(None, (), False, {})

    def _state_for(self, destinations: Sequence[_HasMatcher]) -> _FinderState:
        state = self._state
        if state.destinations is not destinations:
            groups = tuple(d.matcher for d in destinations)
            state = self._state = _FinderState(destinations, groups, needs_mx(groups), {})
        return state

    async def find(self, domain: str, destinations: Sequence[_HasMatcher]) -> str:
        """The group's name, else the domain itself. Never raises (DNS trouble: the domain)."""
        found = self.find_now(domain, destinations)
        if found is None and self.resolver is not None:
            groups = self._state_for(destinations).groups
            return await self.resolver.destination_of(domain, groups)
        return found or normalize_domain(domain)

    def find_now(self, domain: str, destinations: Sequence[_HasMatcher]) -> str | None:
        """:meth:`find` when the answer needs no DNS; None when it needs the resolver."""
        state = self._state_for(destinations)
        if state.by_mx and self.resolver is not None:
            return None
        cache = state.by_domain
        found = cache.get(domain)
        if found is None:
            found = match_destination(domain, (), state.groups) or normalize_domain(domain)
            if len(cache) >= _DOMAIN_CACHE_SIZE:
                cache.clear()
            cache[domain] = found
        return found


class _HasMatcher(Protocol):
    @property
    def matcher(self) -> DestinationMatcher: ...
