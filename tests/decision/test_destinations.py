"""Destinations end to end inside mqpolicy: config, MX rollup through the decision service
(a local DNS server), backoff scaling the budget, and the feedback loop from log lines."""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest

from mqpolicy.decision.engine import Action, RuntimeState, make_plan, not_applied_reason
from mqpolicy.decision.mx_resolver import MxResolver
from mqpolicy.decision.runtime_state import RuntimeRefresher
from mqpolicy.decision.service import DecisionService
from mqpolicy.feedback.follower import FeedbackService
from mqpolicy.lab.readiness import READY_TIMEOUT_S
from mqpolicy.policy.loader import ConfigError, parse_policy
from mqpolicy.policy.model import Policy
from mqpolicy.policy.request import Request
from mqpolicy.store.backoff_states import MemoryBackoffStore, RedisBackoffStore
from mqpolicy.store.memory import MemoryStore
from tests.support.async_poll import poll_async
from tests.support.dns_fixture import FakeDnsServer
from tests.support.redis_fixture import RedisServer
from tests.support.redis_ha_fixture import RedisClusterHarness, RedisSentinelHarness

POLICY = """\
lanes: [{name: normal}, {name: bulk, transport: mq-bulk}]
default_lane: normal
destinations:
  - name: google
    mx: "*.google.test"
    rate: 4/1h
  - name: yahoo
    domains: [yahoo.test, "*.yahoo.test"]
    rate: 2/1h
    action: hold
feedback:
  log: /nonexistent/maillog
  backoff: {decrease: 0.5, cooldown: 0s, recover_after: 2, recover_interval: 0s,
            recover_step: 0.5}
"""

ZONE = {
    "gmail.test": {"MX": [(5, "gmail-smtp-in.l.google.test")]},
    "company.test": {"MX": [(1, "aspmx.l.google.test")]},
    "own.test": {"MX": [(10, "mail.own.test")]},
}

GMAIL_421 = (
    "Nov 27 20:52:09 mta postfix/smtp[368]: B084820C4AA: to=<u{n}@gmail.test>, "
    "relay=gmail-smtp-in.l.google.test[192.0.2.25]:25, delay=0.06, "
    "delays=0.01/0.03/0.01/0.01, dsn=4.7.28, status=deferred (host "
    "gmail-smtp-in.l.google.test[192.0.2.25] said: 421-4.7.28 Our system has detected an "
    "unusual rate of 421-4.7.28 unsolicited mail originating from your IP address. "
    "(in reply to RCPT TO command))"
)
GMAIL_SENT = (
    "Nov 27 20:53:09 mta postfix/smtp[368]: C084820C4AB: to=<u{n}@gmail.test>, "
    "relay=gmail-smtp-in.l.google.test[192.0.2.25]:25, delay=0.2, delays=0.01/0/0.1/0.1, "
    "dsn=2.0.0, status=sent (250 2.0.0 OK  1700000000 a1si1 - gsmtp)"
)


def rcpt(recipient: str) -> Request:
    return Request(stage="RCPT", sender="a@example.com", recipient=recipient,
                   client_address="192.0.2.1")


@pytest.fixture
def dns() -> Iterator[FakeDnsServer]:
    with FakeDnsServer(ZONE) as server:
        yield server


def service_with_dns(dns: FakeDnsServer, text: str = POLICY) -> DecisionService:
    policy = parse_policy(text + f"dns: {{nameservers: ['{dns.address[0]}:{dns.address[1]}']}}\n")
    resolver = MxResolver(nameservers=policy.dns.nameservers, deadline_s=1.0)
    return DecisionService(policy, MemoryStore(), resolver=resolver)


@pytest.mark.parametrize(("body", "expected"), [
    ("  - {name: g.com, mx: '*.google.test', rate: 1/1h}\n", "destinations[g.com].name"),
    ("  - {name: g, rate: 1/1h}\n", "a destination needs domains or mx patterns"),
    ("  - {name: g, mx: '*.google.test'}\n", "a destination needs a rate"),
    ("  - {name: g, mx: 'bad pattern', rate: 1/1h}\n", "destinations[g]"),
    ("  - {name: g, domains: x.test, rate: 1/1h, colour: red}\n", "destinations[g].colour"),
    ("  - {name: g, domains: {x: 1}, rate: 1/1h}\n",
     "destinations[g].domains: expected a pattern or a list of patterns"),
])
def test_destination_config_errors(body: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy("destinations:\n" + body, "p.yaml")
    assert expected in str(info.value)
    assert "p.yaml:2" in str(info.value)


def test_destinations_become_recipient_keyed_limits() -> None:
    policy = parse_policy(POLICY)
    limits = {limit.name: limit for limit in policy.limits}
    google = limits["destination:google"]
    assert google.recipient_keyed
    assert google.destination == "google"
    assert limits["destination:yahoo"].destination == "yahoo"
    # the front-end resolves the destination before planning
    plan = make_plan(rcpt("u@sub.yahoo.test")._replace(destination="yahoo"), policy)
    assert [(p.limit.name, p.key) for p in plan.limits] == [("destination:yahoo", "yahoo")]
    assert make_plan(rcpt("u@own.test"), policy).limits == ()  # no destination, no budget
    svc = DecisionService(policy, MemoryStore())
    assert asyncio.run(svc.destination_of("Sub.Yahoo.Test.")) == "yahoo"
    assert asyncio.run(svc.destination_of("own.test")) == "own.test"


def test_a_destination_budget_applies_only_in_its_lanes() -> None:
    policy = parse_policy("""\
lanes: [{name: normal}, {name: bulk, transport: mq-bulk}]
default_lane: normal
classify:
  - {name: news, when: {sender: "@news.example"}, lane: bulk}
destinations:
  - {name: yahoo, domains: [yahoo.test], rate: 2/1h, lanes: [bulk]}
""")
    normal = rcpt("u@yahoo.test")._replace(destination="yahoo")
    bulk = normal._replace(sender="letter@news.example")
    assert make_plan(normal, policy).limits == ()
    assert [p.limit.name for p in make_plan(bulk, policy).limits] == ["destination:yahoo"]


def test_a_destination_budget_applies_to_its_own_destination_only() -> None:
    policy = parse_policy(POLICY)
    yahoo = {limit.name: limit for limit in policy.limits}["destination:yahoo"]
    normal = policy.lane("normal")
    # the front-end resolves the destination group before the engine sees the request
    resolved = rcpt("u@sub.yahoo.test")._replace(destination="yahoo")
    assert not_applied_reason(yahoo, normal, resolved) is None
    elsewhere = "destination yahoo only"
    # not resolved: the domain
    assert not_applied_reason(yahoo, normal, rcpt("u@yahoo.test")) == elsewhere
    assert not_applied_reason(
        yahoo, normal, rcpt("u@own.test")._replace(destination="own.test")) == elsewhere


def test_domains_at_one_mx_provider_share_one_budget(dns: FakeDnsServer) -> None:
    svc = service_with_dns(dns)

    async def go() -> list[tuple[str, str]]:
        out = []
        for recipient in ["a@gmail.test", "b@company.test", "c@gmail.test", "d@company.test",
                          "e@company.test", "f@own.test"]:
            verdict = await svc.decide(rcpt(recipient))
            out.append((verdict.action.value, ",".join(o.key for o in verdict.limits)))
        assert svc.resolver is not None
        await svc.resolver.aclose()
        return out

    assert asyncio.run(go()) == [
        ("accept", "google"), ("accept", "google"), ("accept", "google"), ("accept", "google"),
        ("defer", "google"), ("accept", ""),
    ]
    # each decided on the loop (the MX lookup), after decide_now gave up: counted once each
    assert sum(svc.stats.decisions.values()) == 6
    assert svc.stats.decision_latency.snapshot().cumulative[-1] == 6


def test_dns_down_falls_back_to_the_domain_without_blocking(dns: FakeDnsServer) -> None:
    """DNS that answers only after 30 s (300 times the resolver's 0.1 s deadline): the
    decision is made on the domain alone, so it did not wait for the answer (which would
    have put gmail.test in the google group), however slow the machine."""
    dns.delay("gmail.test", 30)
    svc = service_with_dns(dns)
    svc.resolver = MxResolver(nameservers=[dns.address], deadline_s=0.1)
    svc._destinations.resolver = svc.resolver

    async def go() -> tuple[str, list[str]]:
        verdict = await svc.decide(rcpt("a@gmail.test"))
        assert svc.resolver is not None
        await svc.resolver.aclose()
        return verdict.action.value, [o.key for o in verdict.limits]

    action, keys = asyncio.run(go())
    assert action == "accept"
    assert keys == []  # gmail.test alone is no destination of the policy
    assert dns.count("gmail.test") >= 1  # it did ask


def test_backoff_factor_cuts_the_budget_without_resetting_it() -> None:
    policy = parse_policy(POLICY)
    now = [1_000_000]
    svc = DecisionService(policy, MemoryStore(), clock_ms=lambda: now[0])

    async def go(factor: float, n: int) -> list[Action]:
        svc.runtime = RuntimeState(MappingProxyType({"yahoo": factor}))
        return [(await svc.decide(rcpt(f"u{i}@yahoo.test"))).action for i in range(n)]

    # yahoo: 2/1h (one per 30 min, burst 2); at factor 0.5: one per hour, burst 1
    assert asyncio.run(go(0.5, 2)) == [Action.ACCEPT, Action.HOLD]
    # back to 1.0 the bucket is the same: the recipient sent under backoff took its
    # one-hour slot, which is the whole normal burst, so the next one waits 30 minutes
    assert asyncio.run(go(1.0, 1)) == [Action.HOLD]
    now[0] += 1_800_000
    assert asyncio.run(go(1.0, 2)) == [Action.ACCEPT, Action.HOLD]


def test_waiting_lanes_hold_lower_lanes_never_the_highest() -> None:
    policy = parse_policy(POLICY.replace("default_lane: normal", "default_lane: bulk"))
    svc = DecisionService(policy, MemoryStore())
    svc.runtime = RuntimeState(waiting_lanes=frozenset({"bulk", "normal"}))
    verdict = asyncio.run(svc.decide(rcpt("x@own.test")))
    assert (verdict.action, verdict.deciding) == (Action.HOLD, "load")
    policy = parse_policy(POLICY)  # default lane: normal, the highest
    svc = DecisionService(policy, MemoryStore())
    svc.runtime = RuntimeState(waiting_lanes=frozenset({"normal"}))
    assert asyncio.run(svc.decide(rcpt("x@own.test"))).action is Action.ACCEPT


def feedback_for(policy: Policy, store: MemoryBackoffStore | RedisBackoffStore,
                 svc: DecisionService) -> FeedbackService:
    return FeedbackService(lambda: policy, store, svc.destination_of, clock_ms=lambda: 0)


def test_feedback_backs_off_and_recovers(dns: FakeDnsServer) -> None:
    svc = service_with_dns(dns)
    store = MemoryBackoffStore()
    feedback = feedback_for(svc.policy, store, svc)

    async def go() -> list[float]:
        factors = []
        await feedback.handle_line(GMAIL_421.format(n=1))
        factors.append((await store.factors())["google"])
        await feedback.handle_line(GMAIL_421.format(n=2))
        factors.append((await store.factors())["google"])
        for n in range(2):
            await feedback.handle_line(GMAIL_SENT.format(n=n))
        factors.append((await store.factors()).get("google", 1.0))
        for n in range(2):
            await feedback.handle_line(GMAIL_SENT.format(n=n))
        factors.append((await store.factors()).get("google", 1.0))
        # an unrelated line, a result for an unconfigured domain: no change
        await feedback.handle_line("Nov 27 20:52:09 mta postfix/qmgr[1]: ABC: removed")
        await feedback.handle_line(GMAIL_421.format(n=3).replace("gmail.test", "own.test"))
        assert svc.resolver is not None
        await svc.resolver.aclose()
        return factors

    assert asyncio.run(go()) == [0.5, 0.25, 0.75, 1.0]
    assert feedback.stats.changes == 4
    states = asyncio.run(store.states())
    assert "own.test" not in states


def test_success_of_a_destination_never_backed_off_writes_nothing() -> None:
    policy = parse_policy(POLICY)
    store = MemoryBackoffStore()
    feedback = feedback_for(policy, store, DecisionService(policy, MemoryStore()))
    yahoo_sent = GMAIL_SENT.replace("gmail.test", "yahoo.test")

    async def go() -> None:
        for n in range(5):
            assert await feedback.handle_line(yahoo_sent.format(n=n)) is None
        assert await store.states() == {}  # nothing to count for a destination at 1
        # once backed off, its successes count
        await feedback.handle_line(GMAIL_421.replace("gmail.test", "yahoo.test").format(n=1))
        assert (await store.factors()) == {"yahoo": 0.5}

    asyncio.run(go())
    assert feedback.stats.changes == 1


def test_feedback_follows_the_log_and_decisions_follow_the_factor(tmp_path: Path) -> None:
    log = tmp_path / "maillog"
    log.write_text("")
    text = POLICY.replace("/nonexistent/maillog", str(log)).replace(
        "rate: 2/1h\n", "rate: 4/1h\n").replace("feedback:", "feedback:\n  poll_interval: 50ms")
    policy = parse_policy(text)
    svc = DecisionService(policy, MemoryStore())
    store = MemoryBackoffStore()
    feedback = FeedbackService(lambda: policy, store, svc.destination_of, clock_ms=lambda: 0)
    refresher = RuntimeRefresher(svc, store, interval_s=0.05)
    yahoo_421 = GMAIL_421.replace("gmail.test", "yahoo.test")

    async def go() -> list[Action]:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(feedback.follow(stop)), asyncio.create_task(refresher.run(stop))]
        # The follower opens the log at its end whenever it gets to: lines that change
        # nothing, appended until it has read one, say it is reading.
        give_up = time.monotonic() + READY_TIMEOUT_S
        while feedback.stats.lines == 0:
            assert time.monotonic() < give_up, "the follower read no line"
            with log.open("a") as f:
                f.write("Nov 27 20:52:09 mta postfix/qmgr[1]: B084820C4AA: removed\n")
            await asyncio.sleep(0.05)  # between lines
        with log.open("a") as f:
            f.write(yahoo_421.format(n=1) + "\n")
        await poll_async(lambda: svc.runtime.backoff.get("yahoo") == 0.5, "yahoo backed off")
        actions = [(await svc.decide(rcpt(f"u{i}@yahoo.test"))).action for i in range(3)]
        stop.set()
        await asyncio.gather(*tasks)
        return actions

    # yahoo 4/1h halved: a burst of 2, then held
    assert asyncio.run(go()) == [Action.ACCEPT, Action.ACCEPT, Action.HOLD]


def test_redis_backoff_store_updates_atomically(redis_clean: RedisServer) -> None:
    from mqpolicy.policy.backoff import BackoffSettings, on_slow_down

    settings = BackoffSettings(decrease=0.9, cooldown_ms=0, min_factor=0.001)

    async def go() -> float:
        stores = [RedisBackoffStore(redis_clean.unix_url) for _ in range(4)]

        async def hit(store: RedisBackoffStore, i: int) -> None:
            await store.update("google", lambda s: on_slow_down(
                s, settings, now_ms=1000, reason=f"421 #{i}", destination="google"))

        await asyncio.gather(*(hit(stores[i % 4], i) for i in range(40)))
        factor = (await stores[0].factors())["google"]
        for store in stores:
            await store.close()
        return factor

    # 40 decreases of 0.9 each, none lost to a race: 0.9 ** 40
    assert asyncio.run(go()) == pytest.approx(0.9 ** 40, rel=1e-3)


def test_feedback_section_errors() -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(textwrap.dedent("""\
            feedback:
              log: relative/maillog
              slow_down_patterns: ["(unclosed"]
              backoff: {decrease: 2}
            """), "p.yaml")
    text = str(info.value)
    assert "p.yaml:2: feedback.log: expected an absolute path" in text
    assert "p.yaml:3: feedback.slow_down_patterns: bad regex" in text
    assert "p.yaml:4: feedback.backoff: decrease must be between 0 and 1" in text
    with pytest.raises(ConfigError) as info:
        parse_policy("feedback:\n  slow_down_patterns: {a: 1}\n", "p.yaml")
    assert "p.yaml:2: feedback.slow_down_patterns: expected a list of regexes" in str(info.value)


def _forty_updates(url: str) -> float:
    from mqpolicy.policy.backoff import BackoffSettings, on_slow_down
    from mqpolicy.store.opener import open_backoff_store

    settings = BackoffSettings(decrease=0.9, cooldown_ms=0, min_factor=0.001)

    async def go() -> float:
        stores = [open_backoff_store(url, key_prefix="mqbo:") for _ in range(2)]

        async def hit(i: int) -> None:
            await stores[i % 2].update("google", lambda s: on_slow_down(
                s, settings, now_ms=1000, reason=f"421 #{i}", destination="google"))

        await asyncio.gather(*(hit(i) for i in range(40)))
        factor = (await stores[0].factors())["google"]
        for store in stores:
            await store.close()
        return factor

    return asyncio.run(go())


@pytest.mark.e2e
def test_backoff_states_on_a_redis_cluster(redis_cluster: RedisClusterHarness) -> None:
    assert _forty_updates(redis_cluster.url) == pytest.approx(0.9 ** 40, rel=1e-3)


@pytest.mark.e2e
def test_backoff_states_on_a_sentinel_master(redis_sentinel: RedisSentinelHarness) -> None:
    assert _forty_updates(redis_sentinel.url) == pytest.approx(0.9 ** 40, rel=1e-3)
