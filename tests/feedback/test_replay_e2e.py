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
from tests.support.postfix_fixture import milter_policy, policy, unique_address

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


def test_replay_of_the_decision_log_of_both_hooks_and_the_milter(milter_stack: MailStack,
                                                                 tmp_path: Path) -> None:
    """Wiring B (both policy hooks and the milter, as postfix-config writes it), with
    ``log.decisions: all``: mqpolicy's own log carries the headers the policy reads, so its
    replay puts list mail in the bulk lane and meets the bulk lane's limit, as the live run
    did; Postfix's log alone cannot."""
    stack = milter_stack
    tag = uuid.uuid4().hex[:8]
    per_sender, per_list = f"per-sender-{tag}", f"bulk-{tag}"
    text = milter_policy(stack, f"""\
classify:
  - name: lists
    when: {{bulk_signals: true}}
    lane: bulk
limits:
  - {{name: {per_sender}, rate: 3/1h, burst: 3, key: sender, action: defer}}
  - {{name: {per_list}, rate: 2/1h, burst: 2, key: sender, lanes: [bulk], action: defer}}
""").replace("  level: info\n", "  level: info\n  decisions: all\n")
    assert "decisions: all" in text
    log_file = stack.server.log_file
    offset = log_file.stat().st_size if log_file.exists() else 0
    maillog = stack.postfix.log_file
    mail_offset = maillog.stat().st_size if maillog.exists() else 0
    stack.apply_policy(text)

    alice, carol = unique_address("alice"), unique_address("carol")
    rcpt_refused, queued, data_refused = 0, [], 0
    for i in range(5):  # per-sender lets 3 in at RCPT
        sent = stack.send(alice, [f"a{i}-{tag}@dest.example"], f"plain {i}")
        if sent.queued:
            queued.append(sent.queue_id)
        else:
            assert [reply.code for _, reply in sent.rcpts] == [450], sent.replies()
            rcpt_refused += 1
    for i in range(3):  # list mail: the milter's bulk lane lets 2 in at the end
        sent = stack.send(carol, [f"c{i}-{tag}@dest.example"], f"list {i}",
                          headers={"List-Id": f"<news-{tag}.example>"})
        if sent.queued:
            queued.append(sent.queue_id)
        else:
            assert sent.data is not None and 400 <= sent.data.code < 500, sent.replies()
            data_refused += 1
    assert (len(queued), rcpt_refused, data_refused) == (5, 2, 1)

    def decisions() -> list[str]:
        with log_file.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        return [line for line in text.splitlines() if " msg=decision " in line]

    deadline = time.monotonic() + TIMEOUT_S
    # the milter's six ends (5 queued, 1 refused) each with its headers, and 8 RCPTs
    while not (sum("headers=" in x for x in decisions()) >= 6
               and sum("stage=RCPT" in x for x in decisions()) >= 8):
        assert time.monotonic() < deadline, "\n".join(decisions())
        time.sleep(0.1)
    decision_log = tmp_path / "mqpolicy.log"
    with log_file.open("rb") as f:
        f.seek(offset)
        decision_log.write_bytes(f.read())
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(text, "utf-8")

    done = mq("replay", "-c", str(policy_file), "--json", "--quiet", str(decision_log))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["input"]["unreadable_decisions"] == 0
    assert report["input"]["no_rcpt_decisions"] == 0
    assert report["mails"] == 8
    # what the live run did, read from its decisions: lanes of the 5 queued messages...
    assert report["logged_lanes"] == {"normal": 3, "bulk": 2}
    assert report["logged"] == {"accepted": 5, "refused": 2, "deferred": 1}
    # ...and what the replay decides: the same refusals at the first try
    assert report["limits"][per_sender]["first_tries"] == 2
    assert report["limits"][per_sender]["rcpt"] == 2
    assert report["limits"][per_list]["first_tries"] == 1
    assert report["limits"][per_list]["end_of_message"] == 1
    bulk = report["lanes"]["bulk"]["messages"]
    assert (bulk["accepted"], bulk["deferred"]) == (3, 1)  # carol's 3rd after waiting

    # Postfix's log of the same mail has no headers: no bulk lane, no bulk limit
    mail_text = log_since(maillog, mail_offset, *(f"{q}: removed" for q in queued))
    postfix_log = tmp_path / "maillog"
    postfix_log.write_text(mail_text, "utf-8")
    done = mq("replay", "-c", str(policy_file), "--json", "--quiet", str(postfix_log))
    assert done.returncode == 0, done.stderr
    from_postfix = json.loads(done.stdout)
    assert from_postfix["lanes"]["bulk"]["messages"]["accepted"] == 0
    assert per_list not in from_postfix["limits"]
