"""The decision engine. Pure: no I/O, no clock, no globals.

A decision has two steps around one store round trip::

    plan = make_plan(request, policy)              # lane + the budget checks to run
    evaluation = await store.evaluate(...)         # done by the caller (I/O)
    verdict = decide(plan, evaluation, policy)     # action, lane, reasons

Counting rules (see README "How counting works"):

* recipient-keyed limits (recipient, recipient_domain, destination) are spent per
  recipient at RCPT (the plan names the message's ledger, for a give-back); those with
  lanes or header conditions at the end of the message instead, one unit per recipient,
  in the final lane;
* every other limit is only *checked* before END-OF-MESSAGE (so an exhausted sender is
  deferred at RCPT already) and spent once per message at END-OF-MESSAGE, where the final
  recipient count and size are known; a ``once_key`` (queue id, else instance) keeps a
  message from being counted twice when several front-ends see it;
* wiring B (``Policy.end_checks_only``): the policy server's END-OF-MESSAGE plan only
  checks (``Plan.checks_only``: no spend, no once key, no hold, nothing lane-scoped) and
  the milter spends;
* a decision that defers, holds or rejects spends nothing (all-or-nothing in the store);
  a cost larger than a blocking limit's burst never fits: ``oversize`` rejects or holds;
* a possible demotion plans the target lane's limits, counted only if the demote check
  fails (:func:`_with_demotion`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType
from typing import NamedTuple

from mqpolicy.policy.backoff import scale_budget
from mqpolicy.policy.keys import escape_key_part, escape_surrogates, readable_key
from mqpolicy.policy.model import (
    ActionKind,
    Count,
    Lane,
    Limit,
    Oversize,
    Policy,
    StoreErrorMode,
)
from mqpolicy.policy.request import (
    STAGE_END_OF_MESSAGE,
    STAGE_RCPT,
    Request,
    recipient_destination,
)
from mqpolicy.store.budget import NEVER, BudgetCheck, BudgetResult, Evaluation


class Action(Enum):
    ACCEPT = "accept"
    DEFER = "defer"
    HOLD = "hold"
    REJECT = "reject"


_ACTIONS = {action.value: action for action in Action}  # by value, without Action(value)


# What a hold that no limit decided says (Postfix logs it with the HOLD, Sendmail lists it
# as the quarantine reason); a limit's hold says its message or ``messages.hold``.
LANE_HOLD_TEXT = "held by mqpolicy lane {lane}"
LOAD_HOLD_TEXT = "held by mqpolicy load: lane {lane} waits for the MTA's queues"
PAUSE_HOLD_TEXT = "held by mqpolicy: {paused} paused"

# by the value of an ActionKind (a string: cheaper to hash than an Enum member)
_SEVERITY = {ActionKind.REJECT.value: 3, ActionKind.DEFER.value: 2, ActionKind.HOLD.value: 1}
_MAX_KEY_LENGTH = 200
_BYTES = Count.BYTES  # read once: an Enum's member costs a lookup each time


class PlannedLimit(NamedTuple):
    limit: Limit
    key: str  # the key value this request maps to, e.g. "alice@example.com"
    check: BudgetCheck
    spends: bool  # whether a real decision spends here (a dry run's check does not)


class Plan(NamedTuple):
    request: Request
    lane: Lane
    rule: str | None  # the classify rule that chose the lane (None: default lane)
    limits: tuple[PlannedLimit, ...]
    once_key: str | None
    waiting_lanes: frozenset[str] = frozenset()  # lanes that wait for the MTA's queues
    # the policy server's END-OF-MESSAGE decision in wiring B: it spends nothing and
    # refuses only when sure (see make_plan); the milter decides lane, holds and spends
    checks_only: bool = False
    # the message's ledger, where a RCPT decision's spends are recorded for a give-back
    ledger_key: str | None = None
    # a paused lane or recipient destination: "lane bulk (why)", "destination google"
    paused: str = ""


class RuntimeState(NamedTuple):
    """What the shared store says about the world, refreshed every second or so by the
    front-end: destination backoff factors and the lanes that wait for the MTA's queues
    to drain. An input of the engine like the counters (the engine reads no store)."""

    backoff: Mapping[str, float] = MappingProxyType({})
    waiting_lanes: frozenset[str] = frozenset()
    # paused by an operator or a feedback rule (see policy/pauses.py): name -> description
    paused_lanes: Mapping[str, str] = MappingProxyType({})
    paused_destinations: Mapping[str, str] = MappingProxyType({})


NO_RUNTIME = RuntimeState()


class LimitOutcome(NamedTuple):
    """What one limit said in one decision."""

    name: str
    key: str
    allowed: bool
    spent: bool
    remaining: int
    retry_after_ms: int
    action: ActionKind
    monitor: bool
    rate: str
    counted: str  # what the check counted: "1 messages", "12 recipients", "peek", ...
    cost: int  # what this decision spends from the bucket when it commits (0: it only looks)


class Verdict(NamedTuple):
    action: Action
    lane: Lane
    classified_lane: Lane
    rule: str | None
    text: str
    retry_after_ms: int
    limits: tuple[LimitOutcome, ...]
    deciding: str | None = None  # name of the limit that decided, or "lane:<name>"
    store_error: bool = False
    duplicate: bool = False
    oversize: bool = False  # the deciding limit's cost exceeds its burst: it never fits

    @property
    def demoted(self) -> bool:
        return self.lane.name != self.classified_lane.name

    @property
    def hold_reason(self) -> str:
        """Why the message waits, as a hold record says it: the deciding limit, else
        ``lane:<name>``."""
        return self.deciding or f"lane:{self.lane.name}"


# ---------------------------------------------------------------- classify


def classify(request: Request, policy: Policy) -> tuple[Lane, str | None]:
    """The first matching rule's lane. A rule that looks at headers is skipped when the
    request has none (the policy server): its answer is unknown there, and the milter,
    which sees the headers, decides it."""
    no_headers = request.headers is None
    for rule in policy.classify:
        if rule.needs_headers and no_headers:
            continue
        if rule.when(request):
            return policy.lanes_by_name[rule.lane], rule.name
    return policy.lanes_by_name[policy.default_lane], None


# ---------------------------------------------------------------- keys


def store_key(limit: Limit, key: str) -> str:
    """The store's logical key for one bucket of a limit (the store adds its prefix):
    ``key`` as :meth:`Limit.key_of` makes it (escaped, :mod:`mqpolicy.policy.keys`), or as
    an operator types it (a lone surrogate, a raw byte, is escaped as the key's would be)."""
    if key.isascii() and len(key) <= _MAX_KEY_LENGTH:  # the usual key, as it is
        return limit.bucket_prefix + key
    return limit.bucket_prefix + bounded_key(escape_surrogates(key))


def bounded_key(key: str) -> str:
    """An escaped key of at most ``_MAX_KEY_LENGTH`` characters: a longer one becomes
    ``%sha1:`` and its digest (an escaped key never has ``%s``: no other key looks so)."""
    if len(key) <= _MAX_KEY_LENGTH:
        return key
    return "%sha1:" + hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()


def ledger_key(message: str) -> str:
    """The store key of a message's ledger (see :mod:`mqpolicy.store.budget`): ``message``
    is ``i:<instance>`` (the policy server's, or the milter's own transaction id) or
    ``q:<queue id>`` (where wiring B's policy server leaves it for the milter)."""
    return f"spent:{bounded_key(escape_key_part(message))}"


def once_key_for(request: Request) -> str | None:
    """The key that records a message as counted: its queue id (else the instance),
    escaped as a key part (a queue id that is not UTF-8 is a valid Redis key too)."""
    key = request.message_key
    return f"seen:{bounded_key(escape_key_part(key))}" if key else None


# ---------------------------------------------------------------- plan


def not_applied_reason(limit: Limit, lane: Lane, request: Request) -> str | None:
    """Why ``limit`` does not count this request in ``lane``; None when it does (when
    :func:`make_plan` plans it). The one list of these conditions: ``make_plan`` has them
    inlined for speed (a test holds the two together), ``explain`` says them."""
    if limit.spent_at_end and request.stage == STAGE_RCPT:
        return ("recipient-keyed with lanes or headers: spent per recipient at the end of "
                "the message, in its final lane")
    if limit.recipient_keyed and request.stage != STAGE_RCPT and not limit.spent_at_end:
        return "recipient-keyed: spent per recipient at RCPT"
    if limit.destination is not None and limit.destination != recipient_destination(request):
        return f"destination {limit.destination} only"
    if limit.needs_headers and request.headers is None:
        return "looks at headers: the milter applies it"
    if limit.lanes is not None and lane.name not in limit.lanes:
        return f"lanes {', '.join(sorted(limit.lanes))} only"
    if limit.when is not None and not limit.when(request):
        return "when does not match"
    if limit.exempt is not None and limit.exempt(request):
        return "except matches"
    if limit.key_of(request) is None:
        return f"request has no {limit.key_text}"
    return None


def _per_recipient(limit: Limit, request: Request, consume: bool) -> list[PlannedLimit]:
    """A recipient-keyed limit spent at the end of the message: one unit (the size, when
    it counts bytes) per recipient of the message, one check per bucket."""
    recipients = request.recipients or ((request.recipient,) if request.recipient else ())
    costs: dict[str, int] = {}
    each = max(1, request.size) if limit.count is Count.BYTES else 1
    when, exempt = limit.when, limit.exempt
    for recipient in recipients:
        one = request._replace(recipient=recipient)
        if (when is not None and not when(one)) or (exempt is not None and exempt(one)):
            continue
        key = limit.key_of(one)
        if key is not None:
            costs[key] = costs.get(key, 0) + each
    return [
        PlannedLimit(limit, key, BudgetCheck(store_key(limit, key), limit.refill, limit.unit,
                                             limit.burst, cost, consume, limit.blocking),
                     consume)
        for key, cost in costs.items()
    ]


def _message_cost(limit: Limit, request: Request) -> int:
    if limit.count is Count.MESSAGES:
        return 1
    if limit.count is Count.RECIPIENTS:
        return max(1, request.recipient_count or len(request.recipients))
    return max(1, request.size)


def make_plan(request: Request, policy: Policy, runtime: RuntimeState = NO_RUNTIME,
              lane: Lane | None = None, *, releasing: bool = False,
              demotion: bool = True, only: tuple[Limit, ...] | None = None) -> Plan:
    """The checks of one decision. ``lane`` given: no classification (the scheduler
    plans a held message in the lane it was held in). ``releasing``: the scheduler lets a
    held message go, which spends its recipient budgets whatever the lane. ``demotion``:
    at the end of a message, a demote limit's target lane is planned too (see
    :func:`_with_demotion`); ``only``: these limits instead of the lane's."""
    rule: str | None = None
    if lane is None:
        lane, rule = classify(request, policy)
    backoff = runtime.backoff
    paused = ("" if releasing or not (runtime.paused_lanes or runtime.paused_destinations)
              else _paused(request, lane, runtime))
    # Mail that will wait in the hold queue (a hold lane, a lane waiting for the MTA's
    # queues, a pause) spends its recipient budgets when it is released, not now: else twice.
    spend_recipients = releasing or not (lane.hold or lane.name in runtime.waiting_lanes
                                         or paused)
    stage = request.stage
    at_end = stage == STAGE_END_OF_MESSAGE
    at_rcpt = stage == STAGE_RCPT
    planned: list[PlannedLimit] = []
    # The limits of this lane and stage (see Policy.limits_by_stage); the tests below are
    # what not_applied_reason() says about the rest, inlined: this loop runs for every request (a
    # destination budget was found by the request's destination just above).
    limits = policy.limits_by_stage[lane.name, at_rcpt] if only is None else only
    if at_rcpt and policy.destination_limits and request.recipient:
        budget = policy.destination_limits.get(recipient_destination(request))
        if budget is not None and (budget.lanes is None or lane.name in budget.lanes):
            limits = (*limits, budget)
    no_headers = request.headers is None
    # Wiring B: the milter spends at its end of message, in the final lane; before it only
    # the limits that apply whatever the headers and the final lane say are checked.
    lane_unsure = no_headers and policy.end_checks_only and not releasing
    checks_only = at_end and lane_unsure
    size = request.size
    for limit in limits:
        if no_headers and limit.needs_headers:
            continue  # the milter, which sees the headers, applies this limit
        if lane_unsure and limit.lanes is not None and limit.destination is None:
            continue  # the final lane is the milter's to know
        if limit.spent_at_end:
            if at_rcpt and not releasing:
                continue  # spent at the end, in the lane the message leaves in
            if at_end:
                planned.extend(_per_recipient(limit, request, spend_recipients))
                continue
        when = limit.when
        if when is not None and not when(request):
            continue
        exempt = limit.exempt
        if exempt is not None and exempt(request):
            continue
        key = limit.key_of(request)
        if key is None:
            continue
        if limit.recipient_keyed:  # only at RCPT (limits_by_stage; destinations too)
            if paused:
                continue  # paused mail is held, never refused: checked at its release
            cost = (size if size > 1 else 1) if limit.count is _BYTES else 1
            consume = spend_recipients
        elif at_end:
            cost = _message_cost(limit, request)
            consume = not checks_only
        else:
            cost = (size if size > 1 else 1) if limit.count is _BYTES else 1
            consume = False
        unit, burst = limit.unit, limit.burst
        if backoff and limit.destination is not None:
            factor = backoff.get(limit.destination, 1.0)
            if factor < 1.0:  # same bucket key: a factor change never resets the bucket
                unit, burst = scale_budget(unit, burst, factor)
        # store_key(limit, key), its usual case inlined
        bucket = (limit.bucket_prefix + key if key.isascii() and len(key) <= _MAX_KEY_LENGTH
                  else store_key(limit, key))
        # tuple.__new__: positional NamedTuples without their keyword __new__ (2x cheaper)
        check = _new(BudgetCheck, (bucket, limit.refill, unit, burst, cost, consume,
                                   limit.blocking, 0))
        planned.append(_new(PlannedLimit, (limit, key, check, consume)))
    if at_end and demotion and planned and not checks_only and policy.demotes:
        planned = _with_demotion(request, policy, runtime, lane, planned)
    once = once_key_for(request) if at_end and planned and not checks_only else None
    ledger = None
    if at_rcpt and request.instance and not releasing:
        for p in planned:  # a loop: cheaper than any() over a generator
            if p.spends:
                ledger = ledger_key("i:" + request.instance)
                break
    return _new(Plan, (request, lane, rule, tuple(planned), once, runtime.waiting_lanes,
                       checks_only, ledger, paused))


_new = tuple.__new__


def _paused(request: Request, lane: Lane, runtime: RuntimeState) -> str:
    """What pauses this request: its lane, else its recipient's destination ("")."""
    if runtime.paused_lanes and lane.name in runtime.paused_lanes:
        return f"lane {runtime.paused_lanes[lane.name]}"
    if runtime.paused_destinations and request.recipient:
        described = runtime.paused_destinations.get(recipient_destination(request))
        if described is not None:
            return f"destination {described}"
    return ""


def _with_demotion(request: Request, policy: Policy, runtime: RuntimeState, lane: Lane,
                   planned: list[PlannedLimit]) -> list[PlannedLimit]:
    """A message that a spent ``demote: L`` limit may move to lane L meets L's limits in
    the same atomic decision: the limits scoped to L (and not to this lane) are added,
    counted only if the demote check fails; the limits scoped to this lane (and not to L)
    count only if it passes. With several demote limits that could apply, none of this:
    the message counts in its first lane (README, "How counting works")."""
    d = -1
    for i, p in enumerate(planned):
        demote_to = p.limit.demote_to
        if (demote_to is not None and not p.limit.monitor
                and policy.lanes_by_name[demote_to].priority > lane.priority):
            if d >= 0:
                return planned  # two could apply: the first lane
            d = i
    if d < 0:
        return planned
    target = planned[d].limit.demote_to or ""
    extras = policy.demotion_limits.get((lane.name, target), ())
    out = planned
    if any(p.limit.lanes is not None and target not in p.limit.lanes for p in planned):
        first = -(d + 1)  # the first lane's own: counted only if the message stays
        out = [p if p.limit.lanes is None or target in p.limit.lanes
               else _new(PlannedLimit, (p.limit, p.key, _with_after(p.check, first), p.spends))
               for p in planned]
    if extras:
        out = list(out)
        for p in make_plan(request, policy, runtime, policy.lanes_by_name[target],
                           demotion=False, only=extras).limits:
            out.append(_new(PlannedLimit, (p.limit, p.key, _with_after(p.check, d + 1),
                                           p.spends)))
    return out


def _with_after(check: BudgetCheck, after: int) -> BudgetCheck:
    return _new(BudgetCheck, (*check[:7], after))


def counted_in_decision(planned: PlannedLimit, evaluation: Evaluation) -> bool:
    """Whether a check counted in the decision (one with ``after`` may not have)."""
    after = planned.check.after
    if not after:
        return True
    return evaluation.results[abs(after) - 1].allowed is not (after > 0)


# ---------------------------------------------------------------- decide


def _fill(template: str, limit: Limit | None, key: str, lane: Lane, retry_ms: int,
          remaining: int) -> str:
    if retry_ms > 0:
        retry = str(max(1, -(-retry_ms // 1000)))
    else:  # no retry time: "try again in {retry_after}s" says "try again later"
        retry = "later"
        template = (template.replace("in {retry_after}s", "{retry_after}")
                    .replace("{retry_after}s", "{retry_after}"))
    return template.format(
        limit=limit.name if limit else "",
        key=readable_key(key),
        rate=limit.rate_text if limit else "",
        retry_after=retry,
        remaining=remaining,
        lane=lane.name,
    )


def decide(plan: Plan, evaluation: Evaluation | None, policy: Policy) -> Verdict:
    """Turn the store's answer (None: the store failed) into a verdict."""
    classified = plan.lane
    if evaluation is None:
        return _store_failed(plan, policy)

    outcomes: list[LimitOutcome] = []
    worst: tuple[int, int, PlannedLimit, BudgetResult, ActionKind, bool] | None = None
    lane = classified
    duplicate = evaluation.duplicate
    may_spend = evaluation.committed and not duplicate
    for planned, result in zip(plan.limits, evaluation.results, strict=True):
        limit, key, check, spends = planned
        allowed, remaining, retry_after_ms = result
        cost, consume, after = check.cost, check.consume, check.after
        counted = not after or counted_in_decision(planned, evaluation)
        # what the check counted (LimitOutcome.counted)
        if duplicate:
            what = "already counted"
        elif not counted:
            what = "not in the final lane"
        elif not spends:
            what = "checked"
        elif cost == 1:
            what = limit.counted_one
        else:
            what = f"{cost} {limit.count.value}"
        outcomes.append(_new(LimitOutcome, (
            limit.name,
            key,
            allowed,
            may_spend and allowed and consume and counted,
            remaining,
            retry_after_ms,
            limit.action,
            limit.monitor,
            limit.rate_text,
            what,
            cost if consume and counted else 0,
        )))
        if allowed or limit.monitor:
            continue
        if limit.action is ActionKind.DEMOTE and limit.demote_to is not None:
            target = policy.lane(limit.demote_to)
            if target.priority > lane.priority:
                lane = target
            continue
        kind = limit.action
        never = retry_after_ms == NEVER
        if never and kind is not ActionKind.REJECT:  # can never fit: no 4xx loop
            kind = ActionKind.REJECT if limit.oversize is Oversize.REJECT else ActionKind.HOLD
        if plan.checks_only and kind is ActionKind.HOLD:
            continue  # holding is the milter's: it writes the record and quarantines
        rank = (_SEVERITY[kind._value_], 1 << 62 if never else retry_after_ms, planned, result,
                kind, never)
        if worst is None or rank[:2] > worst[:2]:
            worst = rank

    limits = tuple(outcomes)
    if worst is not None:
        _, _, planned, result, kind, never = worst
        limit = planned.limit
        action = _ACTIONS[kind._value_]  # _value_: a plain attribute, value is not
        oversize = never and limit.action is not ActionKind.REJECT
        if oversize and action is Action.REJECT:
            text = oversize_text(limit, planned.check)
        else:
            default: str = getattr(policy.messages, kind._value_)  # messages.defer, ...
            text = _fill(limit.message or default, limit, planned.key, lane,
                         result.retry_after_ms, result.remaining)
        return _new(Verdict, (action, lane, classified, plan.rule, text, result.retry_after_ms,
                              limits, limit.name, False, evaluation.duplicate, oversize))
    if plan.paused and not plan.checks_only:
        return Verdict(Action.HOLD, lane, classified, plan.rule,
                       PAUSE_HOLD_TEXT.format(paused=plan.paused), 0, limits,
                       deciding=f"paused: {plan.paused}", duplicate=evaluation.duplicate)
    waiting = lane.name in plan.waiting_lanes and lane.priority > 0  # never the highest lane
    if (waiting or lane.hold) and not plan.checks_only:
        # messages.hold names a limit; here none held the message: name what did
        text = (LOAD_HOLD_TEXT if waiting else LANE_HOLD_TEXT).format(lane=lane.name)
        return Verdict(Action.HOLD, lane, classified, plan.rule, text, 0, limits,
                       deciding="load" if waiting else f"lane:{lane.name}",
                       duplicate=evaluation.duplicate)
    return _new(Verdict, (Action.ACCEPT, lane, classified, plan.rule, "", 0, limits, None,
                          False, evaluation.duplicate, False))


def oversize_text(limit: Limit, check: BudgetCheck) -> str:
    """The permanent refusal of a message larger than a limit's burst."""
    return (f"message exceeds limit {limit.name}: {check.cost} {limit.count.value}, "
            f"at most {check.burst} at once")


def _store_failed(plan: Plan, policy: Policy) -> Verdict:
    outcomes = tuple(
        LimitOutcome(
            name=p.limit.name, key=p.key, allowed=True, spent=False, remaining=-1,
            retry_after_ms=0, action=p.limit.action, monitor=p.limit.monitor,
            rate=p.limit.rate_text, counted="store error",
            cost=p.check.cost if p.check.consume else 0,
        )
        for p in plan.limits
    )
    deferring = [
        p for p in plan.limits
        if not p.limit.monitor and p.limit.on_store_error is StoreErrorMode.DEFER
    ]
    lane = plan.lane
    if lane.hold or plan.paused or (lane.name in plan.waiting_lanes and lane.priority > 0):
        # mail that must wait is never sent on because the store is away: the client
        # retries (accepting it would deliver it at once, holding it needs the store)
        return Verdict(Action.DEFER, lane, lane, plan.rule, store_error_text(policy, lane), 0,
                       outcomes, deciding=f"lane:{lane.name}", store_error=True)
    if deferring:
        text = _fill(policy.messages.store_error, deferring[0].limit, deferring[0].key,
                     plan.lane, 0, 0)
        return Verdict(Action.DEFER, plan.lane, plan.lane, plan.rule, text, 0, outcomes,
                       deciding=deferring[0].limit.name, store_error=True)
    return Verdict(Action.ACCEPT, plan.lane, plan.lane, plan.rule, "", 0, outcomes,
                   store_error=True)


NO_LIMITS_EVALUATION = Evaluation(results=(), committed=True)
"""The evaluation of a plan with no limits: no store round trip needed."""


def store_error_text(policy: Policy, lane: Lane) -> str:
    """``messages.store_error`` with its placeholders filled (no limit spoke)."""
    return _fill(policy.messages.store_error, None, "", lane, 0, 0)
