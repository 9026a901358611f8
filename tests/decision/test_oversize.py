"""Mail that can never fit (issue 16, contract rule 7): a message whose cost for a blocking
limit is larger than the limit's burst is refused for good (``oversize: reject``, the
default) or held for the scheduler (``oversize: hold``), never answered with a 4xx; and a
reply text with no retry time never says "laters"."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from mqpolicy.decision.engine import Action
from mqpolicy.delegation.handler import postfix_action
from mqpolicy.policy.loader import ConfigError
from mqpolicy.policy.request import Request
from tests.support.decision_service import service

_QUEUE_IDS = itertools.count(1)


def eom(count: int = 1, size: int = 100, sender: str = "alice@example.com") -> Request:
    return Request(stage="END-OF-MESSAGE", sender=sender, recipient_count=count, size=size,
                   queue_id=f"4Q{next(_QUEUE_IDS)}", client_address="192.0.2.10")


PER_SENDER = """\
- name: per-sender
  rate: 50/1h
  key: sender
  count: recipients
"""


def test_more_recipients_than_the_burst_is_rejected_for_good() -> None:
    svc, _ = service(PER_SENDER)
    verdict = asyncio.run(svc.decide(eom(count=51)))
    assert verdict.action is Action.REJECT
    assert postfix_action(verdict) == (
        "550 5.7.1 message exceeds limit per-sender: 51 recipients, at most 50 at once")
    assert verdict.oversize


def test_the_burst_itself_fits() -> None:
    svc, _ = service(PER_SENDER)
    assert asyncio.run(svc.decide(eom(count=50))).action is Action.ACCEPT


def test_bytes_over_the_burst() -> None:
    svc, _ = service("""\
        - name: small
          rate: 1000/1h
          key: sender
          count: bytes
        """)
    verdict = asyncio.run(svc.decide(eom(size=2000)))
    assert verdict.action is Action.REJECT
    assert verdict.text == "message exceeds limit small: 2000 bytes, at most 1000 at once"


def test_oversize_reject_spends_nothing() -> None:
    svc, _ = service(PER_SENDER)
    asyncio.run(svc.decide(eom(count=51)))
    assert asyncio.run(svc.decide(eom(count=50))).action is Action.ACCEPT


def test_oversize_hold_holds_instead() -> None:
    svc, _ = service(PER_SENDER + "  oversize: hold\n")
    verdict = asyncio.run(svc.decide(eom(count=51)))
    assert verdict.action is Action.HOLD
    assert verdict.oversize
    assert postfix_action(verdict).startswith("HOLD ")


def test_a_hold_limit_with_the_default_rejects_oversize_mail() -> None:
    svc, _ = service(PER_SENDER + "  action: hold\n")
    assert asyncio.run(svc.decide(eom(count=51))).action is Action.REJECT


def test_a_limit_that_can_fit_later_still_defers() -> None:
    svc, _ = service(PER_SENDER)
    assert asyncio.run(svc.decide(eom(count=40))).action is Action.ACCEPT
    verdict = asyncio.run(svc.decide(eom(count=40)))
    assert verdict.action is Action.DEFER
    assert not verdict.oversize
    assert postfix_action(verdict).startswith("450 4.7.1 ")


def test_oversize_is_read_and_checked() -> None:
    with pytest.raises(ConfigError, match="oversize"):
        service(PER_SENDER + "  oversize: bounce\n")


def test_no_retry_time_never_renders_laters() -> None:
    """A reject limit's own text on a message that never fits: no retry time to say."""
    svc, _ = service(PER_SENDER + """\
  action: reject
  message: "Quota {limit} for {key}, try again in {retry_after}s"
""")
    verdict = asyncio.run(svc.decide(eom(count=51)))
    assert verdict.action is Action.REJECT
    assert verdict.text == "Quota per-sender for alice@example.com, try again later"
