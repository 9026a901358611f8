"""RedisStore micro-benchmark: client cost per call and decisions/s through ``evaluate``.

Starts its own ``redis-server`` (temporary unix socket and free loopback port, nothing
saved) and stops it by its PID at the end, also on error or Ctrl-C. Never touches any other
Redis. Every phase is bounded by ``--seconds``.

1. per-call cost: sequential ``EVALSHA`` of ``gcra_batch.lua`` through the store's redis-py
   client, RESP2 vs RESP3 (and redis-py's own command packer), for batches of 1, 16, 64 and
   256 decisions, and ``PING`` as the floor: wall and client CPU microseconds per call;
2. decisions/s through :meth:`RedisStore.evaluate` with 1, 8 and 64 concurrent callers, each
   looping (each decision: two checks and a once key, the shape of an end-of-message
   request), with the client's and redis-server's CPU per decision;
3. with ``--open RATES`` instead: decisions arriving independently at a fixed rate (as from
   many policy connections), completed rate and latency, to compare ``--in-flight 1,2``.

    .venv/bin/python bench/store_bench.py                  # unix socket, 2 s per figure
    .venv/bin/python bench/store_bench.py --transport tcp --repeat 3 --in-flight 1,2
    .venv/bin/python bench/store_bench.py --open 2000,5000,8000 --in-flight 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_processes import Processes, sigterm_as_interrupt, wait_accepting
from redis.asyncio import Redis

from mqpolicy.lab.readiness import free_port
from mqpolicy.store.batch_script import SCRIPT_NAME, PendingDecision
from mqpolicy.store.budget import BudgetCheck, budget_check
from mqpolicy.store.redis import RedisStore
from mqpolicy.store.redis_connection import load_script

REDIS_SERVER = os.environ.get("REDIS_SERVER", "/usr/bin/redis-server")
HOUR = 3_600_000


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, str]]:
    """(tcp url, unix url) of a private redis-server, stopped by PID on exit (also on
    SIGTERM)."""
    workdir = Path(tempfile.mkdtemp(prefix="mqbench-", dir="/tmp"))
    procs = Processes(workdir)
    sock_path = str(workdir / "redis.sock")
    port = free_port()
    try:
        with sigterm_as_interrupt():
            redis = procs.start("redis", [
                REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                "--unixsocket", sock_path, "--unixsocketperm", "700", "--save", "",
                "--appendonly", "no", "--dir", str(workdir)])
            wait_accepting(redis, sock_path, timeout=10)
            yield f"redis://127.0.0.1:{port}/0", f"unix://{sock_path}?db=0"
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


SENDER = budget_check("", 1_000_000, HOUR, 1_000_000, 1)  # 1M/1h, as a limit holds it
CLIENT = budget_check("", 10_000_000, HOUR, 10_000_000, 1)


def decision(i: int) -> tuple[list[BudgetCheck], str]:
    checks = [
        BudgetCheck(f"rl:sender:s{i % 1000}", SENDER.refill, SENDER.unit, SENDER.burst, 1),
        BudgetCheck(f"rl:client:c{i % 100}", CLIENT.refill, CLIENT.unit, CLIENT.burst, 1),
    ]
    return checks, f"once:{i}"


async def per_call_cost(
    url: str, protocol: int, batch: int, seconds: float, *, c_packer: bool = True,
    store_path: bool = False,
) -> tuple[float, float]:
    """(wall us, client CPU us) per sequential EVALSHA carrying ``batch`` decisions (0: PING).

    Goes through the same client set-up as RedisStore (``RedisStore._client``), so it includes
    the C packer; the decisions are encoded before the clock starts. ``store_path``: the call
    the store makes (``RedisStore._evalsha``, a pooled connection past the client's
    per-command layers) instead of redis-py's ``Script`` call.
    """
    store = RedisStore(url, timeout_ms=5000, protocol=protocol)
    client = store._client
    if not c_packer:  # back to redis-py's own packer, for comparison
        pool = client.connection_pool
        pool.connection_class = pool.connection_class.__mro__[2]
    try:
        script = client.register_script(load_script(SCRIPT_NAME))
        loop = asyncio.get_running_loop()
        counter = itertools.count()
        payloads = []
        for _ in range(50):
            pending = []
            for _ in range(batch):
                checks, once = decision(next(counter))
                pending.append(
                    PendingDecision(
                        checks, int(time.time() * 1000), once, 86_400_000, loop.create_future()
                    )
                )
            payloads.append(store._encode(pending))
        await client.ping()
        if batch:
            await script(keys=payloads[0][0], args=payloads[0][1])
        calls = 0
        start, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            if batch == 0:
                await client.ping()
            elif store_path:
                keys, args = payloads[calls % len(payloads)]
                await store._evalsha(keys, args)
            else:
                keys, args = payloads[calls % len(payloads)]
                await script(keys=keys, args=args)
            calls += 1
        wall = (time.perf_counter() - start) / calls * 1e6
        return wall, (time.process_time() - cpu) / calls * 1e6
    finally:
        await store.close()


async def server_cpu_s(url: str) -> float:
    client = Redis.from_url(url)
    try:
        info = await client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    finally:
        await client.aclose()


@dataclass
class Run:
    rate: float  # decisions/s
    per_batch: float  # decisions per EVALSHA
    client_us: float  # client CPU per decision
    server_us: float  # redis-server CPU per decision


async def throughput(
    url: str, concurrency: int, seconds: float, *, protocol: int, in_flight: int, max_batch: int
) -> Run:
    """``concurrency`` callers looping on ``evaluate`` for ``seconds``."""
    store = RedisStore(
        url, timeout_ms=1000, protocol=protocol, max_in_flight=in_flight, max_batch=max_batch
    )
    counter = itertools.count()
    done = 0
    stop_at = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            checks, once = decision(next(counter))
            await store.evaluate(checks, int(time.time() * 1000), once)
            done += 1

    server0 = await server_cpu_s(url)
    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    server = await server_cpu_s(url) - server0
    per_batch = store.decisions_sent / max(1, store.batches_sent)
    await store.close()
    return Run(done / elapsed, per_batch, cpu / done * 1e6, server / done * 1e6)


async def open_loop(
    url: str, offered: int, seconds: float, *, in_flight: int, max_batch: int
) -> tuple[float, float, float, float]:
    """Decisions arriving on their own at ``offered``/s (as from many policy connections):
    (completed/s, p50 ms, p99 ms, decisions per EVALSHA)."""
    store = RedisStore(url, timeout_ms=1000, max_in_flight=in_flight, max_batch=max_batch)
    await store.ping()
    counter = itertools.count()
    latencies: list[float] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        checks, once = decision(next(counter))
        began = time.perf_counter()
        await store.evaluate(checks, int(time.time() * 1000), once)
        latencies.append(time.perf_counter() - began)

    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    sent = 0
    while (now := time.perf_counter()) - start < seconds:
        due = int((now - start) * offered) - sent
        for _ in range(due):
            task = loop.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sent += max(0, due)
        await asyncio.sleep(0.0005)
    if tasks:
        await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    latencies.sort()
    per_batch = store.decisions_sent / max(1, store.batches_sent)
    await store.close()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    return len(latencies) / elapsed, p50, p99, per_batch


async def main_async(args: argparse.Namespace, tcp_url: str, unix_url: str) -> None:
    url = unix_url if args.transport == "unix" else tcp_url
    print(
        f"redis-server {REDIS_SERVER} via {args.transport}; {args.seconds:g} s per figure, "
        f"best of {args.repeat}"
    )
    print("\nper-call cost, sequential, us per call: wall / client CPU")
    print(f"{'call':<22}{'RESP2 store':>16}{'RESP2':>16}{'RESP3':>16}"
          f"{'RESP2 redis-py packer':>24}")
    for batch in (0, 1, 16, 64, 256):
        name = "PING" if batch == 0 else f"EVALSHA {batch} decisions"
        cells = []
        for protocol, c_packer, store_path in (
                (2, True, True), (2, True, False), (3, True, False), (2, False, False)):
            wall, cpu = min(  # best of --repeat: the machine may be busy with other work
                [
                    await per_call_cost(url, protocol, batch, args.seconds / 2,
                                        c_packer=c_packer, store_path=store_path)
                    for _ in range(args.repeat)
                ]
            )
            cells.append(f"{wall:>8.0f} / {cpu:<5.0f}")
        print(f"{name:<22}{cells[0]:>16}{cells[1]:>16}{cells[2]:>16}{cells[3]:>24}")
    print("\nRedisStore.evaluate:")
    for in_flight in args.in_flight:
        for protocol in args.protocols:
            for concurrency in args.concurrency:
                run = max(
                    [
                        await throughput(
                            url,
                            concurrency,
                            args.seconds,
                            protocol=protocol,
                            in_flight=in_flight,
                            max_batch=args.max_batch,
                        )
                        for _ in range(args.repeat)
                    ],
                    key=lambda r: r.rate,
                )
                print(
                    f"in_flight={in_flight} RESP{protocol} concurrency {concurrency:>3}: "
                    f"{run.rate:>8,.0f} decisions/s, {run.per_batch:5.1f} per EVALSHA, "
                    f"CPU per decision: client {run.client_us:.0f} us, "
                    f"redis {run.server_us:.0f} us"
                )


async def open_main(args: argparse.Namespace, url: str) -> None:
    print("\nopen loop (decisions arrive independently):")
    for offered in args.open:
        for in_flight in args.in_flight:
            rate, p50, p99, per_batch = await open_loop(
                url, offered, args.seconds, in_flight=in_flight, max_batch=args.max_batch
            )
            print(
                f"offered {offered:>6,}/s in_flight={in_flight}: {rate:>8,.0f}/s done, "
                f"latency p50 {p50:.2f} ms p99 {p99:.2f} ms, {per_batch:5.1f} per EVALSHA"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64]
    )
    parser.add_argument("--in-flight", type=lambda s: [int(x) for x in s.split(",")], default=[2])
    parser.add_argument("--protocols", type=lambda s: [int(x) for x in s.split(",")], default=[2])
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1, help="report the best of N runs")
    parser.add_argument(
        "--open",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[],
        metavar="RATES",
        help="only the open-loop test at these offered decisions/s (e.g. 5000,10000)",
    )
    args = parser.parse_args()
    with redis_server() as (tcp_url, unix_url):
        url = unix_url if args.transport == "unix" else tcp_url
        if args.open:
            asyncio.run(open_main(args, url))
        else:
            asyncio.run(main_async(args, tcp_url, unix_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
