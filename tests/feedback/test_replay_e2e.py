"""Replay against a live run: a known mix goes through a private Postfix with mqpolicy in
the path, then ``mqpolicy replay`` reads that Postfix's log with the same policy and finds
what the live run decided; ``--compare`` with a looser limit finds exactly the mail the
live run turned away."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from mqpolicy.lab.mail_stack import MailStack
from tests.support.mqpolicy_command import mq
from tests.support.postfix_fixture import policy, unique_address

pytestmark = pytest.mark.e2e

TIMEOUT_S = 60.0  # generous: a loaded machine; the wait ends when it is met


def log_since(maillog: Path, offset: int, *needles: str) -> str:
    """The mail log written after ``offset``, once it holds every needle."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        with maillog.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        if all(n in text for n in needles):
            return text
        if time.monotonic() > deadline:
            missing = [n for n in needles if n not in text]
            raise AssertionError(f"{missing} not in the mail log:\n{text[-3000:]}")
        time.sleep(0.1)


def test_replay_of_a_live_run_finds_what_it_decided(mail_stack: MailStack,
                                                    tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    limit = f"per-sender-{tag}"
    text = policy(f"""\
limits:
  - {{name: {limit}, rate: 3/1h, burst: 3, key: sender, action: defer}}
""")
    mail_stack.apply_policy(text)
    maillog = mail_stack.postfix.log_file
    offset = maillog.stat().st_size if maillog.exists() else 0

    alice, bob = unique_address("alice"), unique_address("bob")
    live_accepted: list[str] = []
    live_deferred: list[str] = []
    sends = [(alice, [f"a{i}-{tag}@dest.example"]) for i in range(5)]
    sends.append((bob, [f"b1-{tag}@dest.example", f"b2-{tag}@other.example"]))
    for sender, rcpts in sends:
        sent = mail_stack.send(sender, rcpts, "replay")
        for rcpt, reply in sent.rcpts:
            (live_accepted if reply.ok else live_deferred).append(rcpt)
            if not reply.ok:
                assert reply.code == 450, reply
    assert len(live_accepted) == 5  # the policy's promise: alice's first 3, bob's 2
    assert len(live_deferred) == 2

    logged = log_since(maillog, offset,
                       *(f"to=<{r}>, relay=" for r in live_accepted),
                       *(f"to=<{r}> proto=" for r in live_deferred))
    log_file = tmp_path / "maillog"
    log_file.write_text(logged, "utf-8")
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(text, "utf-8")

    done = mq("replay", "-c", str(policy_file), "--json", "--quiet", str(log_file))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["logged"] == {"refused": 2, "sent": 5}
    assert report["logged_lanes"] == {"normal": 5}  # Postfix's smtp: the normal lane
    assert report["input"]["unparsable"] == 0
    hits = report["limits"][limit]
    assert hits["first_tries"] == len(live_deferred)  # the live run's refusals
    assert hits["action"] == "defer"
    normal = report["lanes"]["normal"]["recipients"]
    assert normal["deferred"] == len(live_deferred)
    # every recipient gets in at last; those the live run took, at once
    assert normal["accepted"] - normal["deferred"] == len(live_accepted)
    assert report["busiest_keys"][0]["key"] == alice

    looser = tmp_path / "looser.yaml"
    looser.write_text(text.replace("rate: 3/1h, burst: 3", "rate: 10/1h, burst: 10"),
                      "utf-8")
    compared = mq("replay", "-c", str(policy_file), "--compare", str(looser), "--json",
                  "--quiet", str(log_file))
    assert compared.returncode == 0, compared.stderr
    diff = json.loads(compared.stdout)["compare"]
    assert diff["lanes"]["normal"]["recipients"]["deferred"] == {"a": 2, "b": 0}
    assert diff["limits"][limit]["first_tries"] == {"a": 2, "b": 0}
    [key] = diff["keys_most_affected"]
    assert (key["limit"], key["key"], key["b"]) == (limit, alice, 0)
