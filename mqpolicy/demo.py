"""``mqpolicy demo``: a private Postfix, an SMTP sink and mqpolicy, and a realistic mix."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mqpolicy.config import Policy

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "demo.yaml"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=str(DEMO_CONFIG),
                        help="policy file for the demo (default: %(default)s)")


def run_demo(policy: Policy, path: Path, args: argparse.Namespace) -> int:
    print("mqpolicy demo: not available yet", file=sys.stderr)
    return 1
