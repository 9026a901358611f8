"""The lanes and limits the release planner's tests and the queue view's share."""

from __future__ import annotations

from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import Policy

POLICY = """\
lanes:
  - name: transactional
  - name: normal
    release_rate: 10/1s
  - name: bulk
    release_rate: 60/1m
    release_burst: 3
default_lane: normal
limits:
  - name: per-domain
    rate: 100/1m
    burst: 5
    key: recipient_domain
  - name: per-sender
    rate: 10/1h
    key: sender
  - name: bulk-only
    rate: 10/1m
    key: recipient
    lanes: [bulk]
  - name: watch
    rate: 1/1h
    key: recipient_domain
    monitor: true
    when: {recipient: "@watched.example"}
"""


def policy() -> Policy:
    return parse_policy(POLICY)
