"""``mqpolicy postfix-config``: the command line and the I/O around
:mod:`mqpolicy.postfix.config_generator` (print the settings a policy needs, or ``--check``
a Postfix configuration against them)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

from mqpolicy.policy.endpoints import EndpointSyntaxError
from mqpolicy.policy.model import Policy
from mqpolicy.postfix.config_check import Finding, Status, compare
from mqpolicy.postfix.config_generator import (
    DEFAULT_POLICY_ACTION,
    PostfixConfigOptions,
    generate,
    needs_destination_transports,
)
from mqpolicy.postfix.postconf import read_parameters, read_postfix
from mqpolicy.postfix.settings import DEFAULT_POSTFIX_DIR, DEFAULT_QUEUE_DIR, SECTIONS

EXIT_OK = 0

EXIT_MISMATCH = 1

EXIT_USAGE = 2


def _names_unix_socket(policy: Policy, args: argparse.Namespace) -> bool:
    """Whether the addresses Postfix gets may be unix sockets (their names then depend on
    the queue directory)."""
    addresses = [args.policy_endpoint, args.milter]
    return (any(a and a.startswith("unix:") for a in addresses)
            or (not args.policy_endpoint and any(e.is_unix for e in policy.listen)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mqpolicy postfix-config`` (after ``-c``)."""
    parser.add_argument("--milter", metavar="ADDRESS",
                        help="the mqpolicy milter's address (inet:HOST:PORT or unix:/PATH); "
                             "without it the milter lines are printed commented out")
    parser.add_argument("--policy-endpoint", metavar="ADDRESS",
                        help="where Postfix reaches the policy server (default, from the "
                             "policy file's listen: a unix socket inside the queue "
                             "directory, else the first TCP entry, else the first)")
    parser.add_argument("--config-directory", metavar="DIR", default=None,
                        help=f"Postfix config directory holding the header-checks map "
                             f"(default: the --check DIR, else {DEFAULT_POSTFIX_DIR})")
    parser.add_argument("--queue-directory", metavar="DIR", default=None,
                        help="Postfix's queue_directory: a unix socket inside it is named "
                             "relative to it, which a chrooted smtpd reaches (default: as "
                             "postconf reads it from the --check DIR or --config-directory, "
                             f"else {DEFAULT_QUEUE_DIR})")
    parser.add_argument("--relayhost", metavar="NEXTHOP", default=None,
                        help="the next hop of destination transports in the transport map "
                             "(default: relayhost as postconf reads it from the --check "
                             "DIR or --config-directory; '' for MX delivery)")
    parser.add_argument("--default-action", default=DEFAULT_POLICY_ACTION, metavar="ACTION",
                        help="smtpd_policy_service_default_action (default: %(default)s)")
    parser.add_argument("--section", choices=SECTIONS,
                        help="print one block only (to append to the file it belongs in)")
    parser.add_argument("--check", metavar="DIR",
                        help="compare the Postfix configuration in DIR with what the policy "
                             "needs; exit 1 when something is missing or different")


def cmd_postfix_config(policy: Policy, args: argparse.Namespace,
                       out: TextIO | None = None) -> int:
    out = out or sys.stdout
    config_dir = args.config_directory or args.check or DEFAULT_POSTFIX_DIR
    relayhost, queue_dir = args.relayhost, args.queue_directory
    if queue_dir is not None and not queue_dir.startswith("/"):
        print(f"mqpolicy postfix-config: --queue-directory must be absolute: {queue_dir}",
              file=sys.stderr)
        return EXIT_USAGE
    # what the options leave unsaid and the output depends on, as this Postfix has it
    unknown: dict[str, tuple[str, str]] = {}
    if relayhost is None and needs_destination_transports(policy):
        unknown["relayhost"] = ("relay host unknown", "the transport map names no next hop")
    if queue_dir is None and _names_unix_socket(policy, args):
        unknown["queue_directory"] = ("queue_directory unknown",
                                      f"assuming {DEFAULT_QUEUE_DIR}")
    if unknown:
        try:
            found = read_parameters(args.check or config_dir, *unknown)
            relayhost = found.get("relayhost", relayhost)
            queue_dir = found.get("queue_directory") or queue_dir
        except (OSError, subprocess.SubprocessError) as exc:
            for name, (what, then) in unknown.items():
                print(f"mqpolicy postfix-config: {what} ({exc}); {then}: pass "
                      f"--{name.replace('_', '-')}", file=sys.stderr)
    try:
        config = generate(policy, PostfixConfigOptions(
            policy_endpoint=args.policy_endpoint, milter=args.milter,
            config_directory=config_dir, default_action=args.default_action,
            relayhost=relayhost, queue_directory=queue_dir or DEFAULT_QUEUE_DIR,
        ))
    except EndpointSyntaxError as exc:
        print(f"mqpolicy postfix-config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.check:
        try:
            state = read_postfix(args.check, (s.name for s in config.all_settings))
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"mqpolicy postfix-config: cannot read the Postfix configuration: {exc}",
                  file=sys.stderr)
            return EXIT_USAGE
        return report(compare(config, state), args.check, out)
    if args.section:
        out.write(config.section(args.section))
    else:
        out.write(config.render())
    return EXIT_OK


def report(findings: Sequence[Finding], config_dir: str, out: TextIO) -> int:
    bad = [f for f in findings if f.status in (Status.MISSING, Status.DIFFERENT)]
    for finding in _ordered(findings):
        print(finding, file=out)
    counts = {s: sum(1 for f in findings if f.status is s) for s in Status}
    summary = ", ".join(f"{counts[s]} {s.value}" for s in Status if counts[s])
    verdict = "needs changes" if bad else "has what the policy needs"
    print(f"{config_dir}: {verdict} ({summary})", file=out)
    return EXIT_MISMATCH if bad else EXIT_OK


def _ordered(findings: Iterable[Finding]) -> list[Finding]:
    rank = {Status.MISSING: 0, Status.DIFFERENT: 1, Status.WARNING: 2, Status.OK: 3}
    return sorted(findings, key=lambda f: rank[f.status])
