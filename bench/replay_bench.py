"""Replay benchmark: a day of a busy Postfix (1,000,000 log lines by default) through
``mqpolicy replay``'s reading, rebuilding and replay, with the example policy.

Writes the log to a temporary file first (not timed): per message the lines a real
Postfix writes (smtpd connect, client with a SASL login for a third of them, cleanup,
qmgr, one to three deliveries, removed, disconnect), a few refused RCPTs and deferrals,
2,000 senders of which a few send most of the mail, spread over 24 hours. Then times the
command's own path (:func:`mqpolicy.commands.replay.read_lines`, ``MailLog.feed``,
``MailLog.mails``, ``replay``, with the command's collector setting) and prints lines/s
and the total seconds.

    .venv/bin/python bench/replay_bench.py
    .venv/bin/python bench/replay_bench.py --lines 200000 --policy my.yaml
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mqpolicy.commands.replay import fewer_full_collections, read_lines
from mqpolicy.feedback.log_replay import MailLog, RetrySchedule, replay
from mqpolicy.policy.loader import load_policy
from mqpolicy.store.urls import check_store_url

EXAMPLE = Path(__file__).resolve().parent.parent / "mqpolicy" / "examples" / "mqpolicy.yaml"
DAY = datetime(2026, 12, 6, tzinfo=UTC)


def write_log(path: Path, lines_wanted: int, seed: int) -> int:
    """A day of mail, about ``lines_wanted`` lines; how many were written."""
    rnd = random.Random(seed)
    senders = [f"user{i}@{'news.' if i % 10 == 0 else ''}sender{i % 50}.example"
               for i in range(2000)]
    weights = [1 / (i + 1) for i in range(len(senders))]
    domains = ["gmail.com", "yahoo.com", "outlook.com", "example.org", "example.net",
               *(f"corp{i}.example" for i in range(40))]
    per_message = 7.5  # lines per message, on average, with the mix below
    messages = int(lines_wanted / per_message)
    step = 86_400 / messages
    written = 0
    with path.open("w", encoding="utf-8") as out:
        for n in range(messages):
            t = DAY + timedelta(seconds=n * step)
            ts = f"{t:%b} {t.day:>2} {t:%H:%M:%S}"
            sender = rnd.choices(senders, weights)[0]
            client = f"c{n % 200}.example[10.0.{n % 200 // 50}.{n % 50 + 1}]"
            qid = f"{0x10000000 + n:X}"
            rcpts = [f"r{rnd.randrange(100000)}@{rnd.choice(domains)}"
                     for _ in range(rnd.choice((1, 1, 1, 2, 3)))]
            lines = [f"{ts} mta postfix/smtpd[{1000 + n % 50}]: connect from {client}"]
            if rnd.random() < 0.02:  # a refused RCPT, no queue file
                lines.append(f"{ts} mta postfix/smtpd[{1000 + n % 50}]: NOQUEUE: reject: "
                             f"RCPT from {client}: 450 4.7.1 <{rcpts[0]}>: Recipient "
                             f"address rejected: try again later; from=<{sender}> "
                             f"to=<{rcpts[0]}> proto=ESMTP helo=<c.example>")
            else:
                login = (f", sasl_method=PLAIN, sasl_username={sender.split('@')[0]}"
                         if n % 3 == 0 else "")
                lines += [
                    f"{ts} mta postfix/smtpd[{1000 + n % 50}]: {qid}: client={client}{login}",
                    f"{ts} mta postfix/cleanup[2000]: {qid}: message-id=<{qid}@c.example>",
                    f"{ts} mta postfix/qmgr[300]: {qid}: from=<{sender}>, "
                    f"size={rnd.randrange(800, 90000)}, nrcpt={len(rcpts)} (queue active)",
                ]
                for rcpt in rcpts:
                    status = "deferred" if rnd.random() < 0.03 else "sent"
                    reply = ("host mx.d[192.0.2.9] said: 421 4.7.0 try again later (in "
                             "reply to RCPT TO command)" if status == "deferred"
                             else "250 2.0.0 Ok: queued as 4Xyz")
                    lines.append(f"{ts} mta postfix/smtp[{3000 + n % 20}]: {qid}: to=<{rcpt}>, "
                                 f"relay=mx.d[192.0.2.9]:25, delay=0.4, delays=0.1/0/0.1/0.2, "
                                 f"dsn={'4.7.0' if status == 'deferred' else '2.0.0'}, "
                                 f"status={status} ({reply})")
                lines.append(f"{ts} mta postfix/qmgr[300]: {qid}: removed")
            lines.append(f"{ts} mta postfix/smtpd[{1000 + n % 50}]: disconnect from {client} "
                         f"ehlo=1 mail=1 rcpt={len(rcpts)} data=1 quit=1 commands=5")
            out.write("\n".join(lines) + "\n")
            written += len(lines)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--policy", default=str(EXAMPLE))
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    policy = load_policy(args.policy, check_store_url)
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as tmp:
        path = Path(tmp) / "maillog"
        lines = write_log(path, args.lines, args.seed)
        size_mb = path.stat().st_size / 1e6
        print(f"log: {lines:,} lines, {size_mb:.0f} MB, policy {args.policy}")
        reference = datetime(2026, 12, 7, 12, tzinfo=UTC)
        with fewer_full_collections():  # as the command does
            started = time.perf_counter()
            log = MailLog(reference)
            for line in read_lines(str(path)):
                log.feed(line)
            read_s = time.perf_counter() - started
            schedule = RetrySchedule()
            mails = log.mails(schedule)
            rebuilt_s = time.perf_counter() - started - read_s
            report = replay(policy, mails, name=args.policy, schedule=schedule,
                            summary=log.summary)
            total_s = time.perf_counter() - started
    replay_s = total_s - read_s - rebuilt_s
    print(f"read and parse: {read_s:.1f} s ({lines / read_s:,.0f} lines/s); "
          f"rebuild: {rebuilt_s:.1f} s; replay: {replay_s:.1f} s "
          f"({report.decisions:,} decisions, {report.decisions / replay_s:,.0f}/s)")
    print(f"mails {report.mails:,}, recipients {report.recipients:,}, "
          f"unparsable {log.summary.unparsable:,}, retries merged "
          f"{log.summary.retries_merged:,}")
    print(f"total: {total_s:.1f} s for {lines:,} lines: {lines / total_s:,.0f} lines/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
