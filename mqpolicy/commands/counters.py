"""``mqpolicy counters``: budgets in use by key, and resetting them; read from Redis by the
command itself, or asked of the running server through its admin socket (memory://)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mqpolicy.admin.client import AdminError, ask_server
from mqpolicy.commands.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from mqpolicy.decision.counter_report import (
    CounterRow,
    counter_rows,
    render_counter_rows,
    reset_budgets,
)
from mqpolicy.decision.service import wall_clock_ms
from mqpolicy.policy.model import Policy
from mqpolicy.store.budget import StoreError
from mqpolicy.store.opener import open_backoff_store, open_store


async def cmd_counters(policy: Policy, args: argparse.Namespace) -> int:
    limits = {limit.name: limit for limit in policy.limits}
    wanted: str | None = args.limit
    if wanted is not None and wanted not in limits:
        print(f"mqpolicy counters: no limit named {wanted!r} "
              f"(limits: {', '.join(sorted(limits))})", file=sys.stderr)
        return EXIT_USAGE
    reset = args.counters_command == "reset"
    key: str | None = None if reset and args.all else args.key
    if reset and key is None and not args.all:
        print("mqpolicy counters reset: give a KEY or --all", file=sys.stderr)
        return EXIT_USAGE
    if policy.store.in_process:
        return await _counters_in_server(policy, args, key)
    store = open_store(policy.store.url, timeout_ms=max(policy.store.timeout_ms, 2000),
                       key_prefix=policy.store.key_prefix)
    try:
        if reset:
            removed = await reset_budgets(store, limits[args.limit], key)
            print(f"reset {removed} budget(s) of {args.limit}")
        else:
            chosen = [limits[wanted]] if wanted else list(policy.limits)
            rows = await counter_rows(store, chosen, key, args.max, wall_clock_ms(),
                                      await _factors(policy))
            print(render_counter_rows(rows))
    except StoreError as exc:
        print(f"mqpolicy counters: store error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await store.close()
    return EXIT_OK


async def _factors(policy: Policy) -> dict[str, float]:
    """The destinations' backoff factors, as the servers read them."""
    backoff = open_backoff_store(policy.store.url, key_prefix=policy.store.key_prefix)
    try:
        return await backoff.factors()
    finally:
        await backoff.close()


async def _counters_in_server(policy: Policy, args: argparse.Namespace,
                              key: str | None) -> int:
    """``counters`` on a memory:// store: asked of the running server."""
    try:
        if args.counters_command == "reset":
            target = {"key": key} if key is not None else {"all": True}
            removed = await ask_server(policy, "counters.reset",
                                       {"limit": args.limit, **target}, _reset_count)
            print(f"reset {removed} budget(s) of {args.limit}")
        else:
            rows = await ask_server(policy, "counters.show",
                                    {"limit": args.limit, "key": key, "max": args.max},
                                    _counter_rows)
            print(render_counter_rows(rows))
    except AdminError as exc:
        print(f"mqpolicy counters: {exc}", file=sys.stderr)
        return exc.exit_code
    return EXIT_OK


def _reset_count(result: Any) -> int:
    return int(result["reset"])


def _counter_rows(result: Any) -> list[CounterRow]:
    return [CounterRow.from_json(row) for row in result["rows"]]
