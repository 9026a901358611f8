"""The outages of something a service depends on (its store), each logged at its start and
at its end, however close together they come.

An outage starts at the first failure after a success and ends at the next success. Its
start is logged with the error; the failures inside it are counted, not logged (a long one
is reminded every ``reminder_s``); its end is logged with how many failures it had and how
long it lasted. Thread-safe: the milter's threads and the event loop share one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class OutageLog:
    """Log each outage's start (``down``, with ``error``), every ``reminder_s`` while it lasts
    (``still``) and its end (``up``), the last two with the failures so far as
    ``count_field`` and ``lasted_ms``. Warnings all: the end says what the outage cost.

    :meth:`failed` for every failure, :meth:`succeeded` for every success: outside an
    outage a success costs one attribute read."""

    def __init__(self, logger: logging.Logger, *, down: str, still: str, up: str,
                 count_field: str,
                 reminder_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._down = down
        self._still = still
        self._up = up
        self._count_field = count_field
        self._reminder_s = reminder_s
        self._clock = clock
        self._lock = threading.Lock()
        #: When the outage in progress started (the clock's seconds); None: no outage.
        self.since: float | None = None
        self._failures = 0
        self._remind_at = 0.0

    def failed(self, error: str) -> None:
        """One failure: the start of an outage is logged, the rest counted."""
        now = self._clock()
        with self._lock:
            if self.since is None:
                self.since, self._failures = now, 1
                self._remind_at = now + self._reminder_s
                fields: dict[str, object] = {"error": error}
                message = self._down
            else:
                self._failures += 1
                if now < self._remind_at:
                    return
                self._remind_at = now + self._reminder_s
                fields = {"error": error, self._count_field: self._failures,
                          "lasted_ms": round((now - self.since) * 1000)}
                message = self._still
        self._log.warning(message, extra={"fields": fields})

    def succeeded(self) -> None:
        """One success: the end of an outage in progress is logged."""
        if self.since is None:  # the usual case, without the lock
            return
        now = self._clock()
        with self._lock:
            since, self.since = self.since, None
            if since is None:  # another thread ended it first
                return
            failures, self._failures = self._failures, 0
        self._log.warning(self._up, extra={"fields": {
            self._count_field: failures, "lasted_ms": round((now - since) * 1000)}})
