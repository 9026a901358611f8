"""``mqpolicy check``: validate a policy file, every error listed with its line."""

from __future__ import annotations

from typing import TextIO

from mqpolicy.commands.exit_codes import EXIT_FAILURE, EXIT_OK
from mqpolicy.policy.loader import ConfigError, load_policy
from mqpolicy.policy.model import Policy
from mqpolicy.store.urls import check_store_url


def cmd_check(path: str, out: TextIO) -> int:
    try:
        policy = load_policy(path, check_store_url)
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
    for line in header_warnings(policy):
        print(line, file=out)
    return EXIT_OK


def header_warnings(policy: Policy) -> list[str]:
    """Without a ``milter:`` section nothing sees the headers: every rule and limit with a
    header condition never matches (the policy server skips them)."""
    if policy.milter is not None:
        return []
    why = "looks at headers, which only the milter sees: it never matches without a milter"
    return ([f"warning: classify rule {rule.name} {why}"
             for rule in policy.classify if rule.needs_headers]
            + [f"warning: limit {limit.name} {why}"
               for limit in policy.limits if limit.needs_headers])
