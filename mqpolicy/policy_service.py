"""Postfix policy delegation front-end: attributes in, a Postfix action out.

Translates only; every decision is made by :class:`~mqpolicy.decisions.DecisionService`.
"""

from __future__ import annotations

from mqpolicy.decisions import DecisionService
from mqpolicy.engine import Action, Verdict
from mqpolicy.request import Request
from mqpolicy.structured_log import queue_id_var


def postfix_action(verdict: Verdict) -> str:
    """The ``action=`` value Postfix understands for a verdict."""
    action = verdict.action
    if action is Action.ACCEPT:
        if verdict.lane.uses_default_transport:
            return "DUNNO"
        return f"FILTER {verdict.lane.transport}:"
    if action is Action.DEFER:
        if verdict.store_error:
            return f"451 4.3.0 {verdict.text}"
        return f"450 4.7.1 {verdict.text}"
    if action is Action.HOLD:
        return f"HOLD {verdict.text}"
    return f"550 5.7.1 {verdict.text}"


class PostfixPolicyHandler:
    """The handler the policy server calls for each complete request."""

    def __init__(self, service: DecisionService) -> None:
        self.service = service

    async def handle(self, attrs: dict[str, str]) -> str:
        request = Request.from_policy_attributes(attrs)
        queue_id_var.set(request.queue_id)
        verdict = await self.service.decide(request)
        return postfix_action(verdict)
