"""``mqpolicy destinations [--json]``: every destination with its patterns, budget and
backoff factor, pause, last evidence line and held mail; ``mqpolicy destinations reset
NAME`` ends a backoff. Read from Redis by the command itself, or asked of the running
``serve`` through its admin socket when the store lives in it (``memory://``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from mqpolicy.admin.client import AdminError, ask_server
from mqpolicy.commands.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from mqpolicy.decision.destination_report import (
    DestinationRow,
    destination_rows,
    render_destinations,
    reset_backoff,
)
from mqpolicy.decision.mx_resolver import DestinationFinder
from mqpolicy.decision.runtime_state import make_resolver
from mqpolicy.decision.service import wall_clock_ms
from mqpolicy.policy.model import Policy
from mqpolicy.store.budget import StoreError
from mqpolicy.store.opener import open_backoff_store, records_for

__all__ = ["add_destinations_arguments", "cmd_destinations"]


def add_destinations_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="destinations_command", metavar="ACTION")
    reset = sub.add_parser("reset", help="end a destination's backoff (its full budget back)")
    reset.add_argument("name", help="the destination's name")


async def cmd_destinations(policy: Policy, args: argparse.Namespace, out: TextIO) -> int:
    if args.destinations_command == "reset":
        return await _reset(policy, args.name, out)
    try:
        if policy.store.in_process:
            now, rows = await ask_server(policy, "destinations", {}, _parse_rows)
        else:
            now = wall_clock_ms()
            rows = await _rows_from_store(policy, now)
    except AdminError as exc:
        print(f"mqpolicy destinations: {exc}", file=sys.stderr)
        return exc.exit_code
    except (StoreError, ValueError) as exc:
        print(f"mqpolicy destinations: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps({"now_ms": now, "destinations": [r.as_json() for r in rows]},
                         indent=2), file=out)
    else:
        print(render_destinations(rows, now), file=out)
    return EXIT_OK


def _parse_rows(result: Any) -> tuple[int, list[DestinationRow]]:
    return int(result["now_ms"]), [DestinationRow.from_json(r) for r in result["destinations"]]


async def _rows_from_store(policy: Policy, now: int) -> list[DestinationRow]:
    backoff = open_backoff_store(policy.store.url, key_prefix=policy.store.key_prefix)
    records = records_for(policy, timeout_ms=max(5000, policy.store.timeout_ms))
    finder = DestinationFinder(make_resolver(policy))
    try:
        return await destination_rows(policy, backoff, records,
                                      lambda d: finder.find(d, policy.destinations), now)
    finally:
        await backoff.close()
        await records.close()
        if finder.resolver is not None:
            await finder.resolver.aclose()


async def _reset(policy: Policy, name: str, out: TextIO) -> int:
    names = [d.name for d in policy.destinations]
    if name not in names:
        print(f"mqpolicy destinations reset: no destination named {name!r} "
              f"(destinations: {', '.join(names) or 'none'})", file=sys.stderr)
        return EXIT_USAGE
    try:
        if policy.store.in_process:
            old = await ask_server(policy, "destinations.reset", {"name": name},
                                   lambda r: float(r["old_factor"]))
        else:
            backoff = open_backoff_store(policy.store.url, key_prefix=policy.store.key_prefix)
            try:
                old = await reset_backoff(backoff, name, wall_clock_ms())
            finally:
                await backoff.close()
    except AdminError as exc:
        print(f"mqpolicy destinations reset: {exc}", file=sys.stderr)
        return exc.exit_code
    except StoreError as exc:
        print(f"mqpolicy destinations reset: store error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if old < 1.0:
        print(f"destination {name}: backoff ended (factor {old:g} -> 1)", file=out)
    else:
        print(f"destination {name} was not backed off", file=out)
    return EXIT_OK
