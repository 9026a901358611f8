"""Structured logging: ``key=value`` or JSON lines, written off the event loop.

Records carry their fields in ``record.fields`` (pass ``extra={"fields": {...}}``). The
connection id and queue id of the current request come from context variables, so every
line a request causes can be found again.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, TextIO

queue_id_var: ContextVar[str] = ContextVar("queue_id", default="")
connection_id_var: ContextVar[str] = ContextVar("connection_id", default="")

# A value made only of these is written bare; anything else is quoted as a JSON string.
_SAFE = re.compile(r"[A-Za-z0-9@._\-:/+<>\[\],]+")


_safe = _SAFE.fullmatch


def _kv_value(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if _safe(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    conn = connection_id_var.get()
    if conn:
        fields["conn"] = conn
    qid = queue_id_var.get()
    if qid:
        fields["qid"] = qid
    extra = getattr(record, "fields", None)
    if isinstance(extra, Mapping):
        fields.update(extra)
    return fields


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's fields: as :meth:`_BatchingHandler.emit` resolved them in the caller's
    thread, else resolved now."""
    resolved: dict[str, Any] | None = record.__dict__.get("resolved_fields")
    return resolved if resolved is not None else _fields(record)


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    if record.exc_text:
        return record.exc_text
    return formatter.formatException(record.exc_info) if record.exc_info else ""


def utc_timestamp(created: float) -> str:
    """``2026-12-07T13:15:19.123Z``: a record's time as a ``ts`` field writes it."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return f"{_utc_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4)  # many lines to the second
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [f"ts={utc_timestamp(record.created)} level={record.levelname.lower()} "
                 f"logger={record.name} msg={_kv_value(record.getMessage())}"]
        parts.extend(f"{k}={_kv_value(v)}" for k, v in _record_fields(record).items())
        exc = _exception_text(self, record)
        if exc:
            parts.append(f"exc={_kv_value(exc)}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(_record_fields(record))
        exc = _exception_text(self, record)
        if exc:
            data["exc"] = exc
        return json.dumps(data, ensure_ascii=False, default=str)


class _BatchingHandler(logging.Handler):
    """Queues records for a writer thread that wakes every ``flush_interval_s`` and writes
    what has come in one go. A record costs the caller a deque append, never a thread
    switch: waking a writer per line cost more than the decision it logs. Context
    variables (connection id, queue id) are resolved in the caller's thread."""

    def __init__(self, stream: TextIO, formatter: logging.Formatter,
                 flush_interval_s: float = 0.05) -> None:
        super().__init__()
        self._stream = stream
        self._formatter = formatter
        self._interval = flush_interval_s
        self._pending: collections.deque[logging.LogRecord] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqpolicy-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        record.resolved_fields = _fields(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None
        self._pending.append(record)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._write()
        self._write()

    def _write(self) -> None:
        pending = self._pending
        if not pending:
            return
        lines = []
        while pending:
            record = pending.popleft()
            try:
                lines.append(self._formatter.format(record))
            except Exception:
                lines.append(f"ts={utc_timestamp(record.created)} level=error "
                             f"logger=mqpolicy.log msg=unformattable {record.msg!r}")
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr gone: nothing left to tell

    def stop(self) -> None:
        """Write what is pending and stop the writer thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        else:
            self._write()


def configure_logging(
    fmt: str = "kv", level: str = "info", stream: TextIO | None = None
) -> _BatchingHandler:
    """Route the ``mqpolicy`` loggers to ``stream`` (stderr) through a batching writer
    thread. Returns the handler; call its ``stop()`` at shutdown to flush."""
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else KeyValueFormatter()
    handler = _BatchingHandler(stream or sys.stderr, formatter)
    root = logging.getLogger("mqpolicy")
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, _BatchingHandler):
            old.stop()
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    handler.start()
    return handler


def skip_record_sources() -> None:
    """Stop the logging module from finding each record's source file, thread and process
    (the logging HOWTO's "Optimization"): our lines name none of them, and one is logged for
    every message. Process-wide: for the ``mqpolicy`` command's ``main`` only."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def set_level(level: str) -> None:
    logging.getLogger("mqpolicy").setLevel(level.upper())


class LogBurst:
    """Log the first event of a burst, then one line per ``interval_s`` with how many
    were left out: a failing store or a flood of bad requests never floods the log.
    Thread-safe (the milter's threads share one)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self._interval_s = interval_s
        self._next = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """None: stay quiet. Otherwise log now, mentioning the returned suppressed count."""
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return None
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self._interval_s
            return suppressed
