"""Stores with a planted bug (an exception that is no StoreError) for the tests of what a
front-end answers when the real decision path raises: the memory store answering on the
calling thread (``evaluate_now``) and the Redis store (a coroutine). A decision with a key
containing ``bug@`` raises :class:`PolicyBug`; every other decision is the store's own."""

from __future__ import annotations

from collections.abc import Sequence

from mqpolicy.policy.rates import DEFAULT_ONCE_TTL_MS
from mqpolicy.store.budget import BudgetCheck, Evaluation
from mqpolicy.store.memory import MemoryStore
from mqpolicy.store.redis import RedisStore


class PolicyBug(Exception):
    """No store error: a bug, which on_store_error does not cover."""


def planted(checks: Sequence[BudgetCheck]) -> None:
    if any("bug@" in check.key for check in checks):
        raise PolicyBug("a bug in the store's evaluation")


class MemoryStoreWithABug(MemoryStore):
    """The memory store, answering on the calling thread (evaluate_now), with a bug."""

    def evaluate_now(self, checks: Sequence[BudgetCheck], now_ms: int,
                     once_key: str | None = None, once_ttl_ms: int = DEFAULT_ONCE_TTL_MS,
                     ledger_key: str | None = None) -> Evaluation:
        planted(checks)
        return super().evaluate_now(checks, now_ms, once_key, once_ttl_ms, ledger_key)


class RedisStoreWithABug(RedisStore):
    """The Redis store (a coroutine), with a bug."""

    async def evaluate(self, checks: Sequence[BudgetCheck], now_ms: int,
                       once_key: str | None = None, once_ttl_ms: int = DEFAULT_ONCE_TTL_MS,
                       ledger_key: str | None = None) -> Evaluation:
        planted(checks)
        return await super().evaluate(checks, now_ms, once_key, once_ttl_ms, ledger_key)
