"""``mqpolicy scheduler`` (the scheduler as its own process) and ``mqpolicy queue`` (the
qshape of held mail). Called by the composition root, :func:`mqpolicy.cli.main`.

The scheduler needs the hold records from outside the serving process, so a Redis store:
with ``memory://`` the records live inside ``mqpolicy serve``, which then runs the
scheduler itself (``scheduler:`` section present). ``queue`` reads Redis itself, or asks
the running ``serve`` through its admin socket (:mod:`mqpolicy.admin.client`) when the
records live in it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from mqpolicy import __version__
from mqpolicy.admin.client import AdminError, ask_server
from mqpolicy.daemon.reload import reload_on_hangup, reload_policy
from mqpolicy.daemon.sd_notify import sd_notify
from mqpolicy.daemon.structured_log import configure_logging
from mqpolicy.decision.runtime_state import RuntimeRefresher, make_resolver
from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.model import Policy, SchedulerSettings
from mqpolicy.scheduler.mta_queue import QueueCommandError
from mqpolicy.scheduler.planner import QueueSummary
from mqpolicy.scheduler.scheduler import Scheduler, open_mta_queue, queue_summary
from mqpolicy.store.backoff_states import open_backoff_store
from mqpolicy.store.budget import StoreError
from mqpolicy.store.hold_records import records_for
from mqpolicy.store.urls import open_store

__all__ = ["cmd_queue", "cmd_scheduler", "render_queue"]

log = logging.getLogger("mqpolicy.main")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
MEMORY_STORE_HINT = (
    "with store memory:// the hold records live inside `mqpolicy serve`, which runs the "
    "scheduler itself when the policy has a scheduler: section; use a redis:// store to "
    "run it from another process")


# ---------------------------------------------------------------- mqpolicy scheduler


async def cmd_scheduler(policy: Policy, path: Path, log_level: str | None) -> int:
    if policy.scheduler is None:
        print("mqpolicy scheduler: the policy has no scheduler: section", file=sys.stderr)
        return EXIT_USAGE
    if policy.store.in_process:
        print(f"mqpolicy scheduler: {MEMORY_STORE_HINT}", file=sys.stderr)
        return EXIT_USAGE
    listener = configure_logging(policy.log.format, log_level or policy.log.level)
    try:
        return await _run_scheduler(policy, path, log_level)
    except ValueError as exc:  # a store the records cannot live in
        print(f"mqpolicy scheduler: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        listener.stop()


async def _run_scheduler(policy: Policy, path: Path, log_level: str | None) -> int:
    loop = asyncio.get_running_loop()
    settings = policy.scheduler or SchedulerSettings()
    records = records_for(policy, timeout_ms=max(2000, policy.store.timeout_ms))
    store = open_store(policy.store.url, timeout_ms=max(1000, policy.store.timeout_ms),
                       key_prefix=policy.store.key_prefix)
    service = DecisionService(policy, store, resolver=make_resolver(policy))
    backoff_store = (open_backoff_store(policy.store.url, key_prefix=policy.store.key_prefix)
                     if policy.destinations else None)
    scheduler = Scheduler(service, records, open_mta_queue(settings))
    refresher = RuntimeRefresher(service, backoff_store)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reload_on_hangup(loop, lambda: _reload(service, path, log_level))
    log.info("scheduler ready", extra={"fields": {
        "instance": scheduler.queue.instance, "store": policy.store.url,
        "policy": str(path), "owner": scheduler.owner, "version": __version__}})
    sd_notify(f"READY=1\nSTATUS=scheduling {scheduler.queue.instance}")
    try:
        await asyncio.gather(refresher.run(stop), scheduler.run(stop))
    finally:
        sd_notify("STOPPING=1")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if backoff_store is not None:
            await backoff_store.close()
        if service.resolver is not None:
            await service.resolver.aclose()
        await records.close()
        await store.close()
        log.info("scheduler stopped")
    return EXIT_OK


async def _reload(service: DecisionService, path: Path, log_level: str | None) -> None:
    def apply(new: Policy) -> bool:
        if new.scheduler is None or new.store != service.policy.store:
            log.error("reload refused: the scheduler section and the store cannot change "
                      "without a restart", extra={"fields": {"policy": str(path)}})
            return False
        service.replace_policy(new)
        return True

    await reload_policy(path, log_level, apply)


# ---------------------------------------------------------------- mqpolicy queue


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
        try:
            summary = await queue_summary(policy, records,
                                          open_mta_queue(policy.scheduler or SchedulerSettings()))
        except (StoreError, QueueCommandError) as exc:
            print(f"mqpolicy queue: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            await records.close()
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
