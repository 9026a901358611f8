"""mqpolicy: priority lanes, shared rate budgets and delayed delivery beside a real MTA."""

from __future__ import annotations

__version__ = "0.1.0"
