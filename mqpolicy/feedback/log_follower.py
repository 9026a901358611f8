"""Follow a growing log file (Postfix's ``maillog_file`` or a syslog file), like ``tail -F``.

:class:`LogFollower` hands out the complete lines appended since the last read:

* **Chunks, never the whole file**: at most ``max_bytes_per_poll`` per poll, read in
  ``chunk_size`` pieces. A last line without its newline is kept until it is completed;
  a line longer than ``max_line_bytes`` is dropped (counted in ``stats``).
* **Rotation** (rename + new file, the path now names another inode): the old file is
  read to its end first; when a poll finds it quiet, a line left without a newline is
  handed out and the follower moves to the start of the new file.
* **Truncation** (``copytruncate``): the file is shorter than what was read, or the byte
  before the current line start is no longer a newline (truncated and regrown): the
  follower starts again at offset 0.
* **Missing file**: waited for; a file that appears after the start is read from 0.
* **Resume**: the position (device, inode, offset of the next line) is saved to
  ``state_path`` atomically (temporary file, fsync, rename). On start, the saved file is
  found by its inode: still at the path (resume at the offset if it still ends a line
  there, else from 0), or renamed by a rotation to a sibling (``maillog.1``,
  ``maillog-20261127``: its rest is read first, then the new file from 0). A saved file
  that is gone means the current file is read from 0. Without state the follower starts
  at the end (``start_at_end``) or at the beginning.

Delivery guarantee: **at least once**. :meth:`LogFollower.batches` counts a batch as
processed when the consumer asks for the next one, and saves the processed position at
most every ``save_interval_s`` and when the iteration ends. After a crash, at most the
lines of the last ``save_interval_s`` plus one unprocessed batch (``max_bytes_per_poll``)
are read again. What cannot be recovered: lines written to a file that was rotated
more than once, or compressed, while the follower was stopped.

Used from asyncio: the blocking reads run in a worker thread (one at a time).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("mqpolicy.log_follower")  # the name its log lines have always had

_STATE_VERSION = 1
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".z")


@dataclass(frozen=True, slots=True)
class FollowPosition:
    """Where the next unread line starts: ``offset`` in the file ``(device, inode)``."""

    device: int
    inode: int
    offset: int


@dataclass(slots=True)
class FollowerStats:
    lines: int = 0
    bytes_read: int = 0
    rotations: int = 0
    truncations: int = 0
    dropped_long_lines: int = 0
    state_saves: int = 0


@dataclass(slots=True)
class _OpenFile:
    fh: BinaryIO
    device: int
    inode: int
    read_offset: int  # bytes read so far
    line_start: int  # offset just after the last newline seen
    partial: bytearray = field(default_factory=bytearray)
    skipping: bool = False  # inside a line too long to keep, or a fragment
    retired: bool = False  # the path names another file now: finish this one
    aligned: bool = True  # line_start is a true line start (not a mid-line start)

    @property
    def position(self) -> FollowPosition | None:
        if not self.aligned:
            return None
        return FollowPosition(self.device, self.inode, self.line_start)


class LogFollower:
    """Follows ``path``; see the module documentation for the guarantees."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        state_path: str | os.PathLike[str] | None = None,
        poll_interval_s: float = 1.0,
        start_at_end: bool = True,
        chunk_size: int = 65_536,
        max_bytes_per_poll: int = 1 << 20,
        max_line_bytes: int = 65_536,
        save_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if poll_interval_s <= 0 or save_interval_s < 0:
            raise ValueError("poll_interval_s must be positive, save_interval_s not negative")
        if chunk_size < 1 or max_bytes_per_poll < chunk_size or max_line_bytes < 1:
            raise ValueError("need 1 <= chunk_size <= max_bytes_per_poll, max_line_bytes >= 1")
        self.path = Path(path)
        self.state_path = Path(state_path) if state_path is not None else None
        self.poll_interval_s = poll_interval_s
        self.start_at_end = start_at_end
        self.chunk_size = chunk_size
        self.max_bytes_per_poll = max_bytes_per_poll
        self.max_line_bytes = max_line_bytes
        self.save_interval_s = save_interval_s
        self.stats = FollowerStats()
        self._clock = clock
        self._file: _OpenFile | None = None
        self._started = False
        self._saved: FollowPosition | None = None
        self._last_save = float("-inf")
        self._lock = threading.Lock()
        self._backlog: collections.deque[tuple[list[str], FollowPosition | None]] = (
            collections.deque()
        )

    # ------------------------------------------------------------ public, sync

    @property
    def position(self) -> FollowPosition | None:
        """The position after the last line handed out (None before a file was opened,
        or while a follower started mid-line has not seen a line end yet)."""
        return self._file.position if self._file is not None else None

    def poll(self) -> list[str]:
        """The complete lines available now (possibly none). Never waits."""
        with self._lock:
            return self._poll()

    def save_state(self, position: FollowPosition | None = None) -> None:
        """Persist ``position`` (default: after the last line handed out) atomically.
        Does nothing without a ``state_path`` or when nothing changed."""
        position = position if position is not None else self.position
        if self.state_path is None or position is None or position == self._saved:
            return
        data = {
            "version": _STATE_VERSION,
            "path": str(self.path),
            "device": position.device,
            "inode": position.inode,
            "offset": position.offset,
        }
        _write_atomically(self.state_path, json.dumps(data).encode() + b"\n")
        self._saved = position
        self._last_save = self._clock()
        self.stats.state_saves += 1

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.fh.close()
                self._file = None
                self._started = False

    def __enter__(self) -> LogFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ public, async

    async def batches(self) -> AsyncIterator[list[str]]:
        """Batches of new lines, forever; waits ``poll_interval_s`` when there are none.

        A batch counts as processed when the next one is asked for; the processed
        position is saved (at most every ``save_interval_s``, and when the iteration
        ends). Reads run in a worker thread.
        """
        processed: FollowPosition | None = None
        try:
            while True:
                if not self._backlog:
                    # a read cancelled half-way still lands in the backlog: no line is lost
                    await asyncio.to_thread(self._fill_backlog)
                if not self._backlog:
                    self._save_if_due(processed)
                    await asyncio.sleep(self.poll_interval_s)
                    continue
                lines, position = self._backlog.popleft()
                yield lines
                processed = position
                self._save_if_due(processed)
        finally:
            if processed is not None:
                self._save_quietly(processed)

    async def lines(self) -> AsyncIterator[str]:
        """The lines of :meth:`batches`, one by one."""
        async for batch in self.batches():
            for line in batch:
                yield line

    # ------------------------------------------------------------ internals

    def _fill_backlog(self) -> None:
        with self._lock:
            lines = self._poll()
            if lines:
                self._backlog.append((lines, self.position))

    def _save_if_due(self, position: FollowPosition | None) -> None:
        if position is not None and self._clock() - self._last_save >= self.save_interval_s:
            self._save_quietly(position)

    def _save_quietly(self, position: FollowPosition) -> None:
        try:
            self.save_state(position)
        except OSError as exc:
            log.warning("cannot save the log position",
                        extra={"fields": {"state": str(self.state_path), "error": str(exc)}})

    def _poll(self) -> list[str]:
        lines: list[str] = []
        if self._file is None:
            self._file = self._open_first() if not self._started else self._open_current(0)
            if self._file is None:
                return lines
        current = self._file
        self._check_truncation(current)
        got = self._read(current, lines)
        if got:
            return lines
        # our file is quiet: is the path still our file?
        if not current.retired:
            current.retired = self._path_moved_on(current)
            if current.retired:
                # one more poll to drain what the writer still puts in the old file
                return lines
        if current.retired:
            self._finish(current, lines)
            self.stats.rotations += 1
            self._file = self._open_current(0)
            if self._file is not None:
                self._read(self._file, lines)
        return lines

    def _path_moved_on(self, current: _OpenFile) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed away, no new file yet: keep the old one
        return (st.st_dev, st.st_ino) != (current.device, current.inode)

    def _check_truncation(self, current: _OpenFile) -> None:
        size = os.fstat(current.fh.fileno()).st_size
        truncated = size < current.read_offset
        if not truncated and current.aligned and current.line_start > 0:
            # truncated and grown again past our offset: the line end we stood on is gone
            truncated = os.pread(current.fh.fileno(), 1, current.line_start - 1) != b"\n"
        if truncated:
            log.info("log file truncated, reading it from the start",
                     extra={"fields": {"path": str(self.path)}})
            self.stats.truncations += 1
            current.read_offset = current.line_start = 0
            current.partial.clear()
            current.skipping = False
            current.aligned = True
            current.fh.seek(0)

    def _read(self, current: _OpenFile, lines: list[str]) -> int:
        total = 0
        while total < self.max_bytes_per_poll:
            chunk = current.fh.read(min(self.chunk_size, self.max_bytes_per_poll - total))
            if not chunk:
                break
            total += len(chunk)
            base = current.read_offset
            current.read_offset += len(chunk)
            self._split(current, chunk, base, lines)
        self.stats.bytes_read += total
        return total

    def _split(self, current: _OpenFile, chunk: bytes, base: int, lines: list[str]) -> None:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                break
            piece = chunk[start:end]
            if current.skipping or len(current.partial) + len(piece) > self.max_line_bytes:
                if not current.skipping:
                    self.stats.dropped_long_lines += 1
                current.skipping = False
            else:
                self._emit(bytes(current.partial) + piece if current.partial else piece, lines)
            current.partial.clear()
            current.line_start = base + end + 1
            current.aligned = True
            start = end + 1
        rest = chunk[start:]
        if not rest or current.skipping:
            return
        if len(current.partial) + len(rest) > self.max_line_bytes:
            self.stats.dropped_long_lines += 1
            current.partial.clear()
            current.skipping = True
        else:
            current.partial += rest

    def _emit(self, raw: bytes, lines: list[str]) -> None:
        lines.append(raw.decode("utf-8", "replace").rstrip("\r"))
        self.stats.lines += 1

    def _finish(self, current: _OpenFile, lines: list[str]) -> None:
        """The old file is done: its unterminated last line is complete after all."""
        if current.partial and not current.skipping:
            self._emit(bytes(current.partial), lines)
        current.fh.close()

    def _open_current(self, offset: int | None) -> _OpenFile | None:
        """Open the file at the path, at ``offset`` (None: at its end)."""
        self._started = True
        try:
            fh = open(self.path, "rb")  # noqa: SIM115  (kept open while following)
        except FileNotFoundError:
            return None
        st = os.fstat(fh.fileno())
        return self._at(fh, st, st.st_size if offset is None else offset)

    def _at(self, fh: BinaryIO, st: os.stat_result, offset: int) -> _OpenFile:
        offset = min(offset, st.st_size)
        fh.seek(offset)
        opened = _OpenFile(fh, st.st_dev, st.st_ino, offset, offset)
        if offset > 0 and os.pread(fh.fileno(), 1, offset - 1) != b"\n":
            # mid-line (a writer caught half-way): that fragment is no line of its own
            opened.skipping = True
            opened.aligned = False
        return opened

    def _open_first(self) -> _OpenFile | None:
        """The first open: resume from the saved state, else start per start_at_end."""
        saved = self._load_state()
        if saved is None:
            # a file that only appears later is read from 0 (see _open_current)
            return self._open_current(None if self.start_at_end else 0)
        self._saved = saved
        found = self._find(saved)
        if found is None:
            log.info("the saved log file is gone, reading the current one from the start",
                     extra={"fields": {"path": str(self.path)}})
            return self._open_current(0)
        path, retired = found
        try:
            fh = open(path, "rb")  # noqa: SIM115  (kept open while following)
        except FileNotFoundError:
            return self._open_current(0)
        st = os.fstat(fh.fileno())
        if (st.st_dev, st.st_ino) != (saved.device, saved.inode):  # replaced meanwhile
            fh.close()
            return self._open_current(0)
        self._started = True
        offset = saved.offset
        if offset > st.st_size or (
            offset > 0 and os.pread(fh.fileno(), 1, offset - 1) != b"\n"
        ):
            self.stats.truncations += 1
            offset = 0
        opened = self._at(fh, st, offset)
        opened.retired = retired
        return opened

    def _find(self, saved: FollowPosition) -> tuple[Path, bool] | None:
        """The file the state speaks of: at the path (False) or a rotated sibling (True)."""
        candidates = [self.path]
        with contextlib.suppress(OSError):
            candidates += sorted(
                p for p in self.path.parent.iterdir()
                if p.name.startswith(self.path.name) and p.name != self.path.name
                and not p.name.lower().endswith(_COMPRESSED)
            )
        for candidate in candidates:
            try:
                st = os.stat(candidate)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (saved.device, saved.inode):
                return candidate, candidate != self.path
        return None

    def _load_state(self) -> FollowPosition | None:
        if self.state_path is None:
            return None
        try:
            data = json.loads(self.state_path.read_bytes())
            if data.get("version") != _STATE_VERSION or data.get("path") != str(self.path):
                log.info("ignoring log position saved for another file",
                         extra={"fields": {"state": str(self.state_path)}})
                return None
            position = FollowPosition(int(data["device"]), int(data["inode"]),
                                      int(data["offset"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring an unreadable log position",
                        extra={"fields": {"state": str(self.state_path), "error": str(exc)}})
            return None
        if position.offset < 0:
            return None
        return position


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
