"""``mqpolicy queue``: the qshape of held mail, per lane and destination, with due times.
Reads the hold records in Redis itself, or asks the running ``serve`` through its admin
socket (:mod:`mqpolicy.admin.client`) when the records live in it (``memory://``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from mqpolicy.admin.client import AdminError, ask_server
from mqpolicy.commands.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from mqpolicy.decision.engine import RuntimeState
from mqpolicy.decision.mx_resolver import DestinationFinder
from mqpolicy.decision.runtime_state import make_resolver
from mqpolicy.decision.service import wall_clock_ms
from mqpolicy.policy.model import Policy, SchedulerSettings
from mqpolicy.policy.pauses import active_pauses
from mqpolicy.scheduler.mta_queue import QueueCommandError
from mqpolicy.scheduler.planner import QueueSummary
from mqpolicy.scheduler.scheduler import open_mta_queue, queue_summary
from mqpolicy.store.budget import StoreError
from mqpolicy.store.opener import open_backoff_store, records_for

__all__ = ["cmd_queue", "render_queue"]


async def cmd_queue(policy: Policy, as_json: bool, out: TextIO) -> int:
    if policy.store.in_process:
        try:
            summary = await ask_server(policy, "queue", {}, QueueSummary.from_json)
        except AdminError as exc:
            print(f"mqpolicy queue: {exc}", file=sys.stderr)
            return exc.exit_code
    else:
        try:
            records = records_for(policy, timeout_ms=max(5000, policy.store.timeout_ms))
        except ValueError as exc:
            print(f"mqpolicy queue: {exc}", file=sys.stderr)
            return EXIT_USAGE
        backoff = open_backoff_store(policy.store.url, key_prefix=policy.store.key_prefix)
        finder = DestinationFinder(make_resolver(policy))
        try:
            try:
                lanes, destinations = active_pauses(await backoff.pauses(), wall_clock_ms())
            except StoreError:  # the records' read below says what the store did
                lanes, destinations = {}, {}
            summary = await queue_summary(
                policy, records, open_mta_queue(policy.scheduler or SchedulerSettings()),
                RuntimeState(paused_lanes=lanes, paused_destinations=destinations),
                lambda domain: finder.find(domain, policy.destinations))
        except (StoreError, QueueCommandError) as exc:
            print(f"mqpolicy queue: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            await records.close()
            await backoff.close()
            if finder.resolver is not None:
                await finder.resolver.aclose()
    if as_json:
        print(json.dumps(summary.as_json(), indent=2), file=out)
    else:
        print(render_queue(summary), file=out)
    return EXIT_OK


def _when(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "-"
    if ms <= now_ms:
        return "now"
    seconds = (ms - now_ms) / 1000
    if seconds < 120:
        ahead = f"{seconds:.0f}s"
    elif seconds < 7200:
        ahead = f"{seconds / 60:.0f}m"
    elif seconds < 172_800:
        ahead = f"{seconds / 3600:.1f}h"
    else:
        ahead = f"{seconds / 86_400:.1f}d"
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))
    return f"in {ahead} ({stamp})"


def render_queue(summary: QueueSummary) -> str:
    """The text view of :func:`~mqpolicy.scheduler.planner.summarize` (plus queue counts)."""
    now_ms = summary.now_ms
    lines = [f"held by mqpolicy: {summary.held}   held by others (left alone): "
             f"{len(summary.foreign)}   unreadable records: {len(summary.broken)}"]
    if summary.queues:
        lines.append("MTA queues: " + ", ".join(f"{k} {v}"
                                                for k, v in sorted(summary.queues.items())))
    if summary.paused:
        lines.append("paused (held, not released): " + ", ".join(summary.paused))
    if summary.waiting_lanes:
        lines.append("lanes waiting for the queues to drain: "
                     + ", ".join(summary.waiting_lanes))
    if summary.lanes:
        lines.append("")
        lines.append(f"{'LANE':<16} {'HELD':>6} {'DUE':>6} {'PAUSED':>6} {'LATER':>6}  "
                     f"{'NEXT DUE':<32} LAST DUE")
        for g in summary.lanes:
            lines.append(f"{g.lane:<16} {g.held:>6} {g.due:>6} {g.paused:>6} {g.waiting:>6}  "
                         f"{_when(g.next_due_ms, now_ms):<32} {_when(g.last_due_ms, now_ms)}")
        lines.append("")
        lines.append(f"{'LANE':<16} {'DESTINATION':<32} {'HELD':>6} {'DUE':>6}  NEXT DUE")
        for g in summary.destinations:
            lines.append(f"{g.lane:<16} {g.destination or '':<32} {g.held:>6} {g.due:>6}  "
                         f"{_when(g.next_due_ms, now_ms)}")
    for b in summary.broken:
        lines.append(f"unreadable record: {b.queue_id}: {b.problem} (not released)")
    if summary.unknown_lanes:
        lines.append("records of lanes no longer configured (released last): "
                     + ", ".join(summary.unknown_lanes))
    return "\n".join(lines)
