"""Reading the policy file again on SIGHUP (``serve``, ``milter``, ``scheduler``)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mqpolicy.daemon.sd_notify import sd_notify
from mqpolicy.daemon.structured_log import set_level
from mqpolicy.policy.loader import ConfigError, load_policy
from mqpolicy.policy.model import Policy
from mqpolicy.store.urls import check_store_url

log = logging.getLogger("mqpolicy.main")

RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
"""Either reads the policy file again (SIGUSR1 where the milter runs: see
:func:`reload_on_hangup`)."""


def reload_on_hangup(loop: asyncio.AbstractEventLoop,
                     reload: Callable[[], Awaitable[object]]) -> None:
    """Run ``reload`` on every SIGHUP or SIGUSR1, one at a time in the order the signals
    came: a reload that read the file before an edit never lands after one that read it
    after.

    SIGUSR1 is the reload signal of the units that run the milter: libmilter's own signal
    thread waits for SIGHUP (with SIGTERM and SIGINT) and stops the milter when it gets
    one, and on a loaded machine the kernel sometimes hands it a SIGHUP meant for us (seen
    once in about twelve starts with a busy loop on each core). It never waits for SIGUSR1."""
    lock = asyncio.Lock()  # first come, first served
    running: set[asyncio.Task[None]] = set()  # kept referenced until done

    async def one() -> None:
        async with lock:
            await reload()

    def on_hup() -> None:
        task = loop.create_task(one())
        running.add(task)
        task.add_done_callback(running.discard)

    for sig in RELOAD_SIGNALS:
        loop.add_signal_handler(sig, on_hup)


async def reload_policy(path: Path, log_level: str | None,
                        apply: Callable[[Policy], bool]) -> bool:
    """A SIGHUP's reload: systemd told, the file read anew (a broken one changes nothing),
    ``apply`` hands the new policy to the command (False: it refused it, and logged why),
    then the new log level (``log_level``, from the command line, wins). True when the
    new policy is in force."""
    # MONOTONIC_USEC: what systemd's Type=notify-reload (253 and later) asks for with it
    sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        try:  # off the event loop
            new = await asyncio.get_running_loop().run_in_executor(
                None, load_policy, path, check_store_url)
        except ConfigError as exc:  # a broken file: the running policy stays
            for issue in exc.issues:
                log.error("reload refused, keeping the running policy",
                          extra={"fields": {"problem": str(issue)}})
            return False
        if not apply(new):
            return False
        set_level(log_level or new.log.level)
        log.info("policy reloaded", extra={"fields": {"policy": str(path),
                                                      "limits": len(new.limits)}})
        return True
    finally:
        sd_notify("READY=1")
