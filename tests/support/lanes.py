"""The lanes that the decision, hold and milter tests' policies start from: a transactional
lane and a bulk lane with transports of their own, the normal lane (Postfix's default
transport, for unmatched mail), and a lane whose mail is held for the scheduler."""

from __future__ import annotations

LANES = """\
lanes:
  - name: transactional
    transport: mq-transactional
  - name: normal
  - name: bulk
    transport: mq-bulk
  - name: scheduled
    transport: mq-bulk
    hold: true
default_lane: normal
"""

MILTER_LANE_RULES = """\
classify:
  - name: urgent-from-the-app
    when: {sender: "@app.milter.test", priority: high}
    lane: transactional
  - name: lists-and-robots
    when: {bulk_signals: true}
    lane: bulk
"""
"""The classify rules of the milter's end-to-end tests, with Postfix and with Sendmail:
urgent mail of the app (a header's priority) in the transactional lane, lists and robots
(bulk signals) in the bulk lane."""

RESETS_LANES = """\
lanes:
  - {name: transactional, transport: mq-transactional}
  - {name: normal}
default_lane: normal
classify:
  - {name: resets, when: {sender: "@app.example"}, lane: transactional}
"""
"""Two lanes: mail from app.example (password resets) in the transactional lane, which a
Postfix policy server answers with ``FILTER mq-transactional:``; the rest in the normal."""
