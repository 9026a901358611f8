"""``mqpolicy scheduler``: the scheduler as its own process. Called by the composition root,
:func:`mqpolicy.cli.main`.

The scheduler needs the hold records from outside the serving process, so a Redis store:
with ``memory://`` the records live inside ``mqpolicy serve``, which then runs the
scheduler itself (``scheduler:`` section present).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from mqpolicy import __version__
from mqpolicy.commands.exit_codes import EXIT_OK, EXIT_USAGE
from mqpolicy.commands.reload import RELOAD_SIGNALS, reload_on_hangup, reload_policy
from mqpolicy.daemon.sd_notify import sd_notify
from mqpolicy.daemon.structured_log import configure_logging
from mqpolicy.decision.runtime_state import RuntimeRefresher, make_resolver
from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.model import Policy, SchedulerSettings
from mqpolicy.scheduler.scheduler import Scheduler, open_mta_queue
from mqpolicy.store.opener import open_backoff_store, open_store, records_for

__all__ = ["cmd_scheduler"]

log = logging.getLogger("mqpolicy.main")

MEMORY_STORE_HINT = (
    "with store memory:// the hold records live inside `mqpolicy serve`, which runs the "
    "scheduler itself when the policy has a scheduler: section; use a redis:// store to "
    "run it from another process")


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
    # backoff factors and pauses (a lane or a domain is paused without any destinations)
    backoff_store = open_backoff_store(policy.store.url, key_prefix=policy.store.key_prefix)
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
        for sig in (signal.SIGTERM, signal.SIGINT, *RELOAD_SIGNALS):
            loop.remove_signal_handler(sig)
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
