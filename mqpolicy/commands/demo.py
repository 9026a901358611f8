"""``mqpolicy demo``: a private Postfix, an SMTP sink and mqpolicy, a realistic mix of mail
sent through them, and a report (:mod:`mqpolicy.lab.demo`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from mqpolicy.lab.demo import (
    DEMO_CONFIG,
    DEMO_HEADER,
    DemoRun,
    report,
    send_mix,
)
from mqpolicy.lab.mail_stack import MailStack
from mqpolicy.lab.postfix_instance import PostfixError
from mqpolicy.lab.smtp_sink import SinkMessage
from mqpolicy.policy.model import Policy
from mqpolicy.postfix.programs import POSTFIX


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=str(DEMO_CONFIG),
                        help="policy file for the demo (default: conf/demo.yaml)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for deliveries (default: %(default)s)")


def run_demo(policy: Policy, path: Path, args: argparse.Namespace,
             out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if os.geteuid() != 0 or not os.access(POSTFIX.path, os.X_OK):
        print("mqpolicy demo: needs root and Postfix installed (it runs a private Postfix "
              "instance; the system one is not touched)", file=sys.stderr)
        return 1
    stack = MailStack.create(prefix="mqdemo-")
    try:
        started = time.monotonic()
        stack.start(path.read_text(encoding="utf-8"))
        lane_text = ", ".join(f"{lane.name} ({lane.transport})" for lane in policy.lanes)
        print(f"mqpolicy demo: private Postfix on 127.0.0.1:{stack.smtp_port} "
              f"(config {stack.postfix.config_dir}), mqpolicy serve on "
              f"127.0.0.1:{stack.policy_port}, sink on 127.0.0.1:{stack.sink.port}; "
              f"started in {time.monotonic() - started:.1f}s", file=out)
        print(f"policy {path}: lanes {lane_text}; limits "
              f"{', '.join(limit.name for limit in policy.limits) or 'none'}", file=out)
        run = DemoRun()
        send_mix(stack, run)
        held_ids = {m.queue_id for m in stack.postfix.queue() if m.queue_name == "hold"}
        expected = {s.demo_id for s in run.sent
                    if s.result.queued and s.result.queue_id not in held_ids}
        print(f"sent {len(run.sent)} messages; waiting for {len(expected)} deliveries...",
              file=out)

        def all_there(messages: list[SinkMessage]) -> bool:
            return expected <= {m.header(DEMO_HEADER) for m in messages}

        try:
            delivered = stack.sink.wait_for(all_there, args.timeout)
        except TimeoutError:
            delivered = stack.sink.messages()
        report(stack, policy, run, delivered, held_ids, out)
        return 0
    except (PostfixError, RuntimeError, OSError, TimeoutError) as exc:
        print(f"mqpolicy demo: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.remove()
        print("stopped Postfix, mqpolicy and the sink", file=out)
