"""The engine through the decision service on the memory store, with a fixed clock."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Sequence

import pytest

from mqpolicy.decision.engine import Action, RuntimeState, classify, make_plan, not_applied_reason
from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.handler import postfix_action
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import Policy
from mqpolicy.policy.request import Request
from mqpolicy.store.budget import BucketState, BudgetCheck, Evaluation, StoreError
from mqpolicy.store.memory import MemoryStore
from tests.support.decision_service import BASE, service


def rcpt(sender: str = "alice@example.com", recipient: str = "bob@dest.example",
         **kw: object) -> Request:
    return Request(stage="RCPT", sender=sender, recipient=recipient,
                   client_address=str(kw.pop("client", "192.0.2.10")), **kw)  # type: ignore[arg-type]


def eom(sender: str = "alice@example.com", count: int = 1, size: int = 1000,
        queue_id: str = "", **kw: object) -> Request:
    return Request(stage="END-OF-MESSAGE", sender=sender, recipient_count=count, size=size,
                   queue_id=queue_id, client_address=str(kw.pop("client", "192.0.2.10")),
                   **kw)  # type: ignore[arg-type]


def run(svc: DecisionService, request: Request):  # type: ignore[no-untyped-def]
    return asyncio.run(svc.decide(request))


def run_all(svc: DecisionService, requests: Sequence[Request]) -> list[object]:
    async def go() -> list[object]:
        return [await svc.decide(r) for r in requests]
    return asyncio.run(go())


# ---------------------------------------------------------------- classify


@pytest.mark.parametrize(
    ("request_", "lane", "rule"),
    [
        (Request(sender="noreply@app.example"), "transactional", "resets"),
        (Request(sender="NoReply@App.Example"), "transactional", "resets"),
        (Request(sender="x@mail.news.example"), "bulk", "news"),
        (Request(sender="x@news.example"), "bulk", "news"),
        (Request(sender="x@othernews.example"), "normal", None),
        (Request(stage="END-OF-MESSAGE", sender="a@b.c", recipient_count=50), "bulk", "news"),
        (Request(stage="END-OF-MESSAGE", sender="a@b.c", recipient_count=49), "normal", None),
        (Request(sasl_username="scheduler"), "scheduled", "later"),
        (Request(sender=""), "normal", None),
    ],
)
def test_classify_first_match_wins(request_: Request, lane: str, rule: str | None) -> None:
    policy = parse_policy(BASE)
    chosen, rule_name = classify(request_, policy)
    assert (chosen.name, rule_name) == (lane, rule)


@pytest.mark.parametrize(
    ("when", "matching", "other"),
    [
        ("{client_address: [192.0.2.0/24, '2001:db8::/32']}",
         Request(client_address="2001:db8::5"), Request(client_address="198.51.100.1")),
        ("{client_address: 192.0.2.0/24}",
         Request(client_address="192.0.2.77"), Request(client_address="not-an-ip")),
        ("{helo_name: '*.example.net'}", Request(helo_name="mx1.Example.NET"),
         Request(helo_name="example.net")),
        ("{client_name: '/^mail[0-9]+\\./'}", Request(client_name="mail12.x.org"),
         Request(client_name="mailx.x.org")),
        ("{authenticated: true}", Request(sasl_username="u"), Request()),
        ("{authenticated: false}", Request(), Request(sasl_username="u")),
        ("{size: {min: 1MB}}", Request(size=2_000_000), Request(size=999_999)),
        ("{protocol_state: [rcpt]}", Request(stage="RCPT"), Request(stage="END-OF-MESSAGE")),
        ("{recipient: {domain: [gmail.com]}}", Request(recipient="x@GMAIL.com"),
         Request(recipient="x@gmail.com.evil")),
        ("{recipient: '@gmail.com'}", Request(recipients=("a@b.c", "d@gmail.com")),
         Request(recipients=("a@b.c",))),
        ("{sender: {regex: '^bounce-'}}", Request(sender="bounce-1@x"), Request(sender="a@x")),
        ("{not: {sender: '@x.org'}}", Request(sender="a@y.org"), Request(sender="a@x.org")),
        ("{all: [{sender: '@x.org'}, {authenticated: true}]}",
         Request(sender="a@x.org", sasl_username="u"), Request(sender="a@x.org")),
        ("{header: {name: Precedence, regex: '^bulk$'}}",
         Request(headers=(("precedence", "bulk"),)), Request(headers=None)),
        ("{header_present: List-Unsubscribe}",
         Request(headers=(("List-Unsubscribe", "<mailto:u@x>"),)), Request(headers=())),
    ],
)
def test_conditions(when: str, matching: Request, other: Request) -> None:
    policy = parse_policy(BASE.replace('when: {sender: "noreply@app.example"}', f"when: {when}"))
    assert classify(matching, policy)[0].name == "transactional"
    assert classify(other, policy)[0].name != "transactional"


# ---------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("key", "request_", "value"),
    [
        ("sender", rcpt(sender="Alice@Example.COM"), "alice@example.com"),
        ("sender_domain", rcpt(sender="a@Sub.Example.com"), "sub.example.com"),
        ("sasl_username", rcpt(sasl_username="Bob"), "bob"),
        ("client_address", rcpt(client="192.0.2.10"), "192.0.2.10"),
        ("client_network", rcpt(client="192.0.2.10"), "192.0.2.0/24"),
        ("client_network/16", rcpt(client="192.0.2.10"), "192.0.0.0/16"),
        ("client_network", rcpt(client="2001:db8:1:2:3::4"), "2001:db8:1:2::/64"),
        ("client_network/24/48", rcpt(client="2001:db8:1:2:3::4"), "2001:db8:1::/48"),
        ("helo_name", rcpt(helo_name="MX.example"), "mx.example"),
        ("client_name", rcpt(client_name="Host.example"), "host.example"),
        ("recipient", rcpt(recipient="Bob@Dest.Example"), "bob@dest.example"),
        ("recipient_domain", rcpt(recipient="bob@Dest.Example"), "dest.example"),
        ("destination", rcpt(recipient="bob@dest.example"), "dest.example"),
        ("[sasl_username, recipient_domain]", rcpt(sasl_username="u", recipient="b@d.example"),
         "u|d.example"),
    ],
)
def test_key_values(key: str, request_: Request, value: str) -> None:
    svc, _ = service(f"- {{name: l, rate: 10/1h, key: {key}}}\n")
    plan = make_plan(request_, svc.policy)
    assert [p.key for p in plan.limits] == [value]
    assert plan.limits[0].check.key == f"rl:l:10/3600000/10/v2:{value}"


@pytest.mark.parametrize("key", ["sasl_username", "sender", "client_network", "helo_name"])
def test_limit_skipped_when_key_part_missing(key: str) -> None:
    svc, _ = service(f"- {{name: l, rate: 10/1h, key: {key}}}\n")
    request = Request(stage="RCPT", sender="", recipient="b@d.example", client_address="unknown")
    assert make_plan(request, svc.policy).limits == ()


# ---------------------------------------------------------------- actions


def test_defer_when_spent_with_retry_hint_and_nothing_spent_meanwhile() -> None:
    svc, clock = service("""\
        - {name: per-sender, rate: 2/1m, key: sender, count: messages}
        - {name: per-client, rate: 100/1m, key: client_address, count: messages}
        """)
    results = run_all(svc, [eom(queue_id=f"Q{i}") for i in range(3)])
    actions = [r.action for r in results]  # type: ignore[attr-defined]
    assert actions == [Action.ACCEPT, Action.ACCEPT, Action.DEFER]
    deferred = results[2]
    assert deferred.deciding == "per-sender"  # type: ignore[attr-defined]
    assert 29_000 < deferred.retry_after_ms <= 30_000  # type: ignore[attr-defined]
    reply = postfix_action(deferred)  # type: ignore[arg-type]
    assert reply.startswith("450 4.7.1 Rate limit per-sender reached for alice@example.com")
    assert reply.endswith("try again in 30s")
    client = next(o for o in deferred.limits if o.name == "per-client")  # type: ignore[attr-defined]
    assert client.allowed
    assert not client.spent
    assert client.remaining == 98  # 100 - 2 spent; the deferred message spent nothing
    clock.now += 30_000
    assert run(svc, eom(queue_id="Q9")).action is Action.ACCEPT


def test_custom_message_template() -> None:
    svc, _ = service("""\
        - name: quota
          rate: 1/1d
          key: sasl_username
          action: reject
          message: "{key} used today's {rate}; {remaining} left"
        """)
    run(svc, eom(sasl_username="carol"))
    verdict = run(svc, eom(sasl_username="carol", queue_id="2"))
    assert verdict.action is Action.REJECT
    assert postfix_action(verdict) == "550 5.7.1 carol used today's 1/1d; 0 left"


def test_hold_action() -> None:
    svc, _ = service("- {name: l, rate: 1/1h, key: sender, action: hold}\n")
    run(svc, eom(queue_id="1"))
    verdict = run(svc, eom(queue_id="2"))
    assert verdict.action is Action.HOLD
    assert postfix_action(verdict) == "HOLD held by mqpolicy limit l"


def test_demote_moves_to_slower_lane_and_still_spends_the_others() -> None:
    svc, _ = service("""\
        - {name: fast-budget, rate: 1/1h, key: sender, action: {demote: bulk}}
        - {name: client, rate: 10/1h, key: client_address}
        """)
    first = run(svc, eom(queue_id="1"))
    assert (first.action, first.lane.name) == (Action.ACCEPT, "normal")
    second = run(svc, eom(queue_id="2"))
    assert (second.action, second.lane.name, second.classified_lane.name) == (
        Action.ACCEPT, "bulk", "normal")
    assert postfix_action(second) == "FILTER mq-bulk:"
    client = next(o for o in second.limits if o.name == "client")
    assert client.spent
    assert client.remaining == 8


def test_demote_never_promotes() -> None:
    svc, _ = service("- {name: l, rate: 1/1h, key: sender, action: {demote: normal}}\n")
    run(svc, eom(sender="x@news.example", queue_id="1"))
    verdict = run(svc, eom(sender="x@news.example", queue_id="2"))
    assert verdict.lane.name == "bulk"


def test_monitor_reports_but_changes_nothing() -> None:
    svc, _ = service("- {name: l, rate: 1/1h, key: sender, action: reject, monitor: true}\n")
    run(svc, eom(queue_id="1"))
    verdict = run(svc, eom(queue_id="2"))
    assert verdict.action is Action.ACCEPT
    (outcome,) = verdict.limits
    assert not outcome.allowed
    assert outcome.monitor
    assert svc.stats.limits_hit[("l", "monitor")] == 1


def test_severity_reject_beats_defer_beats_hold() -> None:
    svc, _ = service("""\
        - {name: h, rate: 1/1h, key: sender, action: hold}
        - {name: r, rate: 1/1h, key: client_address, action: reject}
        - {name: d, rate: 1/1h, key: sender_domain, action: defer}
        """)
    run(svc, eom(queue_id="1"))
    verdict = run(svc, eom(queue_id="2"))
    assert (verdict.action, verdict.deciding) == (Action.REJECT, "r")


def test_lane_scoped_limit_and_except() -> None:
    svc, _ = service("""\
        - name: bulk-only
          rate: 1/1h
          key: sender
          lanes: [bulk]
          except: {sender: vip@news.example}
        """)
    assert make_plan(eom(sender="a@example.com"), svc.policy).limits == ()
    assert len(make_plan(eom(sender="a@news.example"), svc.policy).limits) == 1
    assert make_plan(eom(sender="vip@news.example"), svc.policy).limits == ()


def test_hold_lane() -> None:
    svc, _ = service("[]\n")
    verdict = run(svc, eom(sasl_username="scheduler"))
    assert (verdict.action, verdict.deciding) == (Action.HOLD, "lane:scheduled")


def test_every_hold_names_what_held_it() -> None:
    """The hold text (Postfix's HOLD reason in its log, Sendmail's quarantine reason in
    ``mailq -qQ``) names the lane, the load or the limit that held the message."""
    svc, _ = service("- {name: one-a-day, rate: 1/1d, key: sender, action: hold}\n")
    assert postfix_action(run(svc, eom(sasl_username="scheduler"))) == \
        "HOLD held by mqpolicy lane scheduled"
    svc.runtime = RuntimeState(waiting_lanes=frozenset({"bulk"}))
    waiting = run(svc, eom(sender="x@news.example"))
    assert (waiting.action, waiting.deciding) == (Action.HOLD, "load")
    assert waiting.text == "held by mqpolicy load: lane bulk waits for the MTA's queues"
    svc.runtime = RuntimeState()
    assert run(svc, eom(sender="a@example.com", queue_id="Q1")).action is Action.ACCEPT
    limited = run(svc, eom(sender="a@example.com", queue_id="Q2"))
    assert limited.text == "held by mqpolicy limit one-a-day"


def test_accept_in_lane_with_own_transport_filters() -> None:
    svc, _ = service("[]\n")
    assert postfix_action(run(svc, rcpt(sender="noreply@app.example"))) == (
        "FILTER mq-transactional:")
    assert postfix_action(run(svc, rcpt())) == "DUNNO"


# ---------------------------------------------------------------- counting


def test_ten_recipient_message_counts_ten_recipients_and_one_message() -> None:
    svc, _ = service("""\
        - {name: msgs, rate: 100/1h, key: sender, count: messages}
        - {name: rcpts, rate: 100/1h, key: sender, count: recipients}
        - {name: bytes, rate: 1MB/1h, key: sender, count: bytes}
        - {name: per-domain, rate: 100/1h, key: recipient_domain, count: recipients}
        """)
    requests = [rcpt(recipient=f"u{i}@dest.example", instance="I1") for i in range(10)]
    verdicts = run_all(svc, [*requests, eom(count=10, size=20_000, queue_id="Q1",
                                             instance="I1")])
    for v in verdicts[:10]:
        checked = {o.name: o.counted for o in v.limits}  # type: ignore[attr-defined]
        assert checked == {"msgs": "checked", "rcpts": "checked", "bytes": "checked",
                           "per-domain": "1 recipients"}
    final = {o.name: o for o in verdicts[10].limits}  # type: ignore[attr-defined]
    assert set(final) == {"msgs", "rcpts", "bytes"}
    assert final["msgs"].remaining == 99
    assert final["rcpts"].remaining == 90
    assert final["bytes"].remaining == 1_000_000 - 20_000
    domain_state = asyncio.run(svc.store.inspect(["rl:per-domain:100/3600000/100/v2:dest.example"], svc.clock_ms()))
    assert domain_state[0] is not None
    per_domain = svc.policy.limits_by_name["per-domain"]
    now = svc.clock_ms()
    assert domain_state[0].free_units(per_domain.refill, per_domain.unit, 100, now) == 90
    assert domain_state[0].full_at_ms(per_domain.refill, now) == now + 10 * 36_000


def test_end_of_message_counted_once_per_queue_id() -> None:
    svc, _ = service("- {name: msgs, rate: 10/1h, key: sender}\n")
    first, again = run_all(svc, [eom(queue_id="ABC"), eom(queue_id="ABC")])
    assert first.limits[0].remaining == 9  # type: ignore[attr-defined]
    assert again.duplicate  # type: ignore[attr-defined]
    third = run(svc, eom(queue_id="DEF"))
    assert third.limits[0].remaining == 8


def test_rcpt_defers_early_when_sender_budget_is_spent() -> None:
    svc, _ = service("- {name: msgs, rate: 1/1h, key: sender}\n")
    assert run(svc, rcpt()).action is Action.ACCEPT
    run(svc, eom(queue_id="1"))
    verdict = run(svc, rcpt())
    assert verdict.action is Action.DEFER
    assert not verdict.limits[0].spent


def test_recipient_keyed_limit_defers_only_that_recipient() -> None:
    svc, _ = service("- {name: dom, rate: 2/1h, key: recipient_domain, count: recipients}\n")
    verdicts = run_all(svc, [rcpt(recipient=f"u{i}@slow.example") for i in range(3)]
                       + [rcpt(recipient="u@fast.example")])
    assert [v.action for v in verdicts] == [  # type: ignore[attr-defined]
        Action.ACCEPT, Action.ACCEPT, Action.DEFER, Action.ACCEPT]


# ---------------------------------------------------------------- store failures


class BrokenStore(MemoryStore):
    """Fails or stalls on evaluate like a store behind a network; else the memory store."""

    in_process = False

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    async def evaluate(self, checks: Sequence[BudgetCheck], now_ms: int,
                       once_key: str | None = None, once_ttl_ms: int = 0,
                       ledger_key: str | None = None) -> Evaluation:
        if self.mode == "error":
            raise StoreError("connection refused")
        await asyncio.sleep(60)  # 1,200 times the deadline: only a missing one gets here
        raise AssertionError("deadline not applied")

    async def inspect(self, keys: Sequence[str], now_ms: int) -> list[BucketState | None]:
        return []


@pytest.mark.parametrize("mode", ["error", "stall"])
@pytest.mark.parametrize(("on_error", "action", "reply"), [
    ("accept", Action.ACCEPT, "DUNNO"),
    ("defer", Action.DEFER, "451 4.3.0 Policy store unavailable, try again later"),
])
def test_store_failure_follows_on_store_error(mode: str, on_error: str, action: Action,
                                              reply: str) -> None:
    policy: Policy = parse_policy(BASE + f"store: {{on_store_error: {on_error}, timeout_ms: 50}}\n"
                                  "limits:\n  - {name: l, rate: 1/1h, key: sender}\n")
    svc = DecisionService(policy, BrokenStore(mode))

    verdict = asyncio.run(svc.decide(eom()))
    assert verdict.action is action
    assert verdict.store_error
    assert postfix_action(verdict) == reply
    failures = (svc.stats.store_errors, svc.stats.store_timeouts)
    assert failures == ((1, 0) if mode == "error" else (0, 1))  # a stall ends at the deadline


def test_per_limit_on_store_error_overrides_store_default() -> None:
    policy = parse_policy(BASE + "limits:\n  - {name: l, rate: 1/1h, key: sender, "
                          "on_store_error: defer}\n  - {name: m, rate: 1/1h, key: client_address}\n")
    svc = DecisionService(policy, BrokenStore("error"))
    verdict = asyncio.run(svc.decide(eom()))
    assert (verdict.action, verdict.deciding) == (Action.DEFER, "l")


def test_dry_run_spends_nothing() -> None:
    svc, _ = service("- {name: l, rate: 1/1h, key: sender}\n")
    for _ in range(3):
        verdict = asyncio.run(svc.decide(eom(queue_id="Q"), consume=False))
        assert verdict.action is Action.ACCEPT
        assert not verdict.limits[0].spent


def test_mail_that_waits_spends_its_recipient_budgets_at_release_not_twice() -> None:
    svc, _ = service("- {name: dom, rate: 1/1h, key: recipient_domain, count: recipients}\n")
    held = rcpt(recipient="u@d.example")._replace(sasl_username="scheduler")  # a hold lane
    verdicts = run_all(svc, [held, held])
    assert [v.limits[0].counted for v in verdicts] == ["checked", "checked"]  # type: ignore[attr-defined]
    plan = make_plan(held, svc.policy, lane=svc.policy.lane("scheduled"), releasing=True)
    assert plan.limits[0].check.consume
    assert plan.rule is None  # given a lane, nothing is classified
    svc.runtime = RuntimeState(waiting_lanes=frozenset({"bulk"}))
    waiting = rcpt(sender="x@news.example", recipient="v@d.example")
    assert make_plan(waiting, svc.policy, svc.runtime).limits[0].check.consume is False


def test_rules_and_limits_that_look_at_headers_are_left_to_the_milter() -> None:
    policy = parse_policy(BASE.replace('''  - name: news
    when:
      any:
        - sender: "@.news.example"''', '''  - name: news
    when:
      sender: "@.news.example"
      not: {priority: high}
    lane: bulk
  - name: news-count
    when:
      any:
        - sender: "@never.example"''') + """\
limits:
  - {name: lists, rate: 1/1h, key: sender, when: {bulk_signals: true}}
  - {name: plain, rate: 1/1h, key: sender, except: {header_present: X-Campaign}}
  - {name: envelope, rate: 1/1h, key: sender}
""")
    envelope_only = Request(stage="RCPT", sender="x@news.example", recipient="a@b.example")
    # the policy server cannot know the priority: the rule is skipped, not guessed
    assert classify(envelope_only, policy) == (policy.lane("normal"), None)
    assert [p.limit.name for p in make_plan(envelope_only, policy).limits] == ["envelope"]
    urgent = envelope_only._replace(headers=(("X-Priority", "1"),))
    assert classify(urgent, policy)[0].name == "normal"
    plain = envelope_only._replace(headers=(("Subject", "hi"),))
    assert classify(plain, policy) == (policy.lane("bulk"), "news")
    assert [p.limit.name for p in make_plan(plain, policy).limits] == ["plain", "envelope"]


def test_store_failure_never_sends_mail_of_a_hold_lane_on() -> None:
    policy = parse_policy(BASE + "limits:\n  - {name: l, rate: 1/1h, key: sender}\n")
    svc = DecisionService(policy, BrokenStore("error"))
    verdict = asyncio.run(svc.decide(eom(sasl_username="scheduler")))
    assert (verdict.action, verdict.deciding, verdict.store_error) == (
        Action.DEFER, "lane:scheduled", True)
    assert postfix_action(verdict) == "451 4.3.0 Policy store unavailable, try again later"


# ---------------------------------------------------------------- requests


def test_request_from_policy_attributes_maps_every_attribute() -> None:
    attrs = {
        "protocol_state": "end-of-message", "client_address": "192.0.2.1",
        "client_name": "mx.example.net", "reverse_client_name": "rev.example.net",
        "helo_name": "helo.example.net", "sasl_username": "alice", "sender": "a@example.com",
        "recipient": "b@example.org", "recipient_count": "3", "size": "1200",
        "queue_id": "4AbC", "instance": "1a.2b", "protocol_name": "ESMTP",
        "request": "smtpd_access_policy", "stress": "",
    }
    assert Request.from_policy_attributes(attrs) == Request(
        stage="END-OF-MESSAGE", client_address="192.0.2.1", client_name="mx.example.net",
        reverse_client_name="rev.example.net", helo_name="helo.example.net",
        sasl_username="alice", sender="a@example.com", recipient="b@example.org",
        recipient_count=3, size=1200, queue_id="4AbC", instance="1a.2b",
        protocol_name="ESMTP")


@pytest.mark.parametrize(("value", "expected"), [
    ("", 0), ("0", 0), ("17", 17), ("-5", 0), ("x", 0), ("²", 0), ("+4", 4), (" 9", 9),
    ("9" * 5000, 0),  # more digits than int() converts: not an error
])
def test_request_numbers_are_never_negative_or_errors(value: str, expected: int) -> None:
    request = Request.from_policy_attributes({"size": value, "recipient_count": value})
    assert (request.size, request.recipient_count) == (expected, expected)
    assert Request.from_policy_attributes({}).stage == "RCPT"


def test_make_plan_plans_exactly_the_limits_no_reason_keeps_out() -> None:
    """make_plan inlines not_applied_reason's tests for speed: over every kind of limit
    and request, the limits it plans are those for which no reason is given."""
    policy = parse_policy(textwrap.dedent("""\
        lanes: [{name: normal}, {name: bulk}]
        default_lane: normal
        classify:
          - {name: news, when: {sender: "@news.example"}, lane: bulk}
        limits:
          - {name: per-sender, rate: 10/1h, key: sender}
          - {name: per-domain, rate: 10/1h, key: recipient_domain, count: recipients}
          - {name: bulk-only, rate: 10/1h, key: sender, lanes: [bulk]}
          - {name: from-app, rate: 10/1h, key: sender, when: {sender: "@app.example"}}
          - {name: not-vip, rate: 10/1h, key: sender, except: {sender: "vip@example.com"}}
          - {name: lists, rate: 10/1h, key: sender, when: {header_present: List-Id}}
          - {name: per-login, rate: 10/1h, key: sasl_username}
        destinations:
          - {name: slowmail, domains: [slow.example], rate: 10/1m}
          - {name: bulkmail, domains: [bulky.example], rate: 10/1m, lanes: [bulk]}
        """))
    groups = {"slow.example": "slowmail", "bulky.example": "bulkmail"}
    requests = []
    for sender in ("a@app.example", "vip@example.com", "n@news.example", ""):
        for recipient in ("u@slow.example", "u@bulky.example", "u@d.example", ""):
            for headers in (None, (("List-Id", "<l.example>"),), ()):
                for login in ("", "alice"):
                    destination = groups.get(recipient.partition("@")[2], "")
                    common = {"sender": sender, "recipient": recipient, "headers": headers,
                              "sasl_username": login, "destination": destination}
                    requests += [Request(stage="RCPT", **common),  # type: ignore[arg-type]
                                 Request(stage="END-OF-MESSAGE", recipient_count=1,
                                         **common)]  # type: ignore[arg-type]
    planned_some = kept_out_some = 0
    for request in requests:
        plan = make_plan(request, policy)
        planned = {p.limit.name for p in plan.limits}
        no_reason = {limit.name for limit in policy.limits
                     if not_applied_reason(limit, plan.lane, request) is None}
        assert planned == no_reason, request
        planned_some += bool(planned)
        kept_out_some += len(policy.limits) - len(planned)
    assert planned_some and kept_out_some  # the grid has both


def test_each_reason_a_limit_does_not_count_a_request_is_named() -> None:
    policy = parse_policy(textwrap.dedent("""\
        lanes: [{name: normal}, {name: bulk}]
        default_lane: normal
        limits:
          - {name: bulk-only, rate: 10/1h, key: sender, lanes: [bulk]}
          - {name: from-app, rate: 10/1h, key: sender, when: {sender: "@app.example"}}
          - {name: not-vip, rate: 10/1h, key: sender, except: {sender: "vip@example.com"}}
          - {name: lists, rate: 10/1h, key: sender, when: {header_present: List-Id}}
        """))
    normal = policy.lane("normal")
    limits = {limit.name: limit for limit in policy.limits}
    vip = rcpt(sender="vip@example.com")
    assert not_applied_reason(limits["bulk-only"], normal, vip) == "lanes bulk only"
    assert not_applied_reason(limits["from-app"], normal, vip) == "when does not match"
    assert not_applied_reason(limits["not-vip"], normal, vip) == "except matches"
    assert not_applied_reason(limits["not-vip"], normal, rcpt()) is None
    assert not_applied_reason(limits["lists"], normal, vip) == \
        "looks at headers: the milter applies it"
