"""A model-based test of the counting contract (README "How counting works", issue 16).

Random sequences of messages (senders and recipients at several domains, recipient counts,
sizes, headers that make a header limit or the bulk lane apply, keys with ``|``, ``%`` and
bytes that are not UTF-8, refusals at the end of the message, clock steps forward and back)
go through the real front-ends driven directly, as the MTA drives them:

* **P** the policy server's handler alone: RCPT per recipient then END-OF-MESSAGE, with
  ``instance`` and ``queue_id`` as Postfix sends them (the queue id from the RCPT after
  the first accepted one on);
* **M** the milter alone (``rcpt_limits: milter``), through pymilter's test context;
* **B** both: RCPT and END-OF-MESSAGE at the policy server, then the milter's headers,
  body and end of message (``rcpt_limits: policy_server``); a message's milter end may
  also come after the next message's policy requests (two connections at once);

on the memory store and a real Redis (a fixture redis-server). Every answer (action and
lane) and every budget left (read back through ``counters``' path) must be what
:mod:`tests.support.counting_oracle`, written from the contract alone, says.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import Milter
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mqpolicy.decision.counter_report import counter_rows
from mqpolicy.decision.service import DecisionService
from mqpolicy.delegation.codec import PolicyDecoder
from mqpolicy.delegation.handler import PostfixPolicyHandler
from mqpolicy.milter.gateway import DecisionGateway
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import MilterSettings
from mqpolicy.store.budget import CounterStore
from mqpolicy.store.memory import MemoryStore
from mqpolicy.store.redis import RedisStore
from tests.support.counting_model_scenarios import (
    SCENARIOS,
    Step,
    new_oracle,
    policy_text,
    steps,
)
from tests.support.counting_oracle import CountingOracle, Message, Outcome
from tests.support.milter_session import Loop, Session
from tests.support.redis_fixture import RedisServer

START_MS = 1_800_000_000_000
OVERSIZE = re.compile(r"message exceeds limit (\S+): (\d+) (recipients|bytes|messages), "
                      r"at most (\d+) at once")
TRANSPORTS = {"mq-bulk": "bulk"}


class Clock:
    def __init__(self) -> None:
        self.now = START_MS

    def __call__(self) -> int:
        return self.now


def policy_answer(answer: str) -> tuple[str, str | None]:
    """(action, lane) of a Postfix policy answer; the lane only for an accept."""
    word = answer.split(" ", 1)[0].upper()
    if word in {"DUNNO", "OK"}:
        return "accept", "normal"
    if word == "FILTER":
        transport = answer.split(" ", 1)[1].strip().rstrip(":").split(":")[0]
        return "accept", TRANSPORTS.get(transport, transport)
    if word == "HOLD":
        return "hold", None
    if word in ("DEFER", "DEFER_IF_PERMIT") or word.startswith("4"):
        return "defer", None
    if word == "REJECT" or word.startswith("5"):
        return "reject", None
    raise AssertionError(f"an answer Postfix does not know: {answer!r}")


@dataclass
class InFlight:
    """One message between its RCPTs and its end."""

    number: int
    message: Message
    session: Session | None
    instance: str
    queue_id: str
    accepted: list[str] = field(default_factory=list)


class Wiring:
    """The front-ends of one wiring around one store, and the oracle beside them."""

    def __init__(self, wiring: str, store: CounterStore, loop: Loop) -> None:
        self.wiring = wiring
        self.loop = loop
        self.clock = Clock()
        self.store = store
        policy = parse_policy(policy_text(wiring))
        self.policy = policy
        self.service = DecisionService(policy, store, clock_ms=self.clock)
        self.handler = PostfixPolicyHandler(self.service, None, clock_ms=self.clock)
        self.gateway = DecisionGateway(self.service, loop.loop,
                                       policy.milter or MilterSettings())
        self.sessions: list[Session] = []
        self.oracle: CountingOracle = new_oracle()
        self.log: list[str] = []  # what happened, for the failure report
        self.last_answer = ""  # the policy server's last answer, whole

    def session(self, number: int) -> Session:
        """Connection ``number % 2``: a message may overlap the next one."""
        while len(self.sessions) < 2:
            s = Session(self.gateway)
            s.connect()
            self.sessions.append(s)
        return self.sessions[number % 2]

    # ------------------------------------------------------------ the policy server

    def ask(self, attrs: dict[str, str]) -> str:
        """One request as Postfix writes it on the socket, decoded by the server's codec."""
        wire = "".join(f"{k}={v}\n" for k, v in attrs.items()) + "\n"
        (decoded,) = PolicyDecoder().feed(wire.encode("utf-8", "surrogateescape"))
        answer: str = self.loop.run(self.handler.handle(decoded))
        self.last_answer = answer
        return answer

    def attrs(self, m: InFlight, stage: str, recipient: str, queue_id: str) -> dict[str, str]:
        msg = m.message
        return {
            "request": "smtpd_access_policy",
            "protocol_state": stage,
            "protocol_name": "ESMTP",
            "client_address": "192.0.2.10",
            "client_name": "mx.example.net",
            "helo_name": "client.example.net",
            "queue_id": queue_id,
            "sender": msg.sender,
            "recipient": recipient,
            "recipient_count": str(len(m.accepted)) if stage == "END-OF-MESSAGE" else "0",
            "size": str(msg.size) if stage == "END-OF-MESSAGE" else "0",
            "instance": m.instance,
        }

    # ------------------------------------------------------------ a message, in phases

    def begin(self, number: int, message: Message) -> InFlight:
        m = InFlight(number, message, None, f"{number:x}.5f3a.{number}",
                     f"4Q{number:06X}")
        if self.wiring in ("M", "B"):
            m.session = self.session(number)
            m.session.macro(i="")
            assert m.session.mail(message.sender) == Milter.CONTINUE
        return m

    def rcpts(self, m: InFlight) -> None:
        for recipient in m.message.recipients:
            expected = self.oracle.rcpt(str(m.number), m.message, recipient, self.clock.now)
            if self.wiring == "M":
                assert m.session is not None
                rc = m.session.rcpt(recipient)
                got = {Milter.CONTINUE: "accept", Milter.TEMPFAIL: "defer",
                       Milter.REJECT: "reject"}.get(rc, f"rc={rc}")
            else:
                queue_id = m.queue_id if m.accepted else ""
                got, _ = policy_answer(self.ask(self.attrs(m, "RCPT", recipient, queue_id)))
            self.log.append(f"  RCPT {recipient!r}: {got} (oracle: {expected})")
            assert got == expected, f"RCPT {recipient!r}: {got}, the contract says {expected}"
            if got == "accept":
                m.accepted.append(recipient)
                if self.wiring == "B":
                    assert m.session is not None
                    assert m.session.rcpt(recipient) == Milter.CONTINUE

    def policy_end(self, m: InFlight) -> bool:
        """END-OF-MESSAGE at the policy server (P, B); False when the message ends here."""
        attrs = self.attrs(m, "END-OF-MESSAGE",
                           m.accepted[0] if len(m.accepted) == 1 else "", m.queue_id)
        now = self.clock.now
        action, lane = policy_answer(self.ask(attrs))
        answer_text = self.last_answer
        if self.wiring == "P":
            expected = self.oracle.end(str(m.number), m.queue_id, m.message, m.accepted, now,
                                       headers_seen=False)
            self._compare("END-OF-MESSAGE", action, lane, answer_text, expected)
            return False
        sure = self.oracle.sure_refusal(m.message, m.accepted, now)
        self.log.append(f"  END-OF-MESSAGE (checks only): {action} (oracle: may refuse: "
                        f"{sure.action if sure else 'no'})")
        if action != "accept":
            assert sure is not None, (
                f"the policy server refused at END-OF-MESSAGE ({action}) where the milter "
                "decides: no limit that applies whatever the headers say is short")
            self._compare("END-OF-MESSAGE", action, None, answer_text, sure)
            self.oracle.refused(str(m.number), now)
            if m.session is not None:
                m.session.milter.abort()
            return False
        return True

    def retry_policy_end(self, m: InFlight) -> None:
        """Postfix asks END-OF-MESSAGE again (it did not get the first answer)."""
        attrs = self.attrs(m, "END-OF-MESSAGE",
                           m.accepted[0] if len(m.accepted) == 1 else "", m.queue_id)
        action, _ = policy_answer(self.ask(attrs))
        self.log.append(f"  END-OF-MESSAGE again: {action}")
        assert action == "accept", f"a message accepted once is {action} when asked again"

    def milter_end(self, m: InFlight) -> None:
        s = m.session
        assert s is not None
        s.macro(i=m.queue_id)
        changed, quarantined = len(s.ctx.changed), len(s.ctx.quarantined)
        for name, value in m.message.headers:
            s.header(name, value)
        s.body(m.message.body)
        rc = s.eom()
        now = self.clock.now
        expected = self.oracle.end(str(m.number), m.queue_id, m.message, m.accepted, now,
                                   headers_seen=True)
        if rc == Milter.TEMPFAIL:
            action, lane = "defer", None
        elif rc == Milter.REJECT:
            action, lane = "reject", None
        else:
            assert rc == Milter.CONTINUE, f"end of message answered {rc}"
            action = "hold" if len(s.ctx.quarantined) > quarantined else "accept"
            lanes = [v for name, _, v in s.ctx.changed[changed:] if name == "X-MQ-Lane" and v]
            lane = lanes[-1] if lanes else None
        text = " ".join(s.ctx.replies[-1][2:]) if action in ("defer", "reject") and \
            s.ctx.replies else ""
        self._compare("milter eom", action, lane, text, expected)

    def _compare(self, where: str, action: str, lane: str | None, text: str,
                 expected: Outcome) -> None:
        self.log.append(f"  {where}: {action} lane={lane} (oracle: {expected.action} "
                        f"lane={expected.lane}{' oversize' if expected.oversize else ''})")
        assert action == expected.action, (
            f"{where}: {action}, the contract says {expected.action}"
            + (f" (can never fit: {expected.oversize})" if expected.oversize else ""))
        assert "laters" not in text, f"{where}: {text!r}"
        if lane is not None and action in ("accept", "hold"):
            assert lane == expected.lane, f"{where}: lane {lane}, the contract says " \
                f"{expected.lane}"
        if expected.oversize:
            found = OVERSIZE.search(text)
            assert found is not None, f"{where}: an oversize reject says {text!r}"
            said = (found.group(1), int(found.group(2)), int(found.group(4)))
            assert said in expected.oversize, f"{where}: {said} not in {expected.oversize}"

    # ------------------------------------------------------------ budgets

    def budgets(self) -> None:
        now = self.clock.now
        rows = self.loop.run(counter_rows(self.store, self.policy.limits, None, 10_000, now))
        got = {(r.limit, r.key): r.remaining for r in rows if r.remaining < r.burst}
        expected = self.oracle.remaining(now)
        assert got == expected, "budgets left differ from the contract's:\n" + "\n".join(
            f"  {k}: store {got.get(k, 'full')}, contract {expected.get(k, 'full')}"
            for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k))


def run(w: Wiring, scenario: list[Step]) -> None:
    pending: list[InFlight] = []  # B: policy done, milter end still to come
    for number, step in enumerate(scenario, start=1):
        w.clock.now = max(0, w.clock.now + step.clock_step_ms)
        w.log.append(f"message {number} at +{w.clock.now - START_MS} ms: {step}")
        m = w.begin(number, step.message)
        w.rcpts(m)
        to_milter = False
        if not m.accepted:
            w.oracle.forget(str(m.number))
            if m.session is not None:
                m.session.milter.abort()
        elif w.wiring == "M":
            to_milter = True
        else:
            to_milter = w.policy_end(m)
            # asked again only after an accept (a refusal ended the transaction)
            if step.retry_end and (to_milter or m.queue_id in w.oracle.counted):
                w.retry_policy_end(m)
        for earlier in pending:
            w.milter_end(earlier)
        pending = []
        if to_milter:
            if step.overlap:
                pending.append(m)
            else:
                w.milter_end(m)
        if not pending:
            w.budgets()
    for earlier in pending:
        w.milter_end(earlier)
    w.budgets()


@pytest.fixture
def make_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], CounterStore]]:
    kind = request.param
    if kind == "memory":
        yield MemoryStore
        return
    server: RedisServer = request.getfixturevalue("redis_server")

    def fresh() -> CounterStore:
        server.flushall()
        return RedisStore(server.unix_url, timeout_ms=5000)

    yield fresh


@pytest.mark.timeout(900)  # only a failing run takes long: the shrinking to a minimal example
@pytest.mark.parametrize("make_store", ["memory", "redis"], indirect=True)
@pytest.mark.parametrize("wiring", ["P", "M", "B"])
@settings(max_examples=30, deadline=None, derandomize=True, report_multiple_bugs=False,
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_answer_and_budget_is_the_contracts(
        wiring: str, make_store: Callable[[], CounterStore], loop: Loop,
        data: st.DataObject) -> None:
    scenario = data.draw(steps(wiring), label="messages")
    w = Wiring(wiring, make_store(), loop)
    try:
        run(w, scenario)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nwhat happened ({wiring}):\n" + "\n".join(w.log)) from None
    finally:
        loop.run(w.store.close())


@pytest.mark.parametrize("make_store", ["memory", "redis"], indirect=True)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_named_scenarios_are_the_contracts(
        name: str, make_store: Callable[[], CounterStore], loop: Loop) -> None:
    """Sequences found by the model, or written for one rule of the contract, replayed as
    they are on every run."""
    wiring, scenario = SCENARIOS[name]
    w = Wiring(wiring, make_store(), loop)
    try:
        run(w, scenario)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nwhat happened ({wiring}):\n" + "\n".join(w.log)) from None
    finally:
        loop.run(w.store.close())
