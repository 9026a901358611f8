"""A decision service on the memory store with a fixed clock, and the lanes and rules its
policies start from."""

from __future__ import annotations

import textwrap

from mqpolicy.decision.service import DecisionService
from mqpolicy.policy.loader import parse_policy
from mqpolicy.store.memory import MemoryStore
from tests.support.lanes import LANES

BASE = LANES + """\
classify:
  - name: resets
    when: {sender: "noreply@app.example"}
    lane: transactional
  - name: news
    when:
      any:
        - sender: "@.news.example"
        - recipient_count: {min: 50}
    lane: bulk
  - name: later
    when: {sasl_username: "scheduler"}
    lane: scheduled
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000_000_000

    def __call__(self) -> int:
        return self.now


def service(limits: str, **extra: str) -> tuple[DecisionService, Clock]:
    text = BASE + "limits:\n" + textwrap.indent(textwrap.dedent(limits), "  ")
    for key, value in extra.items():
        text += f"{key}: {value}\n"
    clock = Clock()
    return DecisionService(parse_policy(text), MemoryStore(), clock_ms=clock), clock
