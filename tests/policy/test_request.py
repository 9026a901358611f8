"""The normalised request: the domain of an address, as every part reads it."""

from __future__ import annotations

from mqpolicy.feedback.delivery_log import parse_delivery_line
from mqpolicy.policy.keys import KeyPart, key_function
from mqpolicy.policy.request import Request, domain_of, recipient_destination


def test_domain_of_an_address() -> None:
    assert domain_of("a@B.Example.") == "b.example"
    assert domain_of('"a@b"@c.example') == "c.example"  # a quoted local part may hold an @
    assert domain_of("postmaster") == ""
    assert domain_of("a@") == ""
    assert domain_of("") == ""


def test_an_empty_local_part_keeps_its_domain() -> None:
    """Postfix hands ``RCPT TO:<""@dest.test>`` (and ``<@dest.test>``) to the policy server
    as ``recipient=@dest.test``, delivers it to dest.test and logs ``to=<""@dest.test>``
    (seen with Postfix 3.7.11), or ``to=<@dest.test>`` with ``info_log_address_format =
    internal``: the mail goes to that domain, so the budgets keyed on the recipient's domain
    or destination are that domain's (with no domain, a sender would spend none of them),
    and the result logged for it is that destination's, whichever form the log has."""
    assert domain_of("@dest.test") == "dest.test"
    request = Request.from_policy_attributes(
        {"request": "smtpd_access_policy", "protocol_state": "RCPT",
         "sender": "s@sender.test", "recipient": "@dest.test"})
    assert key_function([KeyPart("recipient_domain")])(request) == "dest.test"
    assert recipient_destination(request) == "dest.test"
    for logged in ('""@dest.test', "@dest.test"):
        event = parse_delivery_line(
            f"Dec 07 09:31:47 mta postfix/smtp[27919]: 5D83620C5C1: to=<{logged}>, "
            "relay=127.0.0.1[127.0.0.1]:35063, delay=0.02, delays=0.01/0.01/0/0, dsn=2.0.0, "
            "status=sent (250 2.0.0 Ok: queued as S000001)")
        assert event is not None and event.domain == "dest.test", logged
