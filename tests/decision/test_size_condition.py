"""``size: {max: N}`` includes N, and ``min`` includes its bound (issue 16, contract rule 9)."""

from __future__ import annotations

import pytest

from mqpolicy.decision.engine import classify
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.request import Request
from tests.support.lanes import LANES

POLICY = LANES + """\
classify:
  - name: small
    when: {size: {max: 1000}}
    lane: transactional
  - name: large
    when: {size: {min: 5000}}
    lane: bulk
"""


@pytest.mark.parametrize(("size", "lane"), [(999, "transactional"), (1000, "transactional"),
                                            (1001, "normal"), (4999, "normal"),
                                            (5000, "bulk"), (5001, "bulk")])
def test_size_bounds_are_inclusive(size: int, lane: str) -> None:
    request = Request(stage="END-OF-MESSAGE", sender="a@example.com", size=size)
    assert classify(request, parse_policy(POLICY))[0].name == lane
