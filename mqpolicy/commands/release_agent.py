"""``mqpolicy release-agent``: the command that runs the release agent
(:mod:`mqpolicy.scheduler.release_agent`) on its unix socket, as root."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from mqpolicy import __version__
from mqpolicy.commands.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from mqpolicy.commands.reload import RELOAD_SIGNALS, reload_on_hangup, reload_policy
from mqpolicy.daemon.sd_notify import sd_notify
from mqpolicy.daemon.structured_log import configure_logging
from mqpolicy.policy.endpoints import Endpoint, parse_endpoint
from mqpolicy.policy.model import Policy, SchedulerSettings
from mqpolicy.scheduler.mta_queue import MtaQueue
from mqpolicy.scheduler.release_agent import DEFAULT_AGENT_ENDPOINT, AgentServer, ReleaseAgent

log = logging.getLogger("mqpolicy.release_agent")


async def cmd_release_agent(policy: Policy, path: Path, listen: str | None,
                            log_level: str | None,
                            open_queue: Callable[[SchedulerSettings], MtaQueue]) -> int:
    """``mqpolicy release-agent``: listen on ``listen``, else ``scheduler.release_agent``,
    else :data:`DEFAULT_AGENT_ENDPOINT`. ``open_queue`` builds the adapter that runs the
    MTA's commands itself (from the composition root)."""
    settings = policy.scheduler
    if settings is None:
        print("mqpolicy release-agent: the policy has no scheduler: section (it names the "
              "MTA)", file=sys.stderr)
        return EXIT_USAGE
    try:
        endpoint = parse_endpoint(listen) if listen else (settings.release_agent
                                                         or DEFAULT_AGENT_ENDPOINT)
        if not endpoint.is_unix:
            raise ValueError("the release agent listens on a unix socket")
    except ValueError as exc:
        print(f"mqpolicy release-agent: --listen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    listener = configure_logging(policy.log.format, log_level or policy.log.level)
    try:
        return await _run(policy, path, endpoint, log_level, open_queue)
    finally:
        listener.stop()


async def _run(policy: Policy, path: Path, endpoint: Endpoint, log_level: str | None,
               open_queue: Callable[[SchedulerSettings], MtaQueue]) -> int:
    loop = asyncio.get_running_loop()
    settings = policy.scheduler or SchedulerSettings()
    agent = ReleaseAgent(open_queue(settings), settings.mta)
    server = AgentServer(agent, endpoint)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen", extra={"fields": {"listen": str(endpoint),
                                                     "error": str(exc)}})
        return EXIT_FAILURE
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def apply(new: Policy) -> bool:
        if new.scheduler is None:
            log.error("reload refused: the policy has no scheduler: section")
            return False
        if (new.scheduler.mta, new.scheduler.postfix_config_dir, new.scheduler.sendmail_cf) \
                != (agent.mta, settings.postfix_config_dir, settings.sendmail_cf):
            log.warning("changed MTA settings need a restart to take effect")
        return True

    reload_on_hangup(loop, lambda: reload_policy(path, log_level, apply))
    log.info("release agent ready", extra={"fields": {
        "listen": str(endpoint), "instance": agent.queue.instance, "version": __version__}})
    sd_notify(f"READY=1\nSTATUS=releasing for {agent.queue.instance} on {endpoint}")
    await stop.wait()
    sd_notify("STOPPING=1")
    for sig in (signal.SIGTERM, signal.SIGINT, *RELOAD_SIGNALS):
        loop.remove_signal_handler(sig)
    await server.close()
    log.info("release agent stopped")
    return EXIT_OK
