"""``mqpolicy feedback``: follow the delivery log in a process of its own, sharing backoff states
through Redis."""

from __future__ import annotations

import asyncio
import signal
import sys

from mqpolicy.commands.exit_codes import EXIT_OK, EXIT_USAGE
from mqpolicy.daemon.sd_notify import sd_notify
from mqpolicy.daemon.structured_log import configure_logging
from mqpolicy.decision.mx_resolver import DestinationFinder
from mqpolicy.decision.runtime_state import make_resolver
from mqpolicy.decision.service import wall_clock_ms
from mqpolicy.feedback.follower import FeedbackService
from mqpolicy.policy.model import Policy
from mqpolicy.store.opener import open_backoff_store


async def cmd_feedback(policy: Policy, log_level: str | None) -> int:
    """``mqpolicy feedback``: its own process, sharing backoff states through Redis."""
    if policy.feedback is None:
        print("mqpolicy feedback: the policy has no feedback section", file=sys.stderr)
        return EXIT_USAGE
    if not policy.destinations:
        print("mqpolicy feedback: no destinations to back off (add destinations:)",
              file=sys.stderr)
        return EXIT_USAGE
    if policy.store.url.startswith("memory:"):
        print("mqpolicy feedback: with store memory:// the backoff states live inside "
              "`mqpolicy serve`; a feedback section there runs it in that process",
              file=sys.stderr)
        return EXIT_USAGE
    listener = configure_logging(policy.log.format, log_level or policy.log.level)
    loop = asyncio.get_running_loop()
    backoff_store = open_backoff_store(policy.store.url, key_prefix=policy.store.key_prefix)
    finder = DestinationFinder(make_resolver(policy))
    service = FeedbackService(lambda: policy, backoff_store,
                              lambda domain: finder.find(domain, policy.destinations),
                              clock_ms=wall_clock_ms)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    sd_notify("READY=1\nSTATUS=following the delivery log")
    try:
        await service.follow(stop)
    finally:
        sd_notify("STOPPING=1")
        await backoff_store.close()
        if finder.resolver is not None:
            await finder.resolver.aclose()
        listener.stop()
    return EXIT_OK
