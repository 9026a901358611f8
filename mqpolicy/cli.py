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
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from mqpolicy import __version__
from mqpolicy.backoff_store import open_backoff_store
from mqpolicy.budget import CounterStore, StoreError
from mqpolicy.config import (
    ConfigError,
    Limit,
    MetricsSettings,
    MilterSettings,
    Policy,
    load_policy,
)
from mqpolicy.decisions import DecisionService, wall_clock_ms
from mqpolicy.demo import add_demo_arguments, run_demo
from mqpolicy.endpoints import EndpointSyntaxError, parse_endpoint
from mqpolicy.engine import Verdict, not_applied_reason, store_key
from mqpolicy.feedback import FeedbackService
from mqpolicy.hold_records import HoldRecordStore, records_for, waiting_lanes
from mqpolicy.metrics import DESTINATIONS_IN_BACKOFF, MetricsServer, ReloadStats, core_registry
from mqpolicy.milter_service import MilterRunner
from mqpolicy.mx_rollup import DestinationFinder, needs_mx
from mqpolicy.policy_codec import PolicyDecoder, PolicyProtocolError
from mqpolicy.policy_reload import reload_on_hangup, reload_policy
from mqpolicy.policy_server import PolicyServer
from mqpolicy.policy_service import PostfixPolicyHandler, postfix_action
from mqpolicy.postfix_config import add_arguments as add_postfix_config_arguments
from mqpolicy.postfix_config import cmd_postfix_config
from mqpolicy.request import Request, domain_of
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
        return run_top(args, sys.stdout, sys.stdin)
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
                       key_prefix=policy.store.key_prefix)
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
        if records is not None:
            await records.close()
        await store.close()

    # Signals are handled before anything listens: a client that takes an accepted
    # connection for readiness may signal at once (a SIGHUP's default action would end us).
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reload_on_hangup(loop, lambda: _reload(service, path, log_level, reload_stats))
    try:
        if metrics is not None:
            await metrics.start()
        if policy_server:
            await server.start()
        if runner is not None:
            runner.start()
    except OSError as exc:
        log.error("cannot listen", extra={"fields": {"error": str(exc)}})
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
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
        for what in ("listen", "store", "server", "metrics", "milter", "scheduler", "dns"):
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


def parse_request_text(text: str) -> dict[str, str]:
    """``name=value`` lines (one request) as Postfix sends them; blank line optional."""
    decoder = PolicyDecoder()
    data = text.encode("utf-8", "surrogateescape")
    if not data.endswith(b"\n"):
        data += b"\n"
    requests = decoder.feed(data + b"\n")
    if not requests:
        raise PolicyProtocolError("no request found")
    return requests[0]


async def cmd_explain(policy: Policy, text: str, consume: bool, as_json: bool) -> int:
    try:
        attrs = parse_request_text(text)
    except PolicyProtocolError as exc:
        print(f"mqpolicy explain: malformed request: {exc}", file=sys.stderr)
        return EXIT_USAGE
    request = Request.from_policy_attributes(attrs)
    deadline_ms = max(policy.store.timeout_ms, 2000)
    store = open_store(policy.store.url, timeout_ms=deadline_ms,
                       key_prefix=policy.store.key_prefix)
    resolver = make_resolver(policy)
    try:
        service = DecisionService(policy, store, deadline_ms=deadline_ms, resolver=resolver)
        if policy.destinations and request.recipient:
            # the request as the decision sees it (its recipient's destination group), so
            # that what explain says of destination budgets is about that group
            request = request._replace(destination=await service.destination_of(
                domain_of(request.recipient)))
        verdict = await service.decide(request, consume=consume)
    finally:
        await store.close()
        if resolver is not None:
            await resolver.aclose()
    if as_json:
        print(json.dumps(explain_data(request, verdict, policy, consume), indent=2))
    else:
        print(explain_text(request, verdict, policy, consume))
    return EXIT_OK


def explain_data(request: Request, verdict: Verdict, policy: Policy,
                 consume: bool) -> dict[str, object]:
    consulted = {o.name for o in verdict.limits}
    return {
        "stage": request.stage,
        "lane": verdict.lane.name,
        "classified_lane": verdict.classified_lane.name,
        "rule": verdict.rule,
        "action": verdict.action.value,
        "postfix_action": postfix_action(verdict),
        "retry_after_ms": verdict.retry_after_ms,
        "decided_by": verdict.deciding,
        "store": policy.store.url,
        "consumed": consume,
        "store_error": verdict.store_error,
        "limits": [
            {**o._asdict(), "action": o.action.value} for o in verdict.limits
        ],
        "not_applied": [
            {"name": limit.name, "why": _why_not(limit, request, verdict)}
            for limit in policy.limits
            if limit.name not in consulted
        ],
    }


def _why_not(limit: Limit, request: Request, verdict: Verdict) -> str:
    return not_applied_reason(limit, verdict.classified_lane, request) or "not applicable"


def explain_text(request: Request, verdict: Verdict, policy: Policy, consume: bool) -> str:
    data = explain_data(request, verdict, policy, consume)
    lines = [f"stage:   {request.stage}"]
    rule = f" (rule {verdict.rule})" if verdict.rule else " (default lane)"
    lines.append(f"lane:    {verdict.classified_lane.name}{rule}")
    if verdict.demoted:
        lines.append(f"         demoted to {verdict.lane.name}")
    lines.append(f"action:  {verdict.action.value}" +
                 (f" by {verdict.deciding}" if verdict.deciding else ""))
    lines.append(f"postfix: action={postfix_action(verdict)}")
    if verdict.store_error:
        lines.append("store:   ERROR (on_store_error applied)")
    lines.append(f"budgets: {'spent' if consume else 'not spent (use --consume)'} "
                 f"in {policy.store.url}")
    if verdict.limits:
        lines.append("limits consulted:")
        for o in verdict.limits:
            state = "ok" if o.allowed else ("would " if o.monitor else "") + o.action.value
            retry = ""
            if not o.allowed:
                retry = " retry=never" if o.retry_after_ms < 0 else \
                    f" retry={math.ceil(o.retry_after_ms / 1000)}s"
            lines.append(f"  {o.name:<24} key={o.key} rate={o.rate} counted={o.counted} "
                         f"remaining={o.remaining} -> {state}{retry}")
    skipped = data["not_applied"]
    if isinstance(skipped, list) and skipped:
        lines.append("limits not applied:")
        for item in skipped:
            lines.append(f"  {item['name']:<24} {item['why']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- counters


async def cmd_counters(policy: Policy, args: argparse.Namespace) -> int:
    if policy.store.url.startswith("memory://"):
        print("mqpolicy counters: the memory:// store lives inside the serving process; "
              "use a redis:// store to inspect or reset budgets from outside",
              file=sys.stderr)
        return EXIT_USAGE
    limits = {limit.name: limit for limit in policy.limits}
    wanted = args.limit
    if wanted is not None and wanted not in limits:
        print(f"mqpolicy counters: no limit named {wanted!r} "
              f"(limits: {', '.join(sorted(limits))})", file=sys.stderr)
        return EXIT_USAGE
    store = open_store(policy.store.url, timeout_ms=max(policy.store.timeout_ms, 2000),
                       key_prefix=policy.store.key_prefix)
    try:
        if args.counters_command == "reset":
            return await _reset(store, limits[args.limit], args)
        return await _show(store, policy, wanted, args.key, args.max)
    except StoreError as exc:
        print(f"mqpolicy counters: store error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await store.close()


async def _reset(store: CounterStore, limit: Limit, args: argparse.Namespace) -> int:
    if args.all:
        keys = await store.scan(store_key(limit, "*"), count=1_000_000)
    elif args.key:
        keys = [store_key(limit, args.key.lower())]
    else:
        print("mqpolicy counters reset: give a KEY or --all", file=sys.stderr)
        return EXIT_USAGE
    removed = await store.reset(keys) if keys else 0
    print(f"reset {removed} budget(s) of {args.limit}")
    return EXIT_OK


async def _show(store: CounterStore, policy: Policy, wanted: str | None, key: str | None,
                maximum: int) -> int:
    now = wall_clock_ms()
    names = [wanted] if wanted else [limit.name for limit in policy.limits]
    by_name = {limit.name: limit for limit in policy.limits}
    print(f"{'limit':<24} {'key':<40} {'remaining':>10} {'burst':>8}  full in")
    for name in names:
        limit = by_name[name]
        keys = ([store_key(limit, key.lower())] if key
                else await store.scan(store_key(limit, "*"), count=maximum))
        states = await store.inspect(keys, now)
        prefix = limit.bucket_prefix
        for k, state in zip(keys, states, strict=True):
            if state is None:
                if key:
                    print(f"{name:<24} {k[len(prefix):]:<40} {limit.burst:>10} "
                          f"{limit.burst:>8}  (unused)")
                continue
            interval = limit.rate.interval_ms
            used = max(0.0, state.tat_ms - now)
            remaining = max(0, math.floor((limit.burst * interval - used) / interval))
            print(f"{name:<24} {k[len(prefix):]:<40} {remaining:>10} {limit.burst:>8}  "
                  f"{math.ceil(used / 1000)}s")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
