"""CPU per decision without sockets: where the policy server's time goes.

Runs the requests of ``bench/policy_load.py``'s seeded workload through the same pieces the
server uses (decoder, handler, reply encoding) on the embedded memory store and the
policy of ``bench/policy_bench.py``, in one process and one loop, and prints the CPU
per request of each stage. ``--profile`` adds a cProfile listing of the whole path.

    python bench/decision_profile.py                   # 50,000 requests
    python bench/decision_profile.py --requests 200000 --profile

No network, no files but a temporary policy file.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy_bench import POLICY_TEMPLATE
from policy_load import make_workload

from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.codec import PolicyDecoder, encode_reply
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.policy.loader import load_policy
from mqpolicy.policy.model import Policy
from mqpolicy.store.memory import MemoryStore
from mqpolicy.store.urls import check_store_url


def requests_of(count: int, seed: int) -> list[bytes]:
    """``count`` encoded requests, each message with its own instance and queue id."""
    out: list[bytes] = []
    for n, message in enumerate(make_workload(seed, max(1, count // 2)), 1):
        tail = f"instance=bench.{n:x}\nqueue_id=Q{n:X}\n\n".encode()
        out.extend(prefix + tail for prefix in message)
        if len(out) >= count:
            break
    return out[:count]


async def measure(policy: Policy, wire: list[bytes]) -> tuple[dict[str, float], list[str]]:
    """CPU ns of each stage over all of ``wire``, on a fresh store; and the answers."""
    handler = PostfixPolicyHandler(DecisionService(policy, MemoryStore()))
    decoder = PolicyDecoder()
    started = time.process_time_ns()
    decoded = [decoder.feed(data)[0] for data in wire]
    decode_ns = time.process_time_ns() - started

    actions: list[str] = []
    handle = handler.handle
    started = time.process_time_ns()
    for attrs in decoded:
        actions.append(await handle(attrs))
    handle_ns = time.process_time_ns() - started

    started = time.process_time_ns()
    for action in actions:
        encode_reply(action)
    encode_ns = time.process_time_ns() - started
    return {"decode": decode_ns, "handle": handle_ns, "encode": encode_ns}, actions


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="mqpolicy-profile-") as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(POLICY_TEMPLATE.format(port=10040, store_url="memory://",
                                               log_level="warning"))
        policy = load_policy(path, check_store_url)
    wire = requests_of(args.requests, args.seed)
    best: dict[str, float] = {}
    actions: list[str] = []
    for _ in range(args.repeat):  # the best of several runs: this machine is shared
        figures, actions = await measure(policy, wire)
        for name, ns in figures.items():
            best[name] = min(best.get(name, ns), ns)
    n = len(wire)
    accepted = sum(1 for a in actions if a == "DUNNO" or a.startswith("FILTER"))
    print(f"requests {n}, accepted or filtered {accepted / n:.0%}, best of {args.repeat}")
    for name, ns in best.items():
        print(f"{name:8} {ns / n / 1000:7.1f} us/request")
    print(f"{'total':8} {sum(best.values()) / n / 1000:7.1f} us/request")

    if args.profile:
        handle = PostfixPolicyHandler(DecisionService(policy, MemoryStore())).handle
        decoder = PolicyDecoder()
        profiler = cProfile.Profile()
        profiler.enable()
        for data in wire:
            for attrs in decoder.feed(data):
                encode_reply(await handle(attrs))
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
        print(text.getvalue())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is shown")
    parser.add_argument("--profile", action="store_true", help="add a cProfile listing")
    parser.add_argument("--top", type=int, default=30, help="functions in the listing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
