"""Budgets in a Redis Cluster: every bucket atomic in its slot, a decision split by slot.

URL: ``redis+cluster://[user:password@]host[:port][,host[:port]...][/0]`` lists startup
nodes (default port 6379; the client discovers the rest); ``rediss+cluster://`` uses TLS.

Where the keys live
-------------------
A decision's keys are ``<prefix>rl:<limit>:<rate>/<period>/<burst>:<key value>`` (one per
bucket) and ``<prefix>seen:<message>`` (its once key). A Lua call in a cluster may only
touch keys of one hash slot. Hash tags cannot put one decision's keys together: the only
thing they share is the message, and a bucket tagged by the message would be a different
bucket for every message. So every key is hashed whole: a bucket lives in one fixed slot,
the once key in another, and a decision with checks on several buckets usually spans
several slots. (An operator who wants one-Redis semantics on a cluster, and accepts that one
master carries all of mqpolicy's load, puts a hash tag in the prefix, e.g.
``key_prefix: "{mqpolicy}:"``: every key is then in one slot and every decision is one
atomic call, exactly as with :class:`~mqpolicy.store.redis.RedisStore`.)

The protocol
------------
Decisions are coalesced as in the Redis store. A batch is split by slot: each decision's
checks (and its once key) that fall in one slot form a *part*; the parts of one slot, in
decision order, go in ONE ``EVALSHA`` of ``lua/gcra_batch.lua``, and the calls for one
master go in one pipeline (one round trip per master, all masters in parallel). Each part
is all-or-nothing in its slot exactly as a whole decision is on one Redis. Then, per
decision:

* every part committed: the decision is committed; its results are exactly those one Redis
  would give (a check only interacts with checks on the same bucket, hence the same slot);
* some part was refused (a blocking check failed) or found the once key (a duplicate): the
  parts that did commit are *given back* in a second round trip (``lua/gcra_refund.lua``,
  again one call per slot): each bucket's debt is lowered by what the decision added (less
  what may have refilled since, see below: never more than the spend still holds), and a
  once key the decision set is deleted. The result is then what
  one Redis would give: not committed, ``allowed``/``retry_after_ms`` per check as tested,
  ``remaining`` counted after the give-back (a duplicate reports every check allowed, as
  on one Redis).

The guarantee
-------------
* A bucket is never spent beyond its budget: each test-and-spend is atomic in its slot,
  whatever happens to the decision's other slots, and a give-back never returns more than
  was taken.
* A committed decision spent every consuming check that passed, as on one Redis.
* A decision that is refused or a duplicate spends nothing *in the end*, but its spends in
  other slots are visible for one round trip: a decision tested in between (or later in
  the same batch), on the same bucket, may be refused for want of units that are about to
  come back: under-admission, never over-admission. Measured in ``tests/store/test_redis_ha.py``:
  300 concurrent messages against 3 sender buckets of 50 and one shared bucket of 120, all
  in different slots, two batches in flight: 106 to 120 passed at once (over several runs;
  the others' shared units were held by messages their sender refused), the rest on the
  first retry; 120 in all, exactly.
* The batch script reports each bucket's backlog (its debt and time) before the decision, so
  the give-back knows it exactly. A bucket that had a backlog when the decision spent cannot
  have refilled past that spend meanwhile: it gets back exactly what was taken. A bucket
  that was (nearly) full gets back what was taken less the time that passed between the
  decision's ``now_ms`` and the give-back (by Redis' clock: a round trip or two, 1-2 ms
  typically), because that part may have refilled and been spent by someone else; it is
  whole again that much later. (This assumes the callers' clocks agree with Redis', as key
  expiry already does: a caller clock ahead of Redis' by *s* ms could get up to *s* ms of
  budget back too many.)
* A give-back leaves each bucket it touched counted up to the decision's time, as a spend
  of nothing there would (one Redis writes nothing for such a decision): the same as long
  as the callers' clock moves forward; a clock that then steps back finds that bucket as
  it was at the decision's time, refilled up to then (never more than it held then).
* A decision past its deadline when a master runs its part is skipped there (as on one
  Redis: :class:`~mqpolicy.store.redis.RedisClock`, one per master, from the second call
  to that master on) and its other parts are given back.
* When the give-back itself fails (store error, deadline, the process dies), those spends
  stay until the buckets refill by themselves: at most the decision's cost on each bucket,
  for at most cost x interval. ``refunds_failed`` counts it.
* A store error on one slot (master down, no replica promoted yet) fails the decisions that
  need that slot (``on_store_error`` applies); their spends in other slots are given back
  (best effort), and decisions whose keys are all on healthy masters go on. An error that
  leaves it unknown whether a slot spent (a timeout) leaves that spend as it is, as on one
  Redis.
* The once key: two front-ends deciding on the same message *at the same time* on
  different slots could both see it absent, or one could find it set by the other, which
  is then refused and deletes it: the second is then treated as a duplicate (not counted)
  though the first did not count either. Postfix asks the policy server and the milter one
  after the other, so this needs a retried message racing with itself.

Cost: the client sends one call per slot instead of one per batch. Measured (2-core VM,
64 concurrent callers, decisions of 2 checks + a once key, 3 local masters): ~3,000
decisions/s through one ClusterStore (client CPU bound, redis-py's cluster pipeline), ~6,800
with a hash-tagged prefix (one slot), ~12,000 through a RedisStore on one Redis. Several
mqpolicy processes share a cluster as they share one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    ClusterError,
    NoScriptError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from mqpolicy.store.batch_script import (
    DEADLINE_MARGIN,
    SCRIPT_NAME,
    PendingDecision,
    RedisClock,
    decode_batch,
    encode_batch,
    split_reply,
)
from mqpolicy.store.budget import (
    CLOCK_STEP_ALLOWANCE_MS,
    BucketState,
    BudgetCheck,
    BudgetResult,
    Evaluation,
    StoreError,
)
from mqpolicy.store.redis import CoalescingStore, inspect_buckets
from mqpolicy.store.redis_connection import (
    LuaScript,
    glob_escape,
    parse_host_list,
    split_credentials,
    split_store_url,
    unprefixed,
)

CLUSTER_SCHEMES: Final = frozenset({"redis+cluster", "rediss+cluster"})
CLUSTER_URL_FORM: Final = "redis+cluster://[user:password@]host[:port][,host[:port]...][/0]"
REFUND_SCRIPT_NAME: Final = "gcra_refund.lua"
DEFAULT_CLUSTER_PORT: Final = 6379
_ERRORS: Final = (RedisError, RedisClusterException, OSError, TimeoutError)
_RESET_TOPOLOGY: Final = (RedisConnectionError, OSError, ClusterError)
_TOPOLOGY_RESET_INTERVAL_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    """What a ``redis+cluster://`` URL says."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_cluster_url(url: str) -> ClusterTarget:
    """Parse ``redis+cluster://`` / ``rediss+cluster://`` (see the module docstring)."""
    parts = split_store_url(url, CLUSTER_SCHEMES, CLUSTER_URL_FORM)
    scheme = parts.scheme.lower()
    username, password, hosts = split_credentials(parts.netloc)
    if not hosts:
        raise ValueError(f"store {url!r}: no cluster node")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"store {url!r}: a cluster has database 0 only, got {parts.path!r}")
    if parse_qsl(parts.query, keep_blank_values=True):
        raise ValueError(f"store {url!r}: redis+cluster:// takes no options")
    return ClusterTarget(
        nodes=parse_host_list(hosts, DEFAULT_CLUSTER_PORT, url),
        username=username,
        password=password,  # split_credentials decoded it
        tls=scheme == "rediss+cluster",
    )


@dataclass(slots=True)
class _Part:
    """The checks (and maybe the once key) of one decision that live in one slot."""

    decision: int
    checks: list[int]
    once: bool
    result: Evaluation | None = None
    error: BaseException | None = None
    backlogs: list[tuple[int, int]] = field(default_factory=list)
    """Per check, its bucket's debt before the decision and the bucket's time then (when
    the part committed)."""


@dataclass(slots=True)
class _SlotCall:
    """One EVALSHA for one slot: its KEYS and ARGV, and what it answered."""

    slot: int
    keys: list[str]
    args: list[int]
    reply: Any = None
    error: BaseException | None = None
    deadlines: list[float] | None = None
    """The loop-time deadlines of its decisions (a batch call: ARGV ends with them, in the
    master's clock, filled in when the master is known)."""


@dataclass(slots=True)
class _Refund:
    decision: int
    part: _Part
    amounts: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    """bucket key -> (tokens the decision added to its debt, its debt before, the bucket's
    time, its refill per ms)"""
    once_key: str | None = None
    free: list[int] | None = None


def _in_part(checks: Sequence[BudgetCheck], indexes: list[int]) -> list[BudgetCheck]:
    """A part's checks, each ``after`` naming its check's place in the part. A check
    whose condition lies in another slot cannot be conditional in one atomic step: one
    counted only if that check failed (a demotion's target lane) is only looked at, one
    counted only if it passed (the first lane's) is counted."""
    place = {i: n for n, i in enumerate(indexes)}
    out = []
    for i in indexes:
        check = checks[i]
        if check.after:
            where = place.get(abs(check.after) - 1)
            if where is not None:
                check = check._replace(after=(where + 1) * (1 if check.after > 0 else -1))
            elif check.after > 0:
                check = check._replace(after=0, consume=False, blocking=False)
            else:
                check = check._replace(after=0)
        out.append(check)
    return out


class ClusterStore(CoalescingStore):
    """Budgets in a Redis Cluster (see the module docstring for the protocol and guarantee).

    ``timeout_ms`` bounds every batch (both round trips when a give-back is needed);
    nothing is retried and redirections (MOVED/ASK) are followed within the deadline.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_ms: int = 50,
        key_prefix: str = "mqpolicy:",
        max_batch: int = 256,
        max_in_flight: int = 2,
    ) -> None:
        super().__init__(timeout_ms=timeout_ms, max_batch=max_batch,
                         max_in_flight=max_in_flight)
        target = parse_cluster_url(url)
        self.target = target
        self._prefix = key_prefix
        self._client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            ssl=target.tls,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 0),
            require_full_coverage=False,  # keys on healthy masters keep working
            protocol=2,
            decode_responses=False,
        )
        self._batch_script = LuaScript.load(SCRIPT_NAME)
        self._refund_script = LuaScript.load(REFUND_SCRIPT_NAME)
        self._clocks: dict[str, RedisClock] = {}  # per master (its name)
        self.slot_calls = 0
        """EVALSHAs of the batch script sent so far (one per slot per batch)."""
        self.split_decisions = 0
        """Decisions whose keys spanned more than one slot."""
        self.refunds = 0
        """Decisions given back (refused or duplicate in one slot, spent in another)."""
        self.refunds_failed = 0
        """Decisions whose give-back got no answer (error, deadline): those spends stay
        until the buckets refill."""
        self._topology_reset_at = float("-inf")

    def slot_of(self, key: str) -> int:
        """The hash slot of a logical key (with this store's prefix)."""
        return int(key_slot((self._prefix + key).encode()))

    # -- a batch: split by slot, one EVALSHA per slot, give back what must be -------------

    async def _run(self, batch: list[PendingDecision]) -> list[Evaluation | StoreError]:
        prefix = self._prefix
        parts_of: list[list[_Part]] = []
        by_slot: dict[int, list[tuple[_Part, PendingDecision]]] = {}
        for j, pending in enumerate(batch):
            groups: dict[int, _Part] = {}
            for i, check in enumerate(pending.checks):
                slot = key_slot((prefix + check.key).encode())
                part = groups.get(slot)
                if part is None:
                    part = groups[slot] = _Part(j, [], once=False)
                part.checks.append(i)
            if pending.once_key is not None:
                slot = key_slot((prefix + pending.once_key).encode())
                part = groups.get(slot)
                if part is None:
                    part = groups[slot] = _Part(j, [], once=True)
                part.once = True
            parts = list(groups.values())
            parts_of.append(parts)
            if len(parts) > 1:
                self.split_decisions += 1
            for slot, part in groups.items():
                sub = PendingDecision(
                    _in_part(pending.checks, part.checks),
                    pending.now_ms,
                    pending.once_key if part.once else None,
                    pending.once_ttl_ms,
                    pending.future,
                    pending.deadline,
                )
                by_slot.setdefault(slot, []).append((part, sub))

        calls = []
        for slot, entries in by_slot.items():
            keys, args = encode_batch(prefix, [sub for _, sub in entries])
            args[0] = -len(entries)  # committed rows also carry each bucket's backlog
            calls.append(_SlotCall(slot, keys, args,
                                   deadlines=[sub.deadline for _, sub in entries]))
        self.slot_calls += len(calls)
        await self._eval(self._batch_script, calls)
        for call, entries in zip(calls, by_slot.values(), strict=True):
            if call.error is None:
                try:
                    rows = [_split_backlogs(part, row) for (part, _), row in
                            zip(entries, _rows(call.reply, len(entries)), strict=True)]
                    evaluations = decode_batch([len(sub.checks) for _, sub in entries], rows)
                except ValueError as exc:
                    call.error = exc
                else:
                    for (part, _), evaluation in zip(entries, evaluations, strict=True):
                        if isinstance(evaluation, StoreError):
                            part.error = evaluation  # this decision alone
                        else:
                            part.result = evaluation
            if call.error is not None:
                for part, _ in entries:
                    part.error = call.error

        refunds = [
            refund
            for j, parts in enumerate(parts_of)
            for refund in self._refunds_for(j, batch[j], parts)
        ]
        if refunds:
            await self._give_back(batch, refunds)
        return [self._outcome(batch[j], parts) for j, parts in enumerate(parts_of)]

    def _refunds_for(
        self, j: int, pending: PendingDecision, parts: list[_Part]
    ) -> list[_Refund]:
        """What decision ``j`` must give back: its committed parts, when another part was
        refused, was a duplicate or failed."""
        if all(p.result is not None and p.result.committed for p in parts):
            return []
        found = []
        for part in parts:
            if part.result is None or not part.result.committed:
                continue
            refund = _Refund(j, part)
            for n, (i, result) in enumerate(zip(part.checks, part.result.results, strict=True)):
                check = pending.checks[i]
                if result.allowed and check.consume and check.cost:
                    key = self._prefix + check.key
                    amount = refund.amounts.get(key, (0, 0, 0, 0))[0]
                    backlog, at = part.backlogs[n]
                    refund.amounts[key] = (amount + check.unit * check.cost, backlog, at,
                                           check.refill)
            if part.once:
                assert pending.once_key is not None
                refund.once_key = self._prefix + pending.once_key
            if refund.amounts or refund.once_key is not None:
                found.append(refund)
        return found

    async def _give_back(self, batch: list[PendingDecision], refunds: list[_Refund]) -> None:
        self.refunds += len({r.decision for r in refunds})
        try:
            await self._send_refunds(batch, refunds)
        except asyncio.CancelledError:  # the deadline: no give-back got its answer
            self.refunds_failed += len({r.decision for r in refunds if r.free is None})
            raise

    async def _send_refunds(self, batch: list[PendingDecision], refunds: list[_Refund]) -> None:
        by_slot: dict[int, list[_Refund]] = {}
        for refund in refunds:
            some_key = refund.once_key or next(iter(refund.amounts))
            by_slot.setdefault(key_slot(some_key.encode()), []).append(refund)
        calls = []
        for slot, group in by_slot.items():
            index: dict[str, int] = {}
            args: list[int] = [len(group), CLOCK_STEP_ALLOWANCE_MS]
            for refund in group:
                pending = batch[refund.decision]
                once = 0
                if refund.once_key is not None:
                    once = index.setdefault(refund.once_key, len(index) + 1)
                args += (pending.now_ms, once, len(refund.amounts))
                for key, (amount, backlog, at, refill) in refund.amounts.items():
                    args += (index.setdefault(key, len(index) + 1), amount, backlog, at, refill)
                args.append(len(refund.part.checks))
                for i in refund.part.checks:
                    check = pending.checks[i]
                    key = self._prefix + check.key
                    args += (index.setdefault(key, len(index) + 1), check.refill, check.unit,
                             check.burst)
            calls.append(_SlotCall(slot, list(index), args))
        await self._eval(self._refund_script, calls)
        for call, group in zip(calls, by_slot.values(), strict=True):
            reply = call.reply
            if (
                call.error is not None
                or not isinstance(reply, list)
                or len(reply) != len(group)
                or any(
                    not isinstance(row, list) or len(row) != len(r.part.checks)
                    for row, r in zip(reply, group, strict=True)
                )
            ):
                self.refunds_failed += len({r.decision for r in group})
                continue
            for refund, row in zip(group, reply, strict=True):
                refund.free = [int(units) for units in row]
                refund.part.result = _given_back(refund.part.result, refund.free)

    @staticmethod
    def _outcome(pending: PendingDecision, parts: list[_Part]) -> Evaluation | StoreError:
        failed = next((p.error for p in parts if p.error is not None), None)
        if failed is not None:
            error = StoreError(_describe(failed))
            error.__cause__ = failed
            return error
        results: list[BudgetResult | None] = [None] * len(pending.checks)
        committed, duplicate = True, False
        for part in parts:
            evaluation = part.result
            assert evaluation is not None
            committed = committed and evaluation.committed
            duplicate = duplicate or evaluation.duplicate
            for i, result in zip(part.checks, evaluation.results, strict=True):
                results[i] = result
        if duplicate:
            committed = False
            results = [BudgetResult(True, r.remaining, 0) for r in results if r is not None]
        final = tuple(r for r in results if r is not None)
        if len(final) != len(pending.checks):
            return StoreError("redis cluster: a check got no answer")
        return Evaluation(final, committed, duplicate)

    async def _eval(self, script: LuaScript, calls: list[_SlotCall]) -> None:
        """One pipeline per master with every call for its slots, all in parallel; each
        call gets its reply or its error. NOSCRIPT: load the script there and send again."""
        if not calls:
            return
        await self._pipelined(script, calls)
        missing = [c for c in calls if isinstance(c.error, NoScriptError)]
        if missing:
            for call in missing:
                call.error = None
            await self._load(script, missing)
            await self._pipelined(script, [c for c in missing if c.error is None])
        if any(isinstance(c.error, _RESET_TOPOLOGY) for c in calls):
            # a master is gone or the slots moved: learn the layout again on the next call
            # (at most once a second: while a master stays down, every batch that needs it
            # fails, and relearning costs round trips the healthy decisions would wait for)
            now = time.monotonic()
            if now - self._topology_reset_at >= _TOPOLOGY_RESET_INTERVAL_S:
                self._topology_reset_at = now
                with contextlib.suppress(*_ERRORS):
                    await self._client.aclose()

    async def _pipelined(self, script: LuaScript, calls: list[_SlotCall]) -> None:
        if not calls:
            return
        await self._client.initialize()
        by_node: dict[str, list[_SlotCall]] = {}
        for call in calls:
            try:
                node = self._client.get_node_from_key(call.keys[0])
            except _ERRORS as exc:  # a slot no master serves
                call.error = exc
                continue
            by_node.setdefault(node.name if node else "", []).append(call)

        loop = asyncio.get_running_loop()
        margin = self._timeout_s * DEADLINE_MARGIN

        async def run(name: str, group: list[_SlotCall]) -> None:
            # each master's clock: the batch script skips a decision past its deadline
            clock = self._clocks.get(name)
            if clock is None:
                clock = self._clocks[name] = RedisClock(name)
            pipe = self._client.pipeline(transaction=False)
            for call in group:
                if call.deadlines:
                    call.args[-len(call.deadlines):] = [
                        clock.deadline_ms(d - margin) for d in call.deadlines]
                pipe.execute_command("EVALSHA", script.sha, len(call.keys), *call.keys,
                                     *call.args)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except _ERRORS as exc:
                for call in group:
                    call.error = exc
                return
            for call, reply in zip(group, replies, strict=True):
                if isinstance(reply, BaseException):
                    call.error = reply
                else:
                    call.reply = reply
                    if call.deadlines and isinstance(reply, list) and reply and isinstance(
                            reply[-1], int):
                        clock.observe(reply[-1], loop.time())

        await asyncio.gather(*(run(name, group) for name, group in by_node.items()))

    async def _load(self, script: LuaScript, calls: list[_SlotCall]) -> None:
        nodes = {}
        for call in calls:
            node = self._client.get_node_from_key(call.keys[0])
            if node is not None:
                nodes[node.name] = node
        for node in nodes.values():
            try:
                await self._client.execute_command("SCRIPT LOAD", script.source,
                                                   target_nodes=node)
            except _ERRORS as exc:
                for call in calls:
                    if self._client.get_node_from_key(call.keys[0]) is node:
                        call.error = exc

    # -- the rest of CounterStore ----------------------------------------------------------

    async def inspect(self, keys: Sequence[str], now_ms: int) -> list[BucketState | None]:
        return await inspect_buckets(self._client.pipeline, self._prefix, self._timeout_s, keys,
                                     errors=_ERRORS, describe=_describe)

    async def scan(self, pattern: str, count: int = 1000) -> list[str]:
        """Keys matching ``pattern`` on every master, sorted; which ones when more than
        ``count`` match is unspecified. Each SCAN step has the store's deadline."""
        match = glob_escape(self._prefix) + pattern
        strip = len(self._prefix.encode())
        found: set[str] = set()
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.initialize()
            for node in self._client.get_primaries():
                cursor = 0
                while len(found) < count:
                    async with asyncio.timeout(self._timeout_s):
                        reply = await self._client.execute_command(
                            "SCAN", cursor, "MATCH", match, "COUNT", max(100, min(count, 1000)),
                            target_nodes=node,
                        )  # fmt: skip
                    cursor, batch = reply
                    if isinstance(cursor, dict):  # redis-py: ({node name: cursor}, keys)
                        (cursor,) = cursor.values()
                    found.update(unprefixed(k, strip) for k in batch)
                    if int(cursor) == 0:
                        break
        except _ERRORS as exc:
            raise StoreError(_describe(exc)) from exc
        return sorted(found)[: max(0, count)]

    async def reset(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        try:
            async with asyncio.timeout(self._timeout_s):
                pipe = self._client.pipeline(transaction=False)
                for key in dict.fromkeys(keys):
                    pipe.delete(self._prefix + key)
                return sum(int(n) for n in await pipe.execute())
        except _ERRORS as exc:
            raise StoreError(_describe(exc)) from exc

    async def give_back(self, ledger_key: str, now_ms: int) -> int:
        """The cluster store keeps no ledger (a message's buckets lie in many slots): a
        message refused at its end keeps its RCPT spends, which refill with time."""
        return 0

    async def move_ledger(self, ledger_key: str, to_key: str) -> None:
        return None

    async def ping(self) -> None:
        """Every node of the cluster answers."""
        try:
            async with asyncio.timeout(self._timeout_s):
                if not await self._client.ping():
                    raise StoreError("redis cluster: a node did not answer PING")
        except _ERRORS as exc:
            raise StoreError(_describe(exc)) from exc

    async def close(self) -> None:
        if await self._close_queue():
            with contextlib.suppress(*_ERRORS):
                await self._client.aclose()


def _rows(reply: Any, count: int) -> list[Any]:
    return split_reply(reply, count)[0]


def _split_backlogs(part: _Part, row: Any) -> Any:
    """A committed row ends with a backlog per check (its bucket's debt before the decision
    and the bucket's time): keep them on the part, return the row as :func:`decode_batch`
    knows it."""
    n = len(part.checks)
    if isinstance(row, list) and len(row) == 2 + 5 * n and row[0] == 1:
        tail = row[2 + 3 * n:]
        part.backlogs = [(int(tail[2 * i]), int(tail[2 * i + 1])) for i in range(n)]
        return row[: 2 + 3 * n]
    return row


def _given_back(evaluation: Evaluation | None, free: list[int]) -> Evaluation | None:
    """A committed part after its give-back: not committed, remaining as counted after."""
    if evaluation is None:
        return None
    return Evaluation(
        tuple(r._replace(remaining=left) for r, left in zip(evaluation.results, free,
                                                           strict=True)),
        committed=False,
        duplicate=evaluation.duplicate,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, StoreError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, TimeoutError) and not str(exc):
        return "redis cluster did not answer within the deadline"
    return f"redis cluster: {type(exc).__name__}: {exc}"

