"""The release agent over its real unix socket, with a recording MTA queue behind it (the
real MTAs: tests/packaging/test_unit_privileges.py), and the scheduler's side of it
(:class:`~mqpolicy.scheduler.agent_queue.AgentQueue`)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from mqpolicy.policy.endpoints import Endpoint, parse_endpoint
from mqpolicy.policy.loader import parse_policy
from mqpolicy.policy.model import MtaKind, SchedulerSettings
from mqpolicy.scheduler.agent_queue import AgentQueue
from mqpolicy.scheduler.mta_queue import QueueCommandError, QueueEntry, QueueSnapshot
from mqpolicy.scheduler.postfix_queue import PostfixQueue
from mqpolicy.scheduler.release_agent import AgentServer, ReleaseAgent
from mqpolicy.scheduler.release_protocol import encode, release_request
from mqpolicy.scheduler.scheduler import open_mta_queue

HELD = "3C72720E2D1"
HELD_LONG = "4jjYK03PYdzJ9Wd"
GONE = "60D3820C733"


class RecordingQueue:
    """An MTA queue that says what it was asked: ``held`` are on hold; a release may fail
    after releasing some (``fail_after``), a delivery may fail (``undeliverable``)."""

    def __init__(self, held: set[str], *, fail_after: int | None = None,
                 undeliverable: frozenset[str] = frozenset(),
                 listing: QueueSnapshot | None = None) -> None:
        self.held = set(held)
        self.fail_after = fail_after
        self.undeliverable = undeliverable
        self.listing = listing or QueueSnapshot([], {}, [])
        self.release_calls: list[list[str]] = []
        self.delivered: list[str] = []

    @property
    def instance(self) -> str:
        return "recording"

    async def snapshot(self) -> QueueSnapshot:
        return self.listing

    async def release(self, queue_ids: Sequence[str]) -> set[str]:
        self.release_calls.append(list(queue_ids))
        released: set[str] = set()
        for number, queue_id in enumerate(queue_ids):
            if self.fail_after is not None and number >= self.fail_after:
                raise QueueCommandError("postsuper exited 1: disk full", released)
            if queue_id in self.held:
                self.held.discard(queue_id)
                released.add(queue_id)
        return released

    async def deliver_now(self, queue_ids: Sequence[str]) -> None:
        for queue_id in queue_ids:
            if queue_id in self.undeliverable:
                raise QueueCommandError(f"postqueue -i {queue_id} exited 69")
            self.delivered.append(queue_id)


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


def with_agent(queue: RecordingQueue, path: Path, body: Callable[[], Awaitable[None]],
               mta: MtaKind = MtaKind.POSTFIX) -> None:
    """``body`` run while an agent serves ``queue`` on ``path`` (closed afterwards)."""

    async def main() -> None:
        server = AgentServer(ReleaseAgent(queue, mta), Endpoint(path=str(path)))
        await server.start()
        try:
            async with asyncio.timeout(30):
                await body()
        finally:
            await server.close()

    asyncio.run(main())


def client(path: Path, lister: RecordingQueue | None = None) -> AgentQueue:
    return AgentQueue(Endpoint(path=str(path)), "postfix:/etc/postfix", lister)


def test_held_messages_are_released_and_flushed_in_one_batch(socket_path: Path) -> None:
    mta = RecordingQueue({HELD, HELD_LONG})

    async def body() -> None:
        queue = client(socket_path)
        assert await queue.release([HELD, GONE, HELD_LONG]) == {HELD, HELD_LONG}
        await queue.deliver_now([HELD, HELD_LONG])  # the agent flushed them: nothing to say

    with_agent(mta, socket_path, body)
    assert mta.release_calls == [[HELD, GONE, HELD_LONG]]  # one postsuper run
    assert sorted(mta.delivered) == sorted([HELD, HELD_LONG])


def test_ids_that_are_not_queue_ids_never_reach_the_mta(socket_path: Path) -> None:
    mta = RecordingQueue({HELD})

    async def body() -> None:
        with pytest.raises(QueueCommandError,
                           match=r"2 of 3 not released.*-d: invalid") as caught:
            await client(socket_path).release([HELD, "-d", "../x"])
        assert caught.value.released == {HELD}

    with_agent(mta, socket_path, body)
    assert mta.release_calls == [[HELD]]
    assert mta.delivered == [HELD]


def test_only_ids_valid_for_the_agents_mta_are_run(socket_path: Path) -> None:
    mta = RecordingQueue({"5ARLf1a4012345"})

    async def body() -> None:
        with pytest.raises(QueueCommandError) as caught:
            await client(socket_path).release(["5ARLf1a4012345", HELD])
        assert caught.value.released == {"5ARLf1a4012345"}

    with_agent(mta, socket_path, body, MtaKind.SENDMAIL)
    assert mta.release_calls == [["5ARLf1a4012345"]]


def test_a_release_not_flushed_is_released_and_reported_at_deliver_now(
        socket_path: Path) -> None:
    mta = RecordingQueue({HELD, HELD_LONG}, undeliverable=frozenset({HELD}))

    async def body() -> None:
        queue = client(socket_path)
        assert await queue.release([HELD, HELD_LONG]) == {HELD, HELD_LONG}
        with pytest.raises(QueueCommandError, match="1 of 2 released messages not flushed"):
            await queue.deliver_now([HELD, HELD_LONG])
        await queue.deliver_now([HELD])  # said once

    with_agent(mta, socket_path, body)


def test_a_failing_release_command_says_what_it_did_release(socket_path: Path) -> None:
    mta = RecordingQueue({HELD, HELD_LONG}, fail_after=1)

    async def body() -> None:
        with pytest.raises(QueueCommandError, match="disk full") as caught:
            await client(socket_path).release([HELD, HELD_LONG])
        assert caught.value.released == {HELD}

    with_agent(mta, socket_path, body)
    assert mta.delivered == [HELD]


def test_postfix_listing_is_left_to_the_scheduler(socket_path: Path) -> None:
    listed = QueueSnapshot([], {"hold": 0}, [])

    async def body() -> None:
        with pytest.raises(QueueCommandError, match="postqueue -j"):
            await client(socket_path).snapshot()
        lister = RecordingQueue(set(), listing=listed)
        assert await client(socket_path, lister).snapshot() == listed

    with_agent(RecordingQueue(set()), socket_path, body)


def test_sendmail_listing_comes_from_the_agent(socket_path: Path) -> None:
    listing = QueueSnapshot([QueueEntry("5ARLf1a4012345", "hold", 1_764_000_000, 312,
                                        "a@x.test", ("b@y.test",))], {"hold": 1}, [])

    async def body() -> None:
        assert await client(socket_path).snapshot() == listing

    with_agent(RecordingQueue(set(), listing=listing), socket_path, body, MtaKind.SENDMAIL)


def test_each_request_is_logged_with_its_peer(socket_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        await client(socket_path).release([HELD])

    with caplog.at_level(logging.INFO, logger="mqpolicy.release_agent"):
        with_agent(RecordingQueue({HELD}), socket_path, body)
    (record,) = [r for r in caplog.records if r.getMessage() == "release"]
    fields = record.__dict__["fields"]
    assert (fields["peer_pid"], fields["peer_uid"], fields["peer_gid"]) == (
        os.getpid(), os.getuid(), os.getgid())
    assert (fields["ids"], fields["released"]) == (1, 1)


def test_the_socket_is_for_owner_and_group_only(socket_path: Path) -> None:
    async def body() -> None:
        st = os.stat(socket_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == os.getegid()

    with_agent(RecordingQueue(set()), socket_path, body)
    assert not socket_path.exists()  # removed at close


def test_a_malformed_request_is_refused_and_the_connection_closed(socket_path: Path) -> None:
    mta = RecordingQueue({HELD})

    async def body() -> None:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        writer.write(b'{"op": "delete", "ids": ["3C72720E2D1"]}\n'
                     + encode(release_request([HELD])))
        answer = await reader.readline()
        assert b'"ok":false' in answer and b"unknown op" in answer
        assert await reader.read() == b""  # closed: the release after it is not done
        writer.close()

    with_agent(mta, socket_path, body)
    assert mta.release_calls == []


def test_requests_on_one_connection_are_answered_in_order(socket_path: Path) -> None:
    async def body() -> None:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        writer.write(encode(release_request([HELD])) + encode(release_request([HELD])))
        first, second = await reader.readline(), await reader.readline()
        writer.close()
        assert b'"released"' in first and b'"not-held"' in second

    with_agent(RecordingQueue({HELD}), socket_path, body)


def test_no_agent_is_a_queue_command_error(socket_path: Path) -> None:
    with pytest.raises(QueueCommandError, match="release agent unix:"):
        asyncio.run(client(socket_path).release([HELD]))


# ---------------------------------------------------------------- choosing the adapter


def scheduler_settings(section: str) -> SchedulerSettings:
    policy = parse_policy("scheduler:\n" + section)
    assert policy.scheduler is not None
    return policy.scheduler


def test_without_release_agent_the_scheduler_runs_the_commands_itself() -> None:
    queue = open_mta_queue(scheduler_settings("  postfix_config_dir: /etc/postfix\n"))
    assert isinstance(queue, PostfixQueue)


def test_with_release_agent_postfix_releases_go_through_it_and_listing_stays_local() -> None:
    settings = scheduler_settings("  release_agent: unix:/run/mqpolicy-agent/agent.sock\n")
    queue = open_mta_queue(settings)
    assert isinstance(queue, AgentQueue)
    assert queue.endpoint == parse_endpoint("unix:/run/mqpolicy-agent/agent.sock")
    assert queue.instance == "postfix:/etc/postfix"  # the same lease as without the agent
    assert isinstance(open_mta_queue(settings, through_agent=False), PostfixQueue)


def test_with_release_agent_sendmail_lists_through_it_too(socket_path: Path) -> None:
    settings = scheduler_settings(f"  mta: sendmail\n  release_agent: unix:{socket_path}\n")
    queue = open_mta_queue(settings)
    assert isinstance(queue, AgentQueue)
    assert queue.instance == "sendmail:/etc/mail/sendmail.cf"
    with pytest.raises(QueueCommandError, match="release agent"):  # no agent: not run here
        asyncio.run(queue.snapshot())
