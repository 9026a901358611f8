"""Where budgets, backoff states and hold records live: the budget contract and GCRA math, the
memory, Redis, Sentinel and Cluster stores, their URLs and Lua scripts."""
