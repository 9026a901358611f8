"""Memory of the embedded store: RSS per million keys, through the decision engine.

Each scenario runs in a fresh Python process (its RSS before and after the decisions, from
``/proc/self/status``), deciding END-OF-MESSAGE requests on ``memory://`` with the policy
below (a per-sender budget of 2000/1h, which lets every message through: one bucket per
sender and one once key per message):

* ``distinct``: N messages from N distinct senders at one instant: a bucket and a once key
  each (``--max-entries`` is raised above 2N so that nothing is refused);
* ``hour``: N messages from 1,000 senders spread evenly over one hour of the callers'
  clock: what ``serve`` holds after an hour of traffic (the once keys still alive: an hour
  of them when they lived an hour, ten minutes' worth now).

Prints entries held, RSS growth, and bytes per entry and MB per million messages.

    .venv/bin/python bench/memory_store_size.py                 # both scenarios, N = 1,000,000
    .venv/bin/python bench/memory_store_size.py --messages 200000 --scenarios distinct
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.request import Request
from mqpolicy.store.memory import MemoryStore

POLICY = """\
store: {url: "memory://"%(extra)s}
lanes: [{name: normal}]
default_lane: normal
limits:
  - {name: per-sender, key: sender, rate: 2000/1h, burst: 50}
"""
T0 = 1_760_000_000_000
HOUR = 3_600_000


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_scenario(name: str, messages: int) -> dict[str, float]:
    """Decide ``messages`` requests in this process; what it cost."""
    bounded = "max_entries" in inspect.signature(MemoryStore).parameters
    extra = f", max_entries: {2 * messages + 1000}" if bounded else ""
    policy = parse_policy(POLICY % {"extra": extra})
    store = (MemoryStore(max_entries=policy.store.max_entries)  # type: ignore[call-arg]
             if bounded else MemoryStore())
    clock = [T0]
    service = DecisionService(policy, store, clock_ms=lambda: clock[0])
    senders = messages if name == "distinct" else 1000
    before = rss_bytes()
    started = time.perf_counter()
    for i in range(messages):
        if name == "hour":
            clock[0] = T0 + i * HOUR // messages
        request = Request.from_policy_attributes({
            "protocol_state": "END-OF-MESSAGE", "sender": f"user{i % senders}@example.com",
            "queue_id": f"4Z{i:010X}", "recipient_count": "1", "size": "2000"})
        verdict = service.decide_now(request)
        if verdict is None or verdict.store_error:
            raise RuntimeError(f"message {i}: no decision from the store")
    elapsed = time.perf_counter() - started
    grown = rss_bytes() - before
    entries = len(store)
    return {"entries": entries, "rss_bytes": grown, "bytes_per_entry": grown / entries,
            "mb_per_million_messages": grown / messages, "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--scenarios", default="distinct,hour")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_scenario(args.child, args.messages)))
        return 0
    for name in args.scenarios.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", name,
                              "--messages", str(args.messages)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out)
        print(f"{name:<9} {args.messages:>9,} messages: {int(r['entries']):>9,} entries, "
              f"RSS +{r['rss_bytes'] / 1e6:7.1f} MB, {r['bytes_per_entry']:6.1f} B/entry, "
              f"{r['mb_per_million_messages']:6.1f} MB per million messages "
              f"({r['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
