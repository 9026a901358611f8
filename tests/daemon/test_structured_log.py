"""Structured log lines: key=value and JSON, context fields, flushing at stop."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from datetime import datetime

from mqpolicy.daemon.structured_log import configure_logging, connection_id_var, queue_id_var


def test_kv_lines_carry_context_and_fields() -> None:
    out = io.StringIO()
    handler = configure_logging("kv", "info", out)
    log = logging.getLogger("mqpolicy.test")
    before = time.time()
    token = connection_id_var.set("c7")
    qtoken = queue_id_var.set("4ABC")
    try:
        log.info("decision", extra={"fields": {"action": "defer", "rcpt": "a b@x"}})
        log.debug("not shown")
    finally:
        connection_id_var.reset(token)
        queue_id_var.reset(qtoken)
    handler.stop()
    after = time.time()
    (line,) = out.getvalue().splitlines()
    ts, rest = line.split(" ", 1)
    assert rest == ('level=info logger=mqpolicy.test msg=decision conn=c7 qid=4ABC '
                    'action=defer rcpt="a b@x"')
    # the record's time, UTC, to the millisecond
    assert re.fullmatch(r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts), ts
    logged = datetime.fromisoformat(ts[3:]).timestamp()
    assert before - 0.001 <= logged <= after


def test_json_lines_and_exceptions() -> None:
    out = io.StringIO()
    handler = configure_logging("json", "debug", out)
    log = logging.getLogger("mqpolicy.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed %s", "here", extra={"fields": {"n": 3}})
    handler.stop()
    data = json.loads(out.getvalue())
    assert data["msg"] == "failed here"
    assert data["n"] == 3
    assert "ValueError: boom" in data["exc"]


def test_many_lines_are_all_written_in_order_at_stop() -> None:
    out = io.StringIO()
    handler = configure_logging("kv", "info", out)
    log = logging.getLogger("mqpolicy.test")
    for i in range(2000):
        log.info("line", extra={"fields": {"i": i}})
    handler.stop()
    lines = out.getvalue().splitlines()
    assert [int(ln.rsplit("i=", 1)[1]) for ln in lines] == list(range(2000))
