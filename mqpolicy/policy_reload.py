"""Reading the policy file again on SIGHUP (``serve``, ``milter``, ``scheduler``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from mqpolicy.config import ConfigError, Policy, load_policy
from mqpolicy.sd_notify import sd_notify
from mqpolicy.structured_log import set_level

log = logging.getLogger("mqpolicy.main")


async def load_for_reload(path: Path) -> Policy | None:
    """The policy file read anew, off the event loop; None when it is broken, with each
    problem logged: the running policy stays."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, load_policy, path)
    except ConfigError as exc:
        for issue in exc.issues:
            log.error("reload refused, keeping the running policy",
                      extra={"fields": {"problem": str(issue)}})
        return None


async def reload_policy(path: Path, log_level: str | None,
                        apply: Callable[[Policy], bool]) -> bool:
    """A SIGHUP's reload: systemd told, the file read anew (a broken one changes nothing),
    ``apply`` hands the new policy to the command (False: it refused it, and logged why),
    then the new log level (``log_level``, from the command line, wins). True when the
    new policy is in force."""
    sd_notify("RELOADING=1")
    try:
        new = await load_for_reload(path)
        if new is None or not apply(new):
            return False
        set_level(log_level or new.log.level)
        log.info("policy reloaded", extra={"fields": {"policy": str(path),
                                                      "limits": len(new.limits)}})
        return True
    finally:
        sd_notify("READY=1")
