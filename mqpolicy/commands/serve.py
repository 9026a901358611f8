"""``mqpolicy serve``: the policy server, with the milter when the policy has a milter:
section, the admin socket, the metrics server, and the scheduler and feedback where they run
inside it; ``mqpolicy milter`` (:mod:`mqpolicy.commands.milter`) is the same without the
policy server."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import platform
import signal
import sys
import time
from pathlib import Path

from mqpolicy import __version__
from mqpolicy.admin.operations import AdminOperations
from mqpolicy.admin.server import AdminServer
from mqpolicy.commands.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from mqpolicy.commands.reload import RELOAD_SIGNALS, reload_on_hangup, reload_policy
from mqpolicy.daemon.sd_notify import sd_notify
from mqpolicy.daemon.structured_log import configure_logging
from mqpolicy.decision.runtime_state import (
    RuntimeRefresher,
    make_resolver,
    register_steering_metrics,
)
from mqpolicy.decision.service import (
    DecisionService,
    register_decision_metrics,
    register_store_metrics,
    wall_clock_ms,
)
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.delegation.server import (
    PolicyServer,
    ServerCounters,
    SyncPolicyHandler,
    register_policy_server_metrics,
)
from mqpolicy.feedback.follower import FeedbackService
from mqpolicy.metrics.http import MetricsServer
from mqpolicy.metrics.registry import (
    DESTINATIONS_IN_BACKOFF,
    MetricsRegistry,
    ReloadStats,
    register_reload_metrics,
)
from mqpolicy.milter.gateway import MilterCounters, register_milter_metrics
from mqpolicy.milter.runner import MilterRunner
from mqpolicy.policy.destinations import needs_mx
from mqpolicy.policy.endpoints import EndpointSyntaxError, parse_endpoint
from mqpolicy.policy.model import MetricsSettings, MilterSettings, Policy, SchedulerSettings
from mqpolicy.scheduler.scheduler import Scheduler, open_mta_queue, register_scheduler_metrics
from mqpolicy.store.hold_records import HoldRecordStore, waiting_lanes
from mqpolicy.store.opener import open_backoff_store, open_store, records_for

log = logging.getLogger("mqpolicy.main")


def run_serve(policy: Policy, args: argparse.Namespace) -> int:
    """``mqpolicy serve``, ``--metrics-listen`` applied."""
    if args.metrics_listen:
        try:
            metrics_at = parse_endpoint(args.metrics_listen)
        except EndpointSyntaxError as exc:
            print(f"mqpolicy serve: --metrics-listen: {exc}", file=sys.stderr)
            return EXIT_USAGE
        policy = dataclasses.replace(policy, metrics=MetricsSettings(listen=metrics_at))
    return asyncio.run(serve(policy, Path(args.config), args.log_level, policy.milter,
                             with_scheduler=args.with_scheduler))


async def serve(policy: Policy, path: Path, log_level: str | None = None,
                milter: MilterSettings | None = None, policy_server: bool = True,
                with_scheduler: bool = False) -> int:
    listener = configure_logging(policy.log.format, log_level or policy.log.level)
    try:
        return await _serve(policy, path, log_level, milter, policy_server, with_scheduler)
    finally:
        listener.stop()


async def _serve(policy: Policy, path: Path, log_level: str | None,
                 milter: MilterSettings | None, policy_server: bool,
                 with_scheduler: bool = False) -> int:
    loop = asyncio.get_running_loop()
    store = open_store(policy.store.url, timeout_ms=policy.store.timeout_ms,
                       key_prefix=policy.store.key_prefix, max_entries=policy.store.max_entries)
    service = DecisionService(policy, store, resolver=make_resolver(policy))
    backoff_store = open_backoff_store(policy.store.url, key_prefix=policy.store.key_prefix)
    records = _hold_records(policy)
    refresher = RuntimeRefresher(service, backoff_store,
                                 (lambda: waiting_lanes(records)) if records else None)
    # runs while the policy has a feedback section (a reload can add or remove it)
    feedback = FeedbackService(lambda: service.policy, backoff_store, service.destination_of,
                               clock_ms=wall_clock_ms, on_change=refresher.refresh)
    handler: SyncPolicyHandler = PostfixPolicyHandler(service, records)  # answers at once
    server = PolicyServer(
        handler,
        policy.listen,
        idle_timeout_s=policy.server.idle_timeout_s,
        max_request_bytes=policy.server.max_request_size,
        max_connections=policy.server.max_connections,
        drain_timeout_s=policy.server.drain_timeout_s,
        reuse_port=policy.server.reuse_port,
    )
    stop = asyncio.Event()
    runner = (MilterRunner(service, milter, loop, on_exit=stop.set, records=records)
              if milter else None)
    reload_stats = ReloadStats()
    registry = core_registry(service, server=server.counters if policy_server else None,
                             milter=runner.gateway.counters if runner else None,
                             reloads=reload_stats)
    # The scheduler runs here when the records live in this process (memory://) or when
    # asked to; with Redis it is normally `mqpolicy scheduler` on the MTA's host.
    scheduler = (Scheduler(service, records, open_mta_queue(policy.scheduler))
                 if policy.scheduler is not None and records is not None
                 and (records.in_process or with_scheduler) else None)
    if scheduler is not None:
        register_scheduler_metrics(registry, scheduler)
    admin = None
    if policy.admin is not None and policy_server:  # `serve`; `mqpolicy milter` has none
        mta_queue = (scheduler.queue if scheduler is not None
                     else open_mta_queue(policy.scheduler or SchedulerSettings()))
        admin = AdminServer(policy.admin.listen,
                            AdminOperations(service, records, mta_queue, backoff_store,
                                            refresher.refresh).handlers())
    registry.gauge(DESTINATIONS_IN_BACKOFF, "Destinations whose budget is cut by backoff",
                   lambda: len(service.runtime.backoff))
    register_steering_metrics(registry, service)
    metrics = MetricsServer(registry, policy.metrics.listen) if policy.metrics.listen else None

    async def close_the_rest() -> None:
        """What serve opened besides its listeners (closed by then)."""
        await backoff_store.close()
        if service.resolver is not None:
            await service.resolver.aclose()
        if metrics is not None:
            metrics.close()
            await metrics.wait_closed()
        if admin is not None:
            admin.close()
            await admin.wait_closed()
        if records is not None:
            await records.close()
        await store.close()

    # Signals are handled before anything listens: a client that takes an accepted
    # connection for readiness may signal at once (a SIGHUP's default action would end us).
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reload_on_hangup(loop, lambda: _reload(service, path, log_level, reload_stats))
    await refresher.refresh()  # backoff and pauses in force from the first decision on
    try:
        if metrics is not None:
            await metrics.start()
        if admin is not None:
            await admin.start()
        if policy_server:
            await server.start()
        if runner is not None:
            runner.start()
    except OSError as exc:
        log.error("cannot listen", extra={"fields": {"error": str(exc)}})
        for sig in (signal.SIGTERM, signal.SIGINT, *RELOAD_SIGNALS):
            loop.remove_signal_handler(sig)
        server.close()
        await server.wait_closed()
        await close_the_rest()
        return EXIT_FAILURE
    background = [loop.create_task(refresher.run(stop)), loop.create_task(feedback.run(stop))]
    if scheduler is not None:
        background.append(loop.create_task(_run_scheduler(scheduler, stop)))
    endpoints = " ".join([*(str(e) for e in server.bound_endpoints),
                          *([f"milter={runner.endpoint}"] if runner else []),
                          *([f"admin={admin.endpoint}"] if admin else []),
                          *(f"metrics={e}" for e in (metrics.bound_endpoints if metrics else []))])
    log.info("ready", extra={"fields": {"listen": endpoints, "store": policy.store.url,
                                        "policy": str(path), "version": __version__}})
    sd_notify(f"READY=1\nSTATUS=serving policy on {endpoints}")
    await stop.wait()
    sd_notify("STOPPING=1")
    log.info("stopping: draining connections")
    for sig in (signal.SIGTERM, signal.SIGINT, *RELOAD_SIGNALS):
        loop.remove_signal_handler(sig)
    await asyncio.gather(server.drain(), *([runner.stop()] if runner else []))
    await asyncio.gather(*background, return_exceptions=True)
    await close_the_rest()
    log.info("stopped")
    return EXIT_FAILURE if runner is not None and runner.failed else EXIT_OK


def _hold_records(policy: Policy) -> HoldRecordStore | None:
    """Where holds are recorded for the scheduler; None (plain MTA holds, logged) for a
    store that cannot keep them."""
    try:
        return records_for(policy, timeout_ms=max(1000, policy.store.timeout_ms))
    except ValueError as exc:
        log.warning("no hold records: held mail stays on hold until released by hand",
                    extra={"fields": {"error": str(exc)}})
        return None


async def _run_scheduler(scheduler: Scheduler, stop: asyncio.Event) -> None:
    """The scheduler inside serve: an unexpected error is logged, never stops the server."""
    try:
        await scheduler.run(stop)
    except Exception:
        log.exception("scheduler stopped after an unexpected error")


async def _reload(service: DecisionService, path: Path, log_level: str | None,
                  stats: ReloadStats) -> None:
    def apply(new: Policy) -> bool:
        old = service.policy
        for what in ("listen", "admin", "store", "server", "metrics", "milter", "scheduler",
                     "dns"):
            if getattr(old, what) != getattr(new, what):
                log.warning("changed setting needs a restart to take effect",
                            extra={"fields": {"setting": what}})
        if needs_mx([d.matcher for d in new.destinations]) and service.resolver is None:
            log.warning("mx destinations need a restart to be looked up; until then they "
                        "match by domain only", extra={"fields": {"setting": "destinations"}})
        service.replace_policy(new)
        return True

    if await reload_policy(path, log_level, apply):
        stats.succeeded()
    else:
        stats.refused()


def core_registry(
    service: DecisionService,
    *,
    server: ServerCounters | None = None,
    milter: MilterCounters | None = None,
    reloads: ReloadStats | None = None,
) -> MetricsRegistry:
    """A registry with every metric of the decision service, its store, the policy
    server's and the milter's counters (when they run) and the reload counts."""
    registry = MetricsRegistry()
    started = time.time()
    registry.gauge("mqpolicy_build_info", "Version of the running mqpolicy (value 1)",
                   lambda: {(__version__, platform.python_version()): 1},
                   labels=("version", "python"))
    registry.gauge("mqpolicy_start_time_seconds", "When this process started (Unix time)",
                   lambda: started)
    register_decision_metrics(registry, service)
    register_store_metrics(registry, service.store)
    if server is not None:
        register_policy_server_metrics(registry, server)
    if milter is not None:
        register_milter_metrics(registry, milter)
    if reloads is not None:
        register_reload_metrics(registry, reloads)
    return registry
