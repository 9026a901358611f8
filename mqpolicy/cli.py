"""The ``mqpolicy`` command: the one composition root.

``main(argv)`` parses the command line, builds every part with its dependencies passed
explicitly, runs it and returns the exit code. Nothing is configured at import time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from mqpolicy import __version__
from mqpolicy.admin_client import AdminError, AdminUnavailable, ask_server
from mqpolicy.admin_operations import AdminOperations
from mqpolicy.admin_server import AdminServer
from mqpolicy.backoff_store import open_backoff_store
from mqpolicy.budget import StoreError
from mqpolicy.config import (
    ConfigError,
    MetricsSettings,
    MilterSettings,
    Policy,
    SchedulerSettings,
    load_policy,
)
from mqpolicy.counter_report import (
    CounterRow,
    counter_rows,
    render_counter_rows,
    reset_budgets,
)
from mqpolicy.decisions import DecisionService, wall_clock_ms
from mqpolicy.demo import add_demo_arguments, run_demo
from mqpolicy.endpoints import EndpointSyntaxError, parse_endpoint
from mqpolicy.explanation import (
    Explanation,
    explain,
    parse_request_text,
    render_explanation,
)
from mqpolicy.feedback import FeedbackService
from mqpolicy.hold_records import HoldRecordStore, records_for, waiting_lanes
from mqpolicy.metrics import DESTINATIONS_IN_BACKOFF, MetricsServer, ReloadStats, core_registry
from mqpolicy.milter_service import MilterRunner
from mqpolicy.mx_rollup import DestinationFinder, needs_mx
from mqpolicy.policy_codec import PolicyProtocolError
from mqpolicy.policy_reload import reload_on_hangup, reload_policy
from mqpolicy.policy_server import PolicyServer
from mqpolicy.policy_service import PostfixPolicyHandler
from mqpolicy.postfix_config import add_arguments as add_postfix_config_arguments
from mqpolicy.postfix_config import cmd_postfix_config
from mqpolicy.release_agent import DEFAULT_AGENT_ENDPOINT, cmd_release_agent
from mqpolicy.request import Request
from mqpolicy.runtime_state import RuntimeRefresher, make_resolver
from mqpolicy.scheduler import Scheduler, open_mta_queue, register_scheduler_metrics
from mqpolicy.scheduler_cli import cmd_queue, cmd_scheduler
from mqpolicy.sd_notify import sd_notify
from mqpolicy.store_factory import open_store
from mqpolicy.structured_log import configure_logging, skip_record_sources
from mqpolicy.top_view import add_top_arguments, run_top

DEFAULT_CONFIG = "/etc/mqpolicy/mqpolicy.yaml"
log = logging.getLogger("mqpolicy.main")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config",
        default=os.environ.get("MQPOLICY_CONFIG", DEFAULT_CONFIG),
        help=f"policy file (default: $MQPOLICY_CONFIG or {DEFAULT_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqpolicy",
        description="Priority lanes, shared rate budgets and delayed delivery for Postfix.",
    )
    parser.add_argument("--version", action="version", version=f"mqpolicy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the Postfix policy server "
                           "(and the milter when the policy has a milter: section)")
    _config_arg(serve)
    serve.add_argument("--log-level", help="override log.level from the policy file")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help="override metrics.listen (one port per process with reuse_port)")
    serve.add_argument("--with-scheduler", action="store_true",
                       help="also run the hold-queue scheduler with a redis:// store (with "
                       "memory:// it always runs inside serve when the policy has a "
                       "scheduler: section)")

    milter = sub.add_parser("milter", help="run the milter only (Postfix, Sendmail)")
    _config_arg(milter)
    milter.add_argument("--log-level", help="override log.level from the policy file")

    check = sub.add_parser("check", help="validate a policy file, list every error")
    _config_arg(check)

    explain = sub.add_parser(
        "explain", help="show the decision for a request given as name=value lines"
    )
    _config_arg(explain)
    explain.add_argument("request", nargs="?", default="-",
                         help="file with name=value lines as Postfix sends them (- = stdin)")
    explain.add_argument("--consume", action="store_true",
                         help="spend the budgets as a real decision would")
    explain.add_argument("--json", action="store_true", help="print JSON")

    counters = sub.add_parser("counters", help="inspect or reset budgets by key")
    _config_arg(counters)
    csub = counters.add_subparsers(dest="counters_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="budgets in use (optionally one limit, one key)")
    show.add_argument("limit", nargs="?")
    show.add_argument("key", nargs="?")
    show.add_argument("--max", type=int, default=1000, help="list at most this many keys")
    reset = csub.add_parser("reset", help="give a key its full budget back")
    reset.add_argument("limit")
    reset.add_argument("key", nargs="?", help="the key value; omit with --all")
    reset.add_argument("--all", action="store_true", help="every key of the limit")

    postfix_config = sub.add_parser(
        "postfix-config", help="print the Postfix settings the policy needs, or --check them"
    )
    _config_arg(postfix_config)
    add_postfix_config_arguments(postfix_config)

    scheduler = sub.add_parser(
        "scheduler", help="release held mail by lane priority, schedule and budgets "
        "(needs a redis:// store; with memory:// it runs inside serve)")
    _config_arg(scheduler)
    scheduler.add_argument("--log-level", help="override log.level from the policy file")

    queue = sub.add_parser("queue", help="what is held, per lane and destination, "
                           "with due times")
    _config_arg(queue)
    queue.add_argument("--json", action="store_true", help="print JSON")

    demo = sub.add_parser("demo", help="run a private Postfix with mqpolicy and send a mix")
    add_demo_arguments(demo)

    feedback = sub.add_parser(
        "feedback", help="follow the delivery log and back off destinations that ask for it")
    _config_arg(feedback)
    feedback.add_argument("--log-level", help="override log.level from the policy file")

    agent = sub.add_parser(
        "release-agent", help="as root: release held mail (and list Sendmail's queue) "
        "for the unprivileged scheduler, over a unix socket")
    _config_arg(agent)
    agent.add_argument("--listen", metavar="unix:/PATH",
                       help="the socket (default: scheduler.release_agent, else "
                       f"{DEFAULT_AGENT_ENDPOINT})")
    agent.add_argument("--log-level", help="override log.level from the policy file")

    top = sub.add_parser("top", help="live view of a running server: decisions/s by lane, "
                         "busiest keys, hold queue, backoff (reads its metrics port)")
    _config_arg(top)
    add_top_arguments(top)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    skip_record_sources()
    args = build_parser().parse_args(argv)
    command: str = args.command
    if command == "check":
        return cmd_check(args.config, sys.stdout)
    if command == "top":
        return run_top(args, sys.stdout)
    try:
        policy = load_policy(args.config)
        milter = policy.milter
    except ConfigError as exc:
        print(f"mqpolicy: invalid policy file, nothing started:\n{exc}", file=sys.stderr)
        return EXIT_FAILURE
    if command == "serve":
        if args.metrics_listen:
            try:
                metrics_at = parse_endpoint(args.metrics_listen)
            except EndpointSyntaxError as exc:
                print(f"mqpolicy serve: --metrics-listen: {exc}", file=sys.stderr)
                return EXIT_USAGE
            policy = dataclasses.replace(policy, metrics=MetricsSettings(listen=metrics_at))
        return asyncio.run(serve(policy, Path(args.config), args.log_level, milter,
                                 with_scheduler=args.with_scheduler))
    if command == "milter":
        return asyncio.run(serve(policy, Path(args.config), args.log_level,
                                 milter or MilterSettings(), policy_server=False))
    if command == "explain":
        source: str = args.request
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"mqpolicy explain: cannot read {source}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return asyncio.run(cmd_explain(policy, text, args.consume, args.json))
    if command == "postfix-config":
        return cmd_postfix_config(policy, args)
    if command == "demo":
        return run_demo(policy, Path(args.config), args)
    if command == "scheduler":
        return asyncio.run(cmd_scheduler(policy, Path(args.config), args.log_level))
    if command == "queue":
        return asyncio.run(cmd_queue(policy, args.json, sys.stdout))
    if command == "feedback":
        return asyncio.run(cmd_feedback(policy, args.log_level))
    if command == "release-agent":
        return asyncio.run(cmd_release_agent(
            policy, Path(args.config), args.listen, args.log_level,
            lambda settings: open_mta_queue(settings, through_agent=False)))
    return asyncio.run(cmd_counters(policy, args))


# ---------------------------------------------------------------- check


def cmd_check(path: str, out: TextIO) -> int:
    try:
        policy = load_policy(path)
        milter = policy.milter
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=out)
        print(f"{len(exc.issues)} error(s) in {path}", file=out)
        return EXIT_FAILURE
    print(
        f"{path}: OK: {len(policy.lanes)} lanes, {len(policy.classify)} classify rules, "
        f"{len(policy.limits)} limits, store {policy.store.url}"
        + (f", milter {milter.listen}" if milter else ""),
        file=out,
    )
    return EXIT_OK


# ---------------------------------------------------------------- serve


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
    server = PolicyServer(
        PostfixPolicyHandler(service, records),
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
                            AdminOperations(service, records, mta_queue).handlers())
    registry.gauge(DESTINATIONS_IN_BACKOFF, "Destinations whose budget is cut by backoff",
                   lambda: len(service.runtime.backoff))
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
        server.close()
        await server.wait_closed()
        await close_the_rest()
        return EXIT_FAILURE
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reload_on_hangup(loop, lambda: _reload(service, path, log_level, reload_stats))
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
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
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


# ---------------------------------------------------------------- feedback


async def cmd_feedback(policy: Policy, log_level: str | None) -> int:
    """``mqpolicy feedback``: its own process, sharing backoff states through Redis."""
    if policy.feedback is None:
        print("mqpolicy feedback: the policy has no feedback section", file=sys.stderr)
        return EXIT_USAGE
    if not policy.destinations:
        print("mqpolicy feedback: no destinations to back off (add destinations:)",
              file=sys.stderr)
        return EXIT_USAGE
    if policy.store.url.startswith("memory:"):
        print("mqpolicy feedback: with store memory:// the backoff states live inside "
              "`mqpolicy serve`; a feedback section there runs it in that process",
              file=sys.stderr)
        return EXIT_USAGE
    listener = configure_logging(policy.log.format, log_level or policy.log.level)
    loop = asyncio.get_running_loop()
    backoff_store = open_backoff_store(policy.store.url, key_prefix=policy.store.key_prefix)
    finder = DestinationFinder(make_resolver(policy))
    service = FeedbackService(lambda: policy, backoff_store,
                              lambda domain: finder.find(domain, policy.destinations),
                              clock_ms=wall_clock_ms)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    sd_notify("READY=1\nSTATUS=following the delivery log")
    try:
        await service.follow(stop)
    finally:
        sd_notify("STOPPING=1")
        await backoff_store.close()
        if finder.resolver is not None:
            await finder.resolver.aclose()
        listener.stop()
    return EXIT_OK


# ---------------------------------------------------------------- explain


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
    try:
        service = DecisionService(policy, store, deadline_ms=deadline_ms, resolver=resolver)
        return await explain(service, Request.from_policy_attributes(attrs), consume, note)
    finally:
        await store.close()
        if resolver is not None:
            await resolver.aclose()


# ---------------------------------------------------------------- counters


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
            rows = await counter_rows(store, chosen, key, args.max, wall_clock_ms())
            print(render_counter_rows(rows))
    except StoreError as exc:
        print(f"mqpolicy counters: store error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await store.close()
    return EXIT_OK


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


if __name__ == "__main__":
    raise SystemExit(main())
