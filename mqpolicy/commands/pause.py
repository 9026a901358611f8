"""``mqpolicy pause destination|lane NAME [--for 2h] [--reason TEXT]`` and ``mqpolicy resume
destination|lane NAME``: written to the store by the command itself (Redis: every process
sees it within a second, a restart keeps it), or asked of the running ``serve`` through its
admin socket when the store lives in it (``memory://``)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from mqpolicy.admin.client import AdminError, ask_server
from mqpolicy.commands.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from mqpolicy.decision.service import wall_clock_ms
from mqpolicy.policy.model import Policy
from mqpolicy.policy.pauses import KINDS, Pause, new_pause, pause_target_problem
from mqpolicy.policy.rates import parse_duration_ms
from mqpolicy.store.budget import StoreError
from mqpolicy.store.opener import open_backoff_store

__all__ = ["add_pause_arguments", "cmd_pause", "describe_until"]


def add_pause_arguments(pause: argparse.ArgumentParser, resume: argparse.ArgumentParser) -> None:
    for parser in (pause, resume):
        parser.add_argument("kind", choices=KINDS, help="what to pause: destination or lane")
        parser.add_argument("name", help="a destination's name (or a recipient domain), or a "
                            "lane's")
    pause.add_argument("--for", dest="duration", metavar="DURATION",
                       help="end by itself after this long (30m, 2h, 1d); default: until "
                       "`mqpolicy resume`")
    pause.add_argument("--reason", default="", help="why, shown with the pause and in the "
                       "hold records")


def describe_until(until_ms: int | None, now_ms: int) -> str:
    if until_ms is None:
        return "until resumed"
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(until_ms / 1000))
    return f"until {stamp} (in {max(0, until_ms - now_ms) // 60_000}m)"


async def cmd_pause(policy: Policy, args: argparse.Namespace, out: TextIO) -> int:
    """``pause`` or ``resume`` (``args.command``)."""
    command: str = args.command
    kind: str = args.kind
    name: str = args.name
    problem = pause_target_problem(kind, name, (lane.name for lane in policy.lanes),
                                   (d.name for d in policy.destinations))
    if problem is not None and command == "pause":
        print(f"mqpolicy pause: {problem}", file=sys.stderr)
        return EXIT_USAGE
    for_ms: int | None = None
    if command == "pause" and args.duration is not None:
        try:
            for_ms = parse_duration_ms(args.duration)
        except ValueError as exc:
            print(f"mqpolicy pause: --for: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if for_ms <= 0:
            print("mqpolicy pause: --for: a duration longer than 0", file=sys.stderr)
            return EXIT_USAGE
    try:
        if policy.store.in_process:
            result = await _in_server(policy, command, kind, name, for_ms, args)
        else:
            result = await _in_store(policy, command, kind, name, for_ms, args)
    except AdminError as exc:
        print(f"mqpolicy {command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except StoreError as exc:
        print(f"mqpolicy {command}: store error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    now = wall_clock_ms()
    if command == "pause":
        assert result is not None
        print(f"paused {kind} {name} {describe_until(result.until_ms, now)}"
              + (f": {result.reason}" if result.reason else ""), file=out)
        print("its mail is accepted and held; `mqpolicy resume "
              f"{kind} {name}` lets the scheduler release it", file=out)
    elif result is None:
        print(f"{kind} {name} was not paused", file=out)
    else:
        print(f"resumed {kind} {name} (paused by {result.by}"
              + (f": {result.reason}" if result.reason else "") + "); the scheduler "
              "releases its held mail highest lane first, within its budgets", file=out)
    return EXIT_OK


async def _in_store(policy: Policy, command: str, kind: str, name: str, for_ms: int | None,
                    args: argparse.Namespace) -> Pause | None:
    store = open_backoff_store(policy.store.url, key_prefix=policy.store.key_prefix)
    try:
        if command == "pause":
            pause = new_pause(kind, name, wall_clock_ms(), for_ms,  # type: ignore[arg-type]
                              args.reason)
            await store.set_pause(pause)
            return pause
        return await store.clear_pause(kind, name)
    finally:
        await store.close()


async def _in_server(policy: Policy, command: str, kind: str, name: str, for_ms: int | None,
                     args: argparse.Namespace) -> Pause | None:
    request: dict[str, Any] = {"kind": kind, "name": name}
    if command == "pause":
        request.update(for_ms=for_ms, reason=args.reason)
        return await ask_server(policy, "pause", request, Pause.from_dict)

    def ended(result: Any) -> Pause | None:
        stored = result["resumed"]
        return None if stored is None else Pause.from_dict(stored)

    return await ask_server(policy, "resume", request, ended)
