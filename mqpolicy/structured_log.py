"""Structured logging: ``key=value`` or JSON lines, written off the event loop.

Records carry their fields in ``record.fields`` (pass ``extra={"fields": {...}}``). The
connection id and queue id of the current request come from context variables, so every
line a request causes can be found again.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, TextIO

queue_id_var: ContextVar[str] = ContextVar("queue_id", default="")
connection_id_var: ContextVar[str] = ContextVar("connection_id", default="")

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@._-:/+<>[],")


def _kv_value(value: Any) -> str:
    text = str(value)
    if text and all(c in _SAFE for c in text):
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


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_kv_value(record.getMessage())}",
        ]
        parts.extend(f"{k}={_kv_value(v)}" for k, v in _fields(record).items())
        if record.exc_info:
            parts.append(f"exc={_kv_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(_fields(record))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


class _ContextQueueHandler(logging.handlers.QueueHandler):
    """Resolves context variables in the caller's thread before queueing."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.fields = _fields(record)
        prepared: logging.LogRecord = super().prepare(record)
        return prepared


class _PreparedFormatterProxy(logging.Formatter):
    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return self.inner.format(record)


def configure_logging(
    fmt: str = "kv", level: str = "info", stream: TextIO | None = None
) -> logging.handlers.QueueListener:
    """Route the ``mqpolicy`` loggers through a queue to ``stream`` (stderr).

    Returns the started listener; stop it at shutdown to flush.
    """
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else KeyValueFormatter()
    sink = logging.StreamHandler(stream or sys.stderr)
    sink.setFormatter(_PreparedFormatterProxy(formatter))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = _ContextQueueHandler(records)
    root = logging.getLogger("mqpolicy")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    listener = logging.handlers.QueueListener(records, sink, respect_handler_level=False)
    listener.start()
    return listener


def set_level(level: str) -> None:
    logging.getLogger("mqpolicy").setLevel(level.upper())
