"""What ``mqpolicy explain`` says about one request: made by a decision service (the
command's own on a Redis store, the running server's through its admin socket on a
memory:// one), carried as JSON, printed the same way whichever made it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mqpolicy.decision.engine import LimitOutcome, Verdict, not_applied_reason
from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.codec import PolicyDecoder, PolicyProtocolError
from mqpolicy.delegation.handler import postfix_action
from mqpolicy.policy.model import ActionKind, Policy
from mqpolicy.policy.request import Request, domain_of

__all__ = ["Explanation", "explain", "parse_request_text", "render_explanation"]


def parse_request_text(text: str) -> dict[str, str]:
    """``name=value`` lines (one request) as Postfix sends them; blank line optional.
    :class:`~mqpolicy.delegation.codec.PolicyProtocolError` when they are not one."""
    decoder = PolicyDecoder()
    data = text.encode("utf-8", "surrogateescape")
    if not data.endswith(b"\n"):
        data += b"\n"
    requests = decoder.feed(data + b"\n", max_requests=1)  # not the line end added after it
    if not requests:
        raise PolicyProtocolError("no request found")
    return requests[0]


@dataclass(frozen=True, slots=True)
class Explanation:
    stage: str
    lane: str
    classified_lane: str
    rule: str | None
    action: str
    postfix_action: str
    retry_after_ms: int
    decided_by: str | None
    store: str
    consumed: bool
    store_error: bool
    limits: tuple[LimitOutcome, ...]
    not_applied: tuple[tuple[str, str], ...]  # (limit, why it does not apply)
    note: str | None = None  # said beside the budgets (whose budgets they are)

    @classmethod
    def of(cls, request: Request, verdict: Verdict, policy: Policy, consume: bool,
           note: str | None = None) -> Explanation:
        consulted = {o.name for o in verdict.limits}
        return cls(
            stage=request.stage,
            lane=verdict.lane.name,
            classified_lane=verdict.classified_lane.name,
            rule=verdict.rule,
            action=verdict.action.value,
            postfix_action=postfix_action(verdict),
            retry_after_ms=verdict.retry_after_ms,
            decided_by=verdict.deciding,
            store=policy.store.url,
            consumed=consume,
            store_error=verdict.store_error,
            limits=verdict.limits,
            not_applied=tuple(
                (limit.name, not_applied_reason(limit, verdict.classified_lane, request)
                 or (_PAUSED if (verdict.deciding or "").startswith("paused: ")
                     else "not applicable"))
                for limit in policy.limits if limit.name not in consulted),
            note=note,
        )

    def as_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "stage": self.stage,
            "lane": self.lane,
            "classified_lane": self.classified_lane,
            "rule": self.rule,
            "action": self.action,
            "postfix_action": self.postfix_action,
            "retry_after_ms": self.retry_after_ms,
            "decided_by": self.decided_by,
            "store": self.store,
            "consumed": self.consumed,
            "store_error": self.store_error,
            "limits": [{**o._asdict(), "action": o.action.value} for o in self.limits],
            "not_applied": [{"name": name, "why": why} for name, why in self.not_applied],
        }
        if self.note is not None:
            data["note"] = self.note
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Explanation:
        """The explanation :meth:`as_json` gave; KeyError, TypeError or ValueError when
        ``data`` is not one."""
        return cls(
            stage=str(data["stage"]),
            lane=str(data["lane"]),
            classified_lane=str(data["classified_lane"]),
            rule=_optional_str(data["rule"]),
            action=str(data["action"]),
            postfix_action=str(data["postfix_action"]),
            retry_after_ms=int(data["retry_after_ms"]),
            decided_by=_optional_str(data["decided_by"]),
            store=str(data["store"]),
            consumed=bool(data["consumed"]),
            store_error=bool(data["store_error"]),
            limits=tuple(LimitOutcome(**{**o, "action": ActionKind(o["action"])})
                         for o in data["limits"]),
            not_applied=tuple((str(n["name"]), str(n["why"])) for n in data["not_applied"]),
            note=_optional_str(data.get("note")),
        )


_PAUSED = "paused: checked and spent when the held message is released"


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


async def explain(service: DecisionService, request: Request, consume: bool,
                  note: str | None = None) -> Explanation:
    """The decision ``service`` makes on ``request`` (spending only with ``consume``),
    neither counted in its stats nor logged as a decision."""
    policy = service.policy
    if policy.destinations and request.recipient:
        # the request as the decision sees it (its recipient's destination group), so
        # that what explain says of destination budgets is about that group
        request = request._replace(destination=await service.destination_of(
            domain_of(request.recipient), policy))
    verdict = await service.decide(request, consume=consume, account=False)
    return Explanation.of(request, verdict, policy, consume, note)


def render_explanation(e: Explanation) -> str:
    lines = [f"stage:   {e.stage}"]
    rule = f" (rule {e.rule})" if e.rule else " (default lane)"
    lines.append(f"lane:    {e.classified_lane}{rule}")
    if e.lane != e.classified_lane:
        lines.append(f"         demoted to {e.lane}")
    lines.append(f"action:  {e.action}" + (f" by {e.decided_by}" if e.decided_by else ""))
    lines.append(f"postfix: action={e.postfix_action}")
    if e.store_error:
        lines.append("store:   ERROR (on_store_error applied)")
    lines.append(f"budgets: {'spent' if e.consumed else 'not spent (use --consume)'} "
                 f"in {e.store}")
    if e.note:
        lines.append(f"note:    {e.note}")
    if e.limits:
        lines.append("limits consulted:")
        for o in e.limits:
            state = "ok" if o.allowed else ("would " if o.monitor else "") + o.action.value
            retry = ""
            if not o.allowed:
                retry = " retry=never" if o.retry_after_ms < 0 else \
                    f" retry={math.ceil(o.retry_after_ms / 1000)}s"
            lines.append(f"  {o.name:<24} key={o.key} rate={o.rate} counted={o.counted} "
                         f"remaining={o.remaining} -> {state}{retry}")
    if e.not_applied:
        lines.append("limits not applied:")
        for name, why in e.not_applied:
            lines.append(f"  {name:<24} {why}")
    return "\n".join(lines)
