"""CPU per milter callback without sockets: where the milter's Python time goes.

Feeds the messages of ``bench/milter_bench.py`` (1 recipient, 8 headers, one of them a
forged lane header) straight into the callbacks, through pymilter's test context (no
libmilter, no socket), for the do-nothing floor of that bench and for ``PolicyMilter``
with its policy (a decision at RCPT and one at the end; ``eom-only``: the end only, as with
``rcpt_limits: policy_server``) on the embedded memory store. Prints the time per message
spent in each callback, best of ``--rounds``: what the Python side adds to libmilter's own
per-message cost, which both milters pay alike.

    python bench/milter_profile.py                    # 20,000 messages, best of 3

No network, no files.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import Milter
import Milter.test  # @noreply callbacks answer CONTINUE without an MTA
from Milter.testctx import TestCtx
from milter_bench import HEADERS, POLICY
from milter_floor import Floor

from mqpolicy.decision.service import DecisionService
from mqpolicy.milter.callbacks import PolicyMilter
from mqpolicy.milter.gateway import DecisionGateway
from mqpolicy.policy.loader import parse_policy
from mqpolicy.store.memory import MemoryStore

STEPS = ("MAIL", "RCPT", "headers", "end")


class QuietCtx(TestCtx):  # type: ignore[misc]  # pymilter is untyped
    """A test context that takes header changes without parsing a message."""

    def addheader(self, field: str, value: str, idx: int) -> None:
        pass

    def chgheader(self, field: str, idx: int, value: str) -> None:
        pass


def attach(milter: Any) -> tuple[Any, QuietCtx]:
    ctx = QuietCtx()
    milter._setctx(ctx)
    ctx._stage = -1
    opts = list(TestCtx.default_opts)
    milter.negotiate(opts)
    ctx._opts, ctx._protocol = opts, opts[1]
    milter.connect("client.example.net", socket.AF_INET, ("192.0.2.7", 40000))
    return milter, ctx


def floor_milter() -> tuple[Any, QuietCtx]:
    return attach(Floor())


def policy_milter(rcpt_limits: str) -> tuple[Any, QuietCtx]:
    policy = parse_policy(POLICY.format(listen="unix:/unused", rcpt_limits=rcpt_limits),
                          "<bench>")
    assert policy.milter is not None
    loop = asyncio.new_event_loop()  # never run: the memory store decides on the caller
    gateway = DecisionGateway(DecisionService(policy, MemoryStore()), loop, policy.milter)
    return attach(PolicyMilter(gateway))


def measure(make: Callable[[], tuple[Any, QuietCtx]], messages: int) -> dict[str, float]:
    """Microseconds per message in each step."""
    milter, ctx = make()
    headers = [(name, value.encode()) for name, value in HEADERS]
    spent = dict.fromkeys(STEPS, 0)
    clock = time.perf_counter_ns
    for n in range(messages + 2000):  # the first 2,000 warm up
        if n == 2000:
            spent = dict.fromkeys(STEPS, 0)
        ctx._setsymval("i", f"Q{n:X}")
        sender = f"<user{n % 50}@example.com>".encode()
        recipient = f"<r{n}@dest{n % 20}.example>".encode()
        t0 = clock()
        milter.envfrom_bytes(sender)
        t1 = clock()
        milter.envrcpt_bytes(recipient)
        t2 = clock()
        for name, value in headers:
            milter.header_bytes(name, value)
        t3 = clock()
        if milter.eom() != Milter.CONTINUE:
            raise RuntimeError("a message was refused: the budgets are meant to pass")
        t4 = clock()
        spent["MAIL"] += t1 - t0
        spent["RCPT"] += t2 - t1
        spent["headers"] += t3 - t2
        spent["end"] += t4 - t3
    return {step: ns / messages / 1000 for step, ns in spent.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many")
    args = parser.parse_args(argv)
    args.messages = max(1000, min(args.messages, 1_000_000))
    args.rounds = max(1, min(args.rounds, 20))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    contenders: dict[str, Callable[[], tuple[Any, QuietCtx]]] = {
        "floor": floor_milter,
        "mqpolicy": lambda: policy_milter("milter"),
        "mqpolicy eom-only": lambda: policy_milter("policy_server"),
    }
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):  # rounds interleave the milters: the machine drifts
        for name, make in contenders.items():
            got = measure(make, args.messages)
            if name not in best or sum(got.values()) < sum(best[name].values()):
                best[name] = got
    print(f"{args.messages} messages, best of {args.rounds}: microseconds of Python per "
          "message, per callback")
    print(f"{'milter':<18}" + "".join(f"{step:>9}" for step in STEPS) + f"{'total':>9}")
    for name, steps in best.items():
        print(f"{name:<18}" + "".join(f"{steps[step]:>9.1f}" for step in STEPS)
              + f"{sum(steps.values()):>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
