"""LogFollower on real files: appends, partial lines, rotation, truncation, resume.

Most tests drive :meth:`LogFollower.poll` directly (no waiting at all); the async tests
use a short poll interval and an overall timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from mqpolicy.feedback.log_follower import FollowPosition, LogFollower

T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro_fn()

    return asyncio.run(bounded())


def append(path: Path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    with path.open("ab") as fh:
        fh.write(data)


def drain(follower: LogFollower, polls: int = 5) -> list[str]:
    lines: list[str] = []
    for _ in range(polls):
        lines += follower.poll()
    return lines


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "maillog"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state" / "feedback.json"


def follower_for(log: Path, state: Path | None = None, **kwargs: object) -> LogFollower:
    if state is not None:
        state.parent.mkdir(exist_ok=True)
    return LogFollower(log, state_path=state, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- appending


def test_appended_lines_and_partial_lines(log: Path) -> None:
    append(log, "old 1\nold 2\n")
    with follower_for(log) as f:
        assert f.poll() == []  # starts at the end by default
        append(log, "one\ntwo\nthr")
        assert f.poll() == ["one", "two"]
        assert f.poll() == []  # "thr" waits for its newline
        append(log, "ee\r\n")
        assert f.poll() == ["three"]
        assert f.position is not None and f.position.offset == log.stat().st_size


def test_start_at_beginning(log: Path) -> None:
    append(log, "old 1\nold 2\n")
    with follower_for(log, start_at_end=False) as f:
        assert f.poll() == ["old 1", "old 2"]


def test_start_at_end_skips_a_half_written_line(log: Path) -> None:
    append(log, "old 1\nold 2 half")
    with follower_for(log) as f:
        assert f.poll() == []
        assert f.position is None  # no line start known yet: nothing to save
        append(log, " written\nnew\n")
        assert f.poll() == ["new"]
        assert f.position is not None and f.position.offset == log.stat().st_size


def test_missing_file_is_waited_for_and_read_from_the_start(log: Path) -> None:
    with follower_for(log) as f:
        assert f.poll() == []
        assert f.poll() == []
        append(log, "first\nsecond\n")
        assert f.poll() == ["first", "second"]


def test_reads_in_bounded_chunks(log: Path) -> None:
    lines = [f"line {i:04d} " + "x" * (i % 13) for i in range(500)]
    append(log, "".join(line + "\n" for line in lines))
    with follower_for(log, start_at_end=False, chunk_size=7, max_bytes_per_poll=64) as f:
        first = f.poll()
        assert 0 < len(first) < 10  # no more than 64 bytes were read
        assert f.stats.bytes_read == 64
        got = first + drain(f, polls=400)
    assert got == lines


def test_long_lines_are_dropped_not_kept(log: Path) -> None:
    with follower_for(log, start_at_end=False, max_line_bytes=100, chunk_size=16,
                      max_bytes_per_poll=64) as f:
        append(log, "short\n" + "y" * 1000)
        assert drain(f, polls=30) == ["short"]
        append(log, "yyy\nafter\n" + "z" * 100 + "\n")
        assert drain(f, polls=5) == ["after", "z" * 100]
        assert f.stats.dropped_long_lines == 1


def test_undecodable_bytes_are_replaced(log: Path) -> None:
    with follower_for(log, start_at_end=False) as f:
        append(log, b"to=<caf\xe9@example.com>\n")
        assert f.poll() == ["to=<caf\ufffd@example.com>"]


# ---------------------------------------------------------------- rotation and truncation


def test_rotation_by_rename_reads_the_old_file_to_its_end(log: Path) -> None:
    append(log, "")
    with follower_for(log) as f:
        assert f.poll() == []  # opened at the (empty) end
        append(log, "a\nb\n")
        assert f.poll() == ["a", "b"]
        rotated = log.with_name("maillog.1")
        log.rename(rotated)
        assert f.poll() == []  # renamed, no new file yet: keep reading the old one
        append(rotated, "c\n")  # the writer has not reopened yet
        append(log, "d\n")  # the new file
        assert f.poll() == ["c"]  # the old file first
        assert f.poll() == []  # quiet now, but the writer may still add a line
        assert f.poll() == ["d"]  # then the new file from its start
        append(log, "e\n")
        assert f.poll() == ["e"]
        assert f.stats.rotations == 1


def test_rotation_completes_an_unterminated_last_line(log: Path) -> None:
    append(log, "")
    with follower_for(log) as f:
        assert f.poll() == []  # opened at the (empty) end
        append(log, "a\nlast without newline")
        assert f.poll() == ["a"]
        log.rename(log.with_name("maillog.1"))
        append(log, "new\n")
        assert drain(f) == ["last without newline", "new"]


def test_rotation_by_delete_and_create(log: Path) -> None:
    append(log, "")
    with follower_for(log) as f:
        assert f.poll() == []  # opened at the (empty) end
        append(log, "a\n")
        assert f.poll() == ["a"]
        log.unlink()
        assert f.poll() == []
        append(log, "b\n")
        assert drain(f) == ["b"]


def test_copytruncate(log: Path) -> None:
    append(log, "")
    with follower_for(log) as f:
        assert f.poll() == []  # opened at the (empty) end
        append(log, "one\ntwo\n")
        assert f.poll() == ["one", "two"]
        shutil.copy(log, log.with_name("maillog.1"))
        with log.open("r+b") as fh:
            fh.truncate(0)
        append(log, "three\n")  # shorter than what was read: seen as truncated
        assert f.poll() == ["three"]
        assert f.stats.truncations == 1


def test_truncated_and_grown_past_the_old_offset(log: Path) -> None:
    append(log, "")
    with follower_for(log) as f:
        assert f.poll() == []  # opened at the (empty) end
        append(log, "aaaa\nbbbb\n")  # 10 bytes
        assert f.poll() == ["aaaa", "bbbb"]
        with log.open("r+b") as fh:
            fh.truncate(0)
        # longer than before; byte 9 is not a newline any more
        append(log, "new line one\nnew two\n")
        assert f.poll() == ["new line one", "new two"]
        assert f.stats.truncations == 1


# ---------------------------------------------------------------- state and resume


def test_resume_from_saved_state(log: Path, state: Path) -> None:
    append(log, "")
    with follower_for(log, state) as f:
        assert f.poll() == []  # opened at the (empty) end
        append(log, "a\nb\n")
        assert f.poll() == ["a", "b"]
        f.save_state()
    append(log, "c\nd\n")  # written while stopped
    saved = json.loads(state.read_text())
    assert saved["offset"] == 4 and saved["path"] == str(log)
    assert [p.name for p in state.parent.iterdir()] == [state.name]  # no temporary left
    with follower_for(log, state) as f:
        assert f.poll() == ["c", "d"]


def test_resume_after_a_rotation_while_stopped(log: Path, state: Path) -> None:
    append(log, "")
    with follower_for(log, state) as f:
        assert f.poll() == []  # opened at the (empty) end
        append(log, "a\n")
        assert f.poll() == ["a"]
        f.save_state()
    append(log, "b\n")  # written before the rotation, never read
    log.rename(log.with_name("maillog.1"))
    append(log, "c\n")
    with follower_for(log, state) as f:
        assert drain(f) == ["b", "c"]
        assert f.stats.rotations == 1


def test_resume_with_the_saved_file_gone(log: Path, state: Path) -> None:
    append(log, "")
    with follower_for(log, state) as f:
        assert f.poll() == []  # opened at the (empty) end
        append(log, "a\n")
        assert f.poll() == ["a"]
        f.save_state()
    log.rename(log.with_name("maillog.1.gz"))  # compressed copies do not count
    append(log, "b\nc\n")
    with follower_for(log, state) as f:
        assert f.poll() == ["b", "c"]


def test_resume_after_copytruncate_while_stopped(log: Path, state: Path) -> None:
    append(log, "")
    with follower_for(log, state) as f:
        assert f.poll() == []  # opened at the (empty) end
        append(log, "aaaa\nbbbb\n")
        assert f.poll() == ["aaaa", "bbbb"]
        f.save_state()
    with log.open("r+b") as fh:
        fh.truncate(0)
    append(log, "x\n")
    with follower_for(log, state) as f:
        assert f.poll() == ["x"]
    with log.open("r+b") as fh:
        fh.truncate(0)
    append(log, "longer than before\n")
    with follower_for(log, state) as f:
        assert f.poll() == ["longer than before"]


@pytest.mark.parametrize("content", ["not json", '{"version": 1}', '{"version": 99}', "[]", ""])
def test_unusable_state_is_ignored(log: Path, state: Path, content: str) -> None:
    append(log, "old\n")
    state.parent.mkdir()
    state.write_text(content)
    with follower_for(log, state) as f:
        assert f.poll() == []  # as without state: from the end
        append(log, "new\n")
        assert f.poll() == ["new"]


def test_state_of_another_file_is_ignored(log: Path, state: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.log"
    append(other, "x\n")
    with follower_for(other, state, start_at_end=False) as f:
        assert f.poll() == ["x"]
        f.save_state()
    append(log, "old\n")
    with follower_for(log, state) as f:
        assert f.poll() == []


def test_save_state_explicit_position_and_no_rewrite(log: Path, state: Path) -> None:
    append(log, "a\nb\n")
    with follower_for(log, state, start_at_end=False) as f:
        assert f.poll() == ["a", "b"]
        stat = log.stat()
        f.save_state(FollowPosition(stat.st_dev, stat.st_ino, 2))
        f.save_state(FollowPosition(stat.st_dev, stat.st_ino, 2))
        assert f.stats.state_saves == 1
    with follower_for(log, state) as f:
        assert f.poll() == ["b"]


# ---------------------------------------------------------------- async


def test_batches_follow_and_save_processed_positions(log: Path, state: Path) -> None:
    append(log, "")

    async def consume() -> list[str]:
        follower = follower_for(log, state, poll_interval_s=0.01, save_interval_s=0)
        assert follower.poll() == []  # opened at the (empty) end
        seen: list[str] = []
        try:
            append(log, "a\nb\n")
            async for batch in follower.batches():
                seen += batch
                if seen == ["a", "b"]:
                    append(log, "c\n")
                elif "c" in seen:
                    append(log, "never read\n")
                    break
        finally:
            follower.close()
        return seen

    assert run(consume) == ["a", "b", "c"]
    # "c" was handed out but the consumer stopped before asking for more: it is read again
    with follower_for(log, state) as f:
        assert f.poll() == ["c", "never read"]


def test_lines_iterator_waits_for_new_lines(log: Path, state: Path) -> None:
    append(log, "")

    async def consume() -> list[str]:
        follower = follower_for(log, state, poll_interval_s=0.01)
        assert follower.poll() == []  # opened at the (empty) end
        seen: list[str] = []

        async def writer() -> None:
            for i in range(5):
                append(log, f"line {i}\n")
                await asyncio.sleep(0.02)

        task = asyncio.create_task(writer())
        try:
            async for line in follower.lines():
                seen.append(line)
                if len(seen) == 5:
                    break
        finally:
            await task
            follower.close()
        return seen

    assert run(consume) == [f"line {i}" for i in range(5)]


def test_read_cancelled_half_way_loses_no_line(log: Path) -> None:
    append(log, "")
    follower = follower_for(log, poll_interval_s=0.01)
    assert follower.poll() == []  # opened at the (empty) end
    append(log, "x\ny\n")
    reading, release = threading.Event(), threading.Event()
    real_poll = follower._poll

    def slow_poll() -> list[str]:
        reading.set()
        release.wait(60)
        return real_poll()

    follower._poll = slow_poll  # type: ignore[method-assign]

    async def scenario() -> list[str]:
        seen: list[str] = []

        async def consume() -> None:
            async for batch in follower.batches():
                seen.extend(batch)

        task = asyncio.create_task(consume())
        assert await asyncio.to_thread(reading.wait, 60)
        task.cancel()  # while the worker thread is reading
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        async for batch in follower.batches():  # the next read finds the lines
            seen.extend(batch)
            break
        return seen

    try:
        assert run(scenario) == ["x", "y"]
    finally:
        release.set()
        follower.close()


def test_state_file_is_written_atomically(log: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    append(log, "a\n")
    with follower_for(log, state, start_at_end=False) as f:
        assert f.poll() == ["a"]
        f.save_state()
        before = state.read_bytes()
        append(log, "b\n")
        assert f.poll() == ["b"]

        def failing_replace(src: object, dst: object) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(os, "replace", failing_replace)
        with pytest.raises(OSError, match="disk full"):
            f.save_state()
        assert state.read_bytes() == before  # the old state is intact
        assert [p.name for p in state.parent.iterdir()] == [state.name]
