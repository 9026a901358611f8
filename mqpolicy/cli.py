"""The ``mqpolicy`` command: the one composition root.

``main(argv)`` parses the command line, reads the policy and hands it to the subcommand's
module in :mod:`mqpolicy.commands`, which builds every part with its dependencies passed
explicitly, runs it and returns the exit code. Nothing is configured at import time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mqpolicy import __version__
from mqpolicy.commands.check import cmd_check
from mqpolicy.commands.counters import cmd_counters
from mqpolicy.commands.demo import add_demo_arguments, run_demo
from mqpolicy.commands.destinations import add_destinations_arguments, cmd_destinations
from mqpolicy.commands.exit_codes import EXIT_FAILURE
from mqpolicy.commands.explain import run_explain
from mqpolicy.commands.feedback import cmd_feedback
from mqpolicy.commands.milter import run_milter
from mqpolicy.commands.pause import add_pause_arguments, cmd_pause
from mqpolicy.commands.postfix_config import add_arguments as add_postfix_config_arguments
from mqpolicy.commands.postfix_config import cmd_postfix_config
from mqpolicy.commands.queue import cmd_queue
from mqpolicy.commands.release_agent import cmd_release_agent
from mqpolicy.commands.replay import add_replay_arguments, cmd_replay
from mqpolicy.commands.scheduler import cmd_scheduler
from mqpolicy.commands.serve import run_serve
from mqpolicy.commands.top import add_top_arguments, run_top
from mqpolicy.daemon.structured_log import skip_record_sources
from mqpolicy.policy.loader import ConfigError, load_policy
from mqpolicy.scheduler.release_agent import DEFAULT_AGENT_ENDPOINT
from mqpolicy.scheduler.scheduler import open_mta_queue
from mqpolicy.store.urls import check_store_url

DEFAULT_CONFIG = "/etc/mqpolicy/mqpolicy.yaml"


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

    destinations = sub.add_parser(
        "destinations", help="every destination: patterns, budget, backoff, pause, evidence, "
        "held mail; `reset NAME` ends a backoff")
    _config_arg(destinations)
    add_destinations_arguments(destinations)

    pause = sub.add_parser("pause", help="hold the mail of a destination or a lane "
                           "(accepted, never refused) until resumed or --for runs out")
    _config_arg(pause)
    resume = sub.add_parser("resume", help="end a pause: the scheduler releases the held "
                            "mail, highest lane first")
    _config_arg(resume)
    add_pause_arguments(pause, resume)

    replay = sub.add_parser("replay", help="run the policy over a Postfix log: what it "
                            "would have accepted, deferred, held, rejected (--compare another)")
    _config_arg(replay)
    add_replay_arguments(replay)

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
        return run_top(args, sys.stdout, sys.stdin)
    try:
        policy = load_policy(args.config, check_store_url)
    except ConfigError as exc:
        print(f"mqpolicy: invalid policy file, nothing started:\n{exc}", file=sys.stderr)
        return EXIT_FAILURE
    if command == "serve":
        return run_serve(policy, args)
    if command == "milter":
        return run_milter(policy, args)
    if command == "explain":
        return run_explain(policy, args)
    if command == "postfix-config":
        return cmd_postfix_config(policy, args)
    if command == "replay":
        return cmd_replay(policy, args, sys.stdout, sys.stderr)
    if command == "demo":
        return run_demo(policy, Path(args.config), args)
    if command == "scheduler":
        return asyncio.run(cmd_scheduler(policy, Path(args.config), args.log_level))
    if command == "queue":
        return asyncio.run(cmd_queue(policy, args.json, sys.stdout))
    if command == "destinations":
        return asyncio.run(cmd_destinations(policy, args, sys.stdout))
    if command in ("pause", "resume"):
        return asyncio.run(cmd_pause(policy, args, sys.stdout))
    if command == "feedback":
        return asyncio.run(cmd_feedback(policy, args.log_level))
    if command == "release-agent":
        return asyncio.run(cmd_release_agent(
            policy, Path(args.config), args.listen, args.log_level,
            lambda settings: open_mta_queue(settings, through_agent=False)))
    return asyncio.run(cmd_counters(policy, args))

