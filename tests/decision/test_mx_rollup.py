"""Destinations and MX rollup: pure matching, and MxResolver against a local DNS server.

The DNS server is :class:`tests.support.dns_fixture.FakeDnsServer` on 127.0.0.1 (never real DNS).
Time-dependent behaviour (TTLs, failure caching) runs on an injected clock; only the
deadline tests measure real time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from mqpolicy.decision.mx_resolver import LookupOutcome, MxResolver
from mqpolicy.policy.destinations import DestinationMatcher, match_destination, parse_pattern
from mqpolicy.store.budget import budget_check
from mqpolicy.store.memory import MemoryStore
from tests.support.async_poll import poll_async
from tests.support.dns_fixture import FakeDnsServer

T = TypeVar("T")

GROUPS = (
    DestinationMatcher("yahoo", domains=("yahoo.test", "*.yahoo.test", "ymail.test")),
    DestinationMatcher("google", mx=("*.google.test",)),
    DestinationMatcher("microsoft", mx=("*.protection.outlook.test", "mx.hotmail.test")),
)

ZONE: dict[str, dict[str, Any]] = {
    # two domains hosted at the same provider: one destination
    "gmail.test": {"MX": [(5, "gmail-smtp-in.l.google.test"),
                          (10, "alt1.gmail-smtp-in.l.google.test")], "ttl": 300},
    "company.test": {"MX": [(1, "aspmx.l.google.test"), (5, "alt1.aspmx.l.google.test")]},
    "contoso.test": {"MX": [(0, "contoso-test.mail.protection.outlook.test")]},
    "hotmail.test": {"MX": [(5, "MX.Hotmail.Test")]},
    "own.test": {"MX": [(10, "mail.own.test")]},
    # a Yahoo domain matched by name, whatever its MX says
    "ymail.test": {"MX": [(1, "aspmx.l.google.test")]},
    # any MX host counts, also a backup: primary at the own host, backup at Google
    "backup.test": {"MX": [(20, "backup.google.test"), (10, "mx.backup.test")]},
    # preference order decides between groups, whatever the order in the answer
    "split.test": {"MX": [(20, "aspmx.l.google.test"), (10, "mx.hotmail.test")]},
    "noanswer.test": {"A": ["192.0.2.1"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "short.test": {"MX": [(10, "mx.short.test")], "ttl": 5},
    "long.test": {"MX": [(10, "mx.long.test")], "ttl": 1_000_000},
    "slow.test": {"MX": [(10, "aspmx.l.google.test")]},
    "flaky.test": {"MX": [(10, "aspmx.l.google.test")], "ttl": 120},
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro_fn()

    return asyncio.run(bounded())


@pytest.fixture
def dns_server() -> Iterator[FakeDnsServer]:
    with FakeDnsServer(ZONE, negative_ttl=600) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def resolver_for(server: FakeDnsServer, clock: FakeClock, **kwargs: Any) -> MxResolver:
    kwargs.setdefault("min_ttl_s", 1.0)
    return MxResolver(nameservers=[server.address], clock=clock, **kwargs)


# ---------------------------------------------------------------- pure matching


@pytest.mark.parametrize(
    ("domain", "mx_hosts", "expected"),
    [
        ("yahoo.test", (), "yahoo"),  # exact domain
        ("YMail.Test.", (), "yahoo"),  # case and trailing dot do not matter
        ("mail.yahoo.test", (), "yahoo"),  # *.suffix matches below the suffix
        ("yahoo.test.evil", (), None),
        ("notyahoo.test", (), None),  # a suffix match is on label boundaries
        ("gmail.test", ("gmail-smtp-in.l.google.test",), "google"),
        ("x.test", ("contoso-test.mail.protection.outlook.test",), "microsoft"),
        ("x.test", ("mx.hotmail.test",), "microsoft"),  # exact MX host
        ("x.test", ("mx1.hotmail.test",), None),
        ("x.test", ("google.test",), None),  # *.google.test is not google.test itself
        # domain patterns win over MX patterns, whatever the group order
        ("ymail.test", ("aspmx.l.google.test",), "yahoo"),
        # MX hosts in preference order: the first host that matches any group decides
        ("x.test", ("mx.hotmail.test", "aspmx.l.google.test"), "microsoft"),
        ("x.test", ("aspmx.l.google.test", "mx.hotmail.test"), "google"),
        ("x.test", ("mx.x.test", "backup.google.test"), "google"),
        ("x.test", ("ASPMX.L.GOOGLE.TEST.",), "google"),
        ("x.test", (), None),
    ],
)
def test_match_destination(domain: str, mx_hosts: tuple[str, ...], expected: str | None) -> None:
    assert match_destination(domain, mx_hosts, GROUPS) == expected


def test_group_order_breaks_ties_for_one_host() -> None:
    groups = (
        DestinationMatcher("first", mx=("*.l.google.test",)),
        DestinationMatcher("second", mx=("*.google.test",)),
    )
    assert match_destination("x.test", ("aspmx.l.google.test",), groups) == "first"
    assert match_destination("x.test", ("aspmx.l.google.test",), groups[::-1]) == "second"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Example.COM.", "example.com"), ("*.Google.com", "*.google.com"), (" a-b.c_d.test ", "a-b.c_d.test")],
)
def test_parse_pattern_normalises(text: str, expected: str) -> None:
    assert parse_pattern(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("*.", "wildcard"),
        ("*google.com", "wildcard"),
        ("mx.*.google.com", "wildcard"),
        ("*.*.google.com", "wildcard"),
        ("ex..com", "empty label"),
        ("exa mple.com", "not a domain"),
        ("bücher.test", "a-label"),
        ("a" * 64 + ".test", "not a domain"),
    ],
)
def test_parse_pattern_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pattern(text)


def test_matcher_rejects_bad_patterns_at_construction() -> None:
    with pytest.raises(ValueError, match="wildcard"):
        DestinationMatcher("bad", mx=("*google.com",))
    with pytest.raises(ValueError, match="name"):
        DestinationMatcher("", domains=("a.test",))


# ---------------------------------------------------------------- rollup over DNS


def test_two_domains_at_one_provider_roll_up(dns_server: FakeDnsServer, clock: FakeClock) -> None:
    async def scenario() -> dict[str, str]:
        resolver = resolver_for(dns_server, clock)
        domains = ["gmail.test", "company.test", "contoso.test", "hotmail.test", "own.test",
                   "ymail.test", "backup.test", "split.test"]
        found = {d: await resolver.destination_of(d, GROUPS) for d in domains}
        assert await resolver.mx_hosts("gmail.test") == (
            "gmail-smtp-in.l.google.test", "alt1.gmail-smtp-in.l.google.test",
        )
        assert await resolver.mx_hosts("hotmail.test") == ("mx.hotmail.test",)
        assert await resolver.mx_hosts("backup.test") == ("mx.backup.test", "backup.google.test")
        return found

    assert run(scenario) == {
        "gmail.test": "google",
        "company.test": "google",
        "contoso.test": "microsoft",
        "hotmail.test": "microsoft",
        "own.test": "own.test",  # no group: the domain is its own destination
        "ymail.test": "yahoo",  # by name
        "backup.test": "google",  # any MX host counts, a backup too
        "split.test": "microsoft",  # the preferred host decides between groups
    }
    # ymail.test matched by name: no DNS query was needed
    assert dns_server.count("ymail.test") == 0


def test_rolled_up_domains_share_one_budget(dns_server: FakeDnsServer, clock: FakeClock) -> None:
    """The destination name is the budget key: mail to gmail.test spends the budget that
    company.test then finds empty, while own.test keeps a budget of its own."""

    async def scenario() -> list[bool]:
        resolver = resolver_for(dns_server, clock)
        store = MemoryStore()
        allowed = []
        for domain in ["gmail.test", "gmail.test", "company.test", "own.test"]:
            destination = await resolver.destination_of(domain, GROUPS)
            check = budget_check(f"dest:{destination}", 1, 60_000, 2, 1)
            evaluation = await store.evaluate([check], now_ms=1_000)
            allowed.append(evaluation.results[0].allowed)
        return allowed

    assert run(scenario) == [True, True, False, True]


def test_no_mx_means_the_domain_itself(dns_server: FakeDnsServer, clock: FakeClock) -> None:
    async def scenario() -> None:
        resolver = resolver_for(dns_server, clock)
        assert await resolver.lookup("noanswer.test") == (("noanswer.test",), LookupOutcome.IMPLICIT)
        assert await resolver.destination_of("noanswer.test", GROUPS) == "noanswer.test"
        # cached like any answer
        assert await resolver.mx_hosts("noanswer.test") == ("noanswer.test",)

    run(scenario)
    assert dns_server.count("noanswer.test") == 1


def test_null_mx_has_no_hosts(dns_server: FakeDnsServer, clock: FakeClock) -> None:
    async def scenario() -> None:
        resolver = resolver_for(dns_server, clock)
        assert await resolver.lookup("nullmx.test") == ((), LookupOutcome.MX)
        assert await resolver.destination_of("nullmx.test", GROUPS) == "nullmx.test"

    run(scenario)


def test_nxdomain_is_cached(dns_server: FakeDnsServer, clock: FakeClock) -> None:
    async def scenario() -> None:
        resolver = resolver_for(dns_server, clock, max_ttl_s=3600)
        assert await resolver.lookup("missing.test") == (None, LookupOutcome.NXDOMAIN)
        assert dns_server.count("missing.test") == 1
        assert await resolver.destination_of("missing.test", GROUPS) == "missing.test"
        assert await resolver.mx_hosts("MISSING.test.") is None
        assert dns_server.count("missing.test") == 1  # served from the negative cache
        assert resolver.stats.hits == 2
        # the negative TTL comes from the SOA (600 s here)
        clock.now += 599
        assert await resolver.mx_hosts("missing.test") is None
        assert dns_server.count("missing.test") == 1
        clock.now += 2
        assert await resolver.mx_hosts("missing.test") is None
        assert dns_server.count("missing.test") == 2

    run(scenario)


def test_ttl_expiry_refreshes(dns_server: FakeDnsServer, clock: FakeClock) -> None:
    async def scenario() -> None:
        resolver = resolver_for(dns_server, clock)
        assert await resolver.mx_hosts("gmail.test") is not None
        clock.now += 299
        assert resolver.cached("gmail.test") is not None
        assert await resolver.mx_hosts("gmail.test") is not None
        assert dns_server.count("gmail.test") == 1
        # the provider moves the domain: seen once the record's TTL has passed
        dns_server.set_zone({**ZONE, "gmail.test": {"MX": [(10, "mx.elsewhere.test")]}})
        clock.now += 2
        assert resolver.cached("gmail.test") is None
        assert await resolver.destination_of("gmail.test", GROUPS) == "gmail.test"
        assert dns_server.count("gmail.test") == 2

    run(scenario)


def test_ttl_is_clamped(dns_server: FakeDnsServer, clock: FakeClock) -> None:
    async def scenario() -> None:
        resolver = resolver_for(dns_server, clock, min_ttl_s=60, max_ttl_s=3600)
        await resolver.mx_hosts("short.test")  # TTL 5 s, kept 60 s
        await resolver.mx_hosts("long.test")  # TTL 1,000,000 s, kept 3600 s
        clock.now += 59
        await resolver.mx_hosts("short.test")
        assert dns_server.count("short.test") == 1
        clock.now += 2
        await resolver.mx_hosts("short.test")
        assert dns_server.count("short.test") == 2
        clock.now += 3600 - 61 - 1
        await resolver.mx_hosts("long.test")
        assert dns_server.count("long.test") == 1
        clock.now += 2
        await resolver.mx_hosts("long.test")
        assert dns_server.count("long.test") == 2

    run(scenario)


def test_stalled_server_falls_back_within_the_deadline(dns_server: FakeDnsServer) -> None:
    """The answer comes after 30 s, 150 times the deadline: the fallback shows the deadline
    ended the wait (waiting on would have given "google"), not before its time."""
    dns_server.delay("slow.test", 30)

    async def scenario() -> tuple[str, float]:
        resolver = MxResolver(nameservers=[dns_server.address], deadline_s=0.2)
        started = time.monotonic()
        destination = await resolver.destination_of("slow.test", GROUPS)
        elapsed = time.monotonic() - started
        assert resolver.stats.failures == 1
        _, outcome = await resolver.lookup("slow.test")
        assert outcome is LookupOutcome.FAILED  # the failure is cached for a while
        return destination, elapsed

    destination, elapsed = run(scenario)
    assert destination == "slow.test"  # would be "google" if answered
    assert elapsed >= 0.15  # not given up before the deadline (slowness only adds)
    assert dns_server.count("slow.test") >= 1


def test_failure_is_cached_briefly_then_retried(dns_server: FakeDnsServer, clock: FakeClock) -> None:
    dns_server.servfail("flaky.test")

    async def scenario() -> None:
        resolver = resolver_for(dns_server, clock, failure_ttl_s=30)
        assert await resolver.lookup("flaky.test") == (None, LookupOutcome.FAILED)
        queries = dns_server.count("flaky.test")
        assert queries >= 1
        clock.now += 29
        assert await resolver.destination_of("flaky.test", GROUPS) == "flaky.test"
        assert dns_server.count("flaky.test") == queries
        dns_server.servfail("flaky.test", False)
        clock.now += 2
        assert await resolver.destination_of("flaky.test", GROUPS) == "google"

    run(scenario)


def test_stale_answer_served_while_dns_fails(dns_server: FakeDnsServer, clock: FakeClock) -> None:
    async def scenario() -> None:
        resolver = resolver_for(dns_server, clock, failure_ttl_s=30, stale_ttl_s=3600)
        assert await resolver.destination_of("flaky.test", GROUPS) == "google"
        dns_server.servfail("flaky.test")
        clock.now += 121  # expired: a refresh is tried, fails, the old answer stays
        assert await resolver.destination_of("flaky.test", GROUPS) == "google"
        assert resolver.stats.stale_served == 1
        clock.now += 3600  # beyond the stale window: the domain alone
        assert await resolver.destination_of("flaky.test", GROUPS) == "flaky.test"

    run(scenario)


def test_concurrent_lookups_share_one_query(dns_server: FakeDnsServer, clock: FakeClock) -> None:
    async def scenario() -> list[str]:
        resolver = resolver_for(dns_server, clock)
        return list(await asyncio.gather(
            *(resolver.destination_of("company.test", GROUPS) for _ in range(50))
        ))

    assert run(scenario) == ["google"] * 50
    assert dns_server.count("company.test") == 1


def test_cancelled_caller_does_not_cancel_the_shared_lookup(dns_server: FakeDnsServer) -> None:
    dns_server.delay("company.test", 1.0)  # still unanswered when the first is cancelled

    async def scenario() -> None:
        resolver = MxResolver(nameservers=[dns_server.address], deadline_s=30.0)
        first = asyncio.create_task(resolver.mx_hosts("company.test"))
        second = asyncio.create_task(resolver.mx_hosts("company.test"))
        await poll_async(lambda: resolver.stats.coalesced == 1, "both waiting on one lookup")
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second == ("aspmx.l.google.test", "alt1.aspmx.l.google.test")
        assert resolver.stats.queries == 1

    run(scenario)
    assert dns_server.count("company.test") == 1


def test_slow_answer_within_the_deadline_is_used(dns_server: FakeDnsServer) -> None:
    dns_server.delay("company.test", 0.05)

    async def scenario() -> str:
        resolver = MxResolver(nameservers=[dns_server.address], deadline_s=30.0)
        return await resolver.destination_of("company.test", GROUPS)

    assert run(scenario) == "google"

    run(scenario)


def test_aclose_cancels_lookups_in_flight(dns_server: FakeDnsServer) -> None:
    dns_server.stall("slow.test")

    async def scenario() -> None:
        resolver = MxResolver(nameservers=[dns_server.address], deadline_s=60.0)
        waiting = asyncio.create_task(resolver.destination_of("slow.test", GROUPS))
        await poll_async(lambda: dns_server.count("slow.test") >= 1, "the query sent")
        await resolver.aclose()
        assert await waiting == "slow.test"

    started = time.monotonic()
    run(scenario)
    assert time.monotonic() - started < 30  # not the 60 s deadline: aclose ended the wait


def test_cache_is_bounded_lru(dns_server: FakeDnsServer, clock: FakeClock) -> None:
    async def scenario() -> None:
        resolver = resolver_for(dns_server, clock, max_entries=2)
        await resolver.mx_hosts("gmail.test")
        await resolver.mx_hosts("company.test")
        await resolver.mx_hosts("gmail.test")  # gmail.test is now the most recent
        await resolver.mx_hosts("own.test")  # evicts company.test
        assert len(resolver) == 2
        assert resolver.stats.evictions == 1
        await resolver.mx_hosts("gmail.test")
        assert dns_server.count("gmail.test") == 1
        await resolver.mx_hosts("company.test")
        assert dns_server.count("company.test") == 2

    run(scenario)


@pytest.mark.parametrize("domain", ["", "[192.0.2.1]", "192.0.2.1", "2001:db8::1", "a..b",
                                    "x" * 64 + ".test"])
def test_no_lookup_for_what_is_no_domain(
    dns_server: FakeDnsServer, clock: FakeClock, domain: str
) -> None:
    async def scenario() -> str:
        resolver = resolver_for(dns_server, clock)
        return await resolver.destination_of(domain, GROUPS)

    assert run(scenario) == domain.lower()
    assert dns_server.queries == []


def test_no_lookup_without_mx_groups(dns_server: FakeDnsServer, clock: FakeClock) -> None:
    async def scenario() -> tuple[str, str]:
        resolver = resolver_for(dns_server, clock)
        groups = [g for g in GROUPS if not g.mx]
        return (await resolver.destination_of("gmail.test", groups),
                await resolver.destination_of("yahoo.test", groups))

    assert run(scenario) == ("gmail.test", "yahoo")
    assert dns_server.queries == []


def test_unreachable_nameserver_falls_back(clock: FakeClock) -> None:
    # a port nobody listens on: ICMP port unreachable or a timeout, never an exception
    with FakeDnsServer() as server:
        address = server.address
    resolver = MxResolver(nameservers=[address], deadline_s=0.2, clock=clock)

    async def scenario() -> str:
        return await resolver.destination_of("gmail.test", GROUPS)

    assert run(scenario) == "gmail.test"
    assert resolver.stats.failures == 1
