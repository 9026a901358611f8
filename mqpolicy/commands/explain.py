"""``mqpolicy explain``: the decision for a request given as ``name=value`` lines, made on the
policy's store (Redis), or by the running server through its admin socket (memory://)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from mqpolicy.admin.client import AdminError, AdminUnavailable, ask_server
from mqpolicy.commands.exit_codes import EXIT_OK, EXIT_USAGE
from mqpolicy.decision.runtime_state import RuntimeRefresher, make_resolver
from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.codec import PolicyProtocolError
from mqpolicy.delegation.explanation import (
    Explanation,
    explain,
    parse_request_text,
    render_explanation,
)
from mqpolicy.policy.model import Policy
from mqpolicy.policy.request import Request
from mqpolicy.store.hold_records import waiting_lanes
from mqpolicy.store.opener import open_backoff_store, open_store, records_for


def run_explain(policy: Policy, args: argparse.Namespace) -> int:
    """``mqpolicy explain``: the request read from the file ``args.request`` (- = stdin)."""
    source: str = args.request
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"mqpolicy explain: cannot read {source}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(cmd_explain(policy, text, args.consume, args.json))


FRESH_STORE_NOTE = ("explained on a fresh private memory:// store: the budgets shown are "
                    "full budgets, not the running server's")


async def cmd_explain(policy: Policy, text: str, consume: bool, as_json: bool) -> int:
    try:
        attrs = parse_request_text(text)
    except PolicyProtocolError as exc:
        print(f"mqpolicy explain: malformed request: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if policy.store.in_process:
        try:
            explanation = await ask_server(policy, "explain",
                                           {"request": text, "consume": consume},
                                           Explanation.from_json)
        except AdminUnavailable as exc:  # no server to ask: say whose budgets these are
            print(f"mqpolicy explain: {exc}", file=sys.stderr)
            print(f"mqpolicy explain: {FRESH_STORE_NOTE}", file=sys.stderr)
            explanation = await _explain_here(policy, attrs, consume, FRESH_STORE_NOTE)
        except AdminError as exc:
            print(f"mqpolicy explain: {exc}", file=sys.stderr)
            return exc.exit_code
    else:
        explanation = await _explain_here(policy, attrs, consume)
    if as_json:
        print(json.dumps(explanation.as_json(), indent=2))
    else:
        print(render_explanation(explanation))
    return EXIT_OK


async def _explain_here(policy: Policy, attrs: dict[str, str], consume: bool,
                        note: str | None = None) -> Explanation:
    """The explanation from a decision service of this process, on the policy's store."""
    deadline_ms = max(policy.store.timeout_ms, 2000)
    store = open_store(policy.store.url, timeout_ms=deadline_ms,
                       key_prefix=policy.store.key_prefix)
    resolver = make_resolver(policy)
    backoff = open_backoff_store(policy.store.url, key_prefix=policy.store.key_prefix)
    records = None if policy.store.in_process else records_for(policy, timeout_ms=deadline_ms)
    try:
        service = DecisionService(policy, store, deadline_ms=deadline_ms, resolver=resolver)
        # backoff factors, pauses and waiting lanes as the servers read them
        await RuntimeRefresher(service, backoff, (lambda: waiting_lanes(records))
                               if records is not None else None).refresh()
        return await explain(service, Request.from_policy_attributes(attrs), consume, note)
    finally:
        await store.close()
        await backoff.close()
        if records is not None:
            await records.close()
        if resolver is not None:
            await resolver.aclose()
