"""Decisions: the pure engine, the decision service around one store round trip, MX lookups,
the shared runtime state, and what counters and explanations show."""
