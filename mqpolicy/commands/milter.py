"""``mqpolicy milter``: the milter alone (Postfix, Sendmail), without the policy server."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from mqpolicy.commands.serve import serve
from mqpolicy.policy.model import MilterSettings, Policy


def run_milter(policy: Policy, args: argparse.Namespace) -> int:
    """The milter of the policy's milter: section (its defaults without one)."""
    return asyncio.run(serve(policy, Path(args.config), args.log_level,
                             policy.milter or MilterSettings(), policy_server=False))
