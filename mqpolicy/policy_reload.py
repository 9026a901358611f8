"""Reading the policy file again on SIGHUP, for every long-running command."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mqpolicy.config import ConfigError, Policy, load_policy

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
