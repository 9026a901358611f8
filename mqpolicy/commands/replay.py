"""``mqpolicy replay``: a policy (and ``--compare`` another) over yesterday's Postfix log.

Reads the files given (plain or gzip-compressed, rotated ones too: the mail is sorted by
log time, whatever the files' order), rebuilds the messages and replays the decisions
(:mod:`mqpolicy.feedback.log_replay`); prints a table, or ``--json``. Lines it cannot
read are counted and shown, never fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from mqpolicy.commands.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from mqpolicy.feedback.decision_log import NotADecision, is_decision_line, read_decision_line
from mqpolicy.feedback.delivery_log import read_log_line
from mqpolicy.feedback.log_replay import (
    COLUMNS,
    MAXIMAL_BACKOFF_S,
    MAXIMAL_QUEUE_LIFETIME_S,
    MINIMAL_BACKOFF_S,
    MailLog,
    ReplayReport,
    RetrySchedule,
    compare,
    replay,
)
from mqpolicy.policy.loader import ConfigError, load_policy
from mqpolicy.policy.model import Policy
from mqpolicy.policy.rates import RateSyntaxError, parse_duration_ms
from mqpolicy.postfix.postconf import read_parameters
from mqpolicy.store.urls import check_store_url

PROGRESS_EVERY = 200_000
FULL_COLLECTION_EVERY = 1000
"""While replaying: a full collection after this many of the middle generation (Python's
default is 10)."""


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("maillog", nargs="+", help="Postfix log files (syslog or "
                        "maillog_file) or mqpolicy's own log (log.decisions: all); .gz "
                        "and rotated files too; - = stdin")
    parser.add_argument("--compare", metavar="OTHER_POLICY",
                        help="also replay this policy and show what changes")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--postconf", metavar="CONFIG_DIR",
                        help="read the three retry times below from this Postfix's "
                        "configuration (postconf -c CONFIG_DIR); options given win")
    parser.add_argument("--minimal-backoff-time", type=int, default=None,
                        metavar="S", help="a deferred client's first wait "
                        f"(Postfix's default {MINIMAL_BACKOFF_S}s)")
    parser.add_argument("--maximal-backoff-time", type=int, default=None,
                        metavar="S", help=f"its longest wait (default {MAXIMAL_BACKOFF_S}s)")
    parser.add_argument("--maximal-queue-lifetime", type=int, default=None, metavar="S",
                        help="deferred mail older than this expires "
                        f"(default {MAXIMAL_QUEUE_LIFETIME_S}s)")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")


def read_lines(path: str) -> Iterator[str]:
    """The lines of a log file, gunzipped when it is gzip-compressed (by its magic)."""
    if path == "-":
        yield from sys.stdin
        return
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        with gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape") as unzipped:
            yield from unzipped
    else:
        with open(path, encoding="utf-8", errors="surrogateescape") as plain:
            yield from plain


FIRST_LINES_LOOKED_AT = 1000


def in_time_order(paths: Sequence[str]) -> list[str]:
    """The files by the time of their first dated line (rotated files come newest first
    on a command line: ``mail.log mail.log.1 mail.log.2.gz``); a file with no dated line
    among its first lines, stdin, and a file that cannot be read (reading it says why)
    keep their place after the others. In time order a queue id Postfix gave again after
    its message was removed is read as a new message."""
    dated: list[tuple[datetime, int, str]] = []
    undated: list[str] = []
    for n, path in enumerate(paths):
        try:
            first = None if path == "-" else _first_time(path)
        except (OSError, EOFError):  # gzip.BadGzipFile is an OSError
            first = None
        if first is None:
            undated.append(path)
        else:
            dated.append((first, n, path))
    return [path for _, _, path in sorted(dated)] + undated


def _first_time(path: str) -> datetime | None:
    reference = _reference(path)
    for n, line in enumerate(read_lines(path)):
        if n >= FIRST_LINES_LOOKED_AT:
            return None
        read = read_log_line(line, reference=reference)
        if not isinstance(read, str) and read.timestamp is not None:
            return read.timestamp
        if is_decision_line(line):
            with contextlib.suppress(NotADecision):
                return datetime.fromtimestamp(
                    read_decision_line(line, reference).ms / 1000, UTC)
    return None


def _reference(path: str) -> datetime:
    """What completes a syslog timestamp (no year, no zone): the file's last change."""
    try:
        mtime = Path(path).stat().st_mtime if path != "-" else time.time()
    except OSError:
        mtime = time.time()
    return datetime.fromtimestamp(mtime).astimezone()


_POSTFIX_TIMES = {  # name: (default unit, Postfix's default in seconds)
    "minimal_backoff_time": ("s", MINIMAL_BACKOFF_S),
    "maximal_backoff_time": ("s", MAXIMAL_BACKOFF_S),
    "maximal_queue_lifetime": ("d", MAXIMAL_QUEUE_LIFETIME_S),
}


def retry_schedule(args: argparse.Namespace) -> RetrySchedule:
    """The retry times: the options given, else ``--postconf``'s Postfix, else Postfix's
    defaults. OSError when postconf fails, ValueError for a value it cannot read."""
    seconds = {name: default for name, (_, default) in _POSTFIX_TIMES.items()}
    if args.postconf:
        found = read_parameters(args.postconf, *_POSTFIX_TIMES)
        for name, (unit, _) in _POSTFIX_TIMES.items():
            if found.get(name):
                try:
                    seconds[name] = parse_duration_ms(found[name], default_unit=unit) // 1000
                except RateSyntaxError as exc:
                    raise ValueError(f"{name} = {found[name]}: {exc}") from None
    for name in _POSTFIX_TIMES:
        given = getattr(args, name)
        if given is not None:
            seconds[name] = given
    return RetrySchedule(**seconds)


@contextmanager
def fewer_full_collections() -> Iterator[None]:
    """The garbage collector with full collections a hundred times rarer, then as it was.

    Reading a day of log and replaying it makes millions of objects that live to the end
    (the mail, the budgets, the tallies) and almost no reference cycles: with the default
    thresholds the collector walks them all again every few hundred thousand allocations,
    a sixth of a replay's time. The young generations are still collected as usual."""
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], max(thresholds[2], FULL_COLLECTION_EVERY))
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


@fewer_full_collections()
def cmd_replay(policy: Policy, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    other: Policy | None = None
    if args.compare:
        try:
            other = load_policy(args.compare, check_store_url)
        except ConfigError as exc:
            print(f"mqpolicy replay: invalid policy file {args.compare}:\n{exc}", file=err)
            return EXIT_FAILURE
    try:
        schedule = retry_schedule(args)
    except (OSError, ValueError) as exc:
        print(f"mqpolicy replay: {exc}", file=err)
        return EXIT_USAGE
    if min(schedule.minimal_backoff_time, schedule.maximal_backoff_time,
           schedule.maximal_queue_lifetime) <= 0:
        print("mqpolicy replay: the retry times must be positive", file=err)
        return EXIT_USAGE
    progress = (lambda text: None) if args.quiet else _progress(err)
    log = MailLog()
    started = time.monotonic()
    for path in in_time_order(args.maillog):
        reference = _reference(path)
        try:
            for line in read_lines(path):
                log.feed(line, reference)
                if log.summary.lines % PROGRESS_EVERY == 0:
                    progress(f"read {log.summary.lines:,} lines")
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            print(f"mqpolicy replay: cannot read {path}: {exc}", file=err)
            return EXIT_USAGE
    mails = log.mails(schedule)
    def replayed(done: int, total: int) -> None:
        progress(f"replayed {done:,} of {total:,} mails")
    report = replay(policy, mails, name=args.config, schedule=schedule, summary=log.summary,
                    progress=replayed, results=log.results)
    other_report = (replay(other, mails, name=args.compare, schedule=schedule,
                           summary=log.summary, progress=replayed, results=log.results)
                    if other is not None else None)
    progress(f"done: {log.summary.lines:,} lines in {time.monotonic() - started:.1f}s\n")
    if args.json:
        doc: dict[str, object] = report.as_json()
        if other_report is not None:
            doc = {"a": doc, "b": other_report.as_json(),
                   "compare": compare(report, other_report)}
        print(json.dumps(doc, indent=2), file=out)
    elif other_report is not None:
        print(render_compare(report, other_report), file=out)
    else:
        print(render_report(report), file=out)
    return EXIT_OK


def _progress(err: IO[str]) -> Callable[[str], None]:
    tty = err.isatty()
    def show(text: str) -> None:
        if tty:
            err.write(f"\rmqpolicy replay: {text}\033[K")
        elif not text.endswith("\n"):
            err.write(f"mqpolicy replay: {text}\n")
        else:
            err.write(f"mqpolicy replay: {text}")
        err.flush()
    return show


# ---------------------------------------------------------------- rendering



def render_report(report: ReplayReport) -> str:
    doc = report.as_json()
    s = report.input
    lines = [
        f"replay of {report.policy} over {s.lines:,} log lines "
        f"({s.first.isoformat() if s.first else '-'} .. "
        f"{s.last.isoformat() if s.last else '-'})",
        f"{report.mails:,} mails, {report.recipients:,} recipients, "
        f"{report.decisions:,} decisions ({report.retries_skipped:,} retries counted, "
        f"not made: their limits had no room); retries as Postfix: "
        f"{report.schedule.minimal_backoff_time}s..{report.schedule.maximal_backoff_time}s, "
        f"expire after {report.schedule.maximal_queue_lifetime}s",
        "",
        "lane            " + "".join(f"{c:>18}" for c in COLUMNS) + "   wait p50/p95/max s",
    ]
    for name, tally in report.lanes.items():
        msgs, rcpts, wait = tally.messages, tally.recipients, tally.wait_summary()
        cells = "".join(f"{f'{msgs[c]}/{rcpts[c]}':>18}" for c in COLUMNS)
        lines.append(f"{name:<16}{cells}   {wait['p50']}/{wait['p95']}/{wait['max']}")
    lines.append("(messages/recipients)")
    lines.append("")
    if report.limits:
        lines.append("limits found spent on the mail's first tries (what a live server "
                     "answers), and the retries each deferred:")
        lines.append(f"{'limit':<24}{'action':>10}{'first try':>11}{'RCPT':>8}{'END':>8}"
                     f"{'recipients':>12}{'decided':>9}{'retries':>9}")
        for name, lim in sorted(report.limits.items()):
            lines.append(f"{name:<24}{lim.action:>10}{lim.first_tries:>11}{lim.rcpt:>8}"
                         f"{lim.end_of_message:>8}{lim.recipients:>12}{lim.decided:>9}"
                         f"{lim.retries:>9}")
    else:
        lines.append("no limit was found spent")
    busiest = doc["busiest_keys"]
    assert isinstance(busiest, list)
    if busiest:
        lines += ["", "busiest keys (first tries that found them spent):"]
        lines += [f"  {b['first_tries']:>8}  {b['limit']}  {b['key']}" for b in busiest]
    if report.destinations:
        lines += ["", "destinations feedback would have slowed (from the delivery results):"]
        lines += [f"  {name}: {t.slow_downs} slow-downs, {t.backoffs} backoffs (lowest "
                  f"factor {t.lowest_factor:g}), {t.pauses} pauses; first: {t.reason}"
                  for name, t in sorted(report.destinations.items())]
    lines += ["", "the log says: " + ", ".join(f"{k} {v}" for k, v in
                                                 sorted(report.logged.items()))]
    if report.logged_lanes:
        what = ("the live policy's lanes (recipients let in)" if report.input.decision_lines
                else "delivered by each lane's transport (recipients, last attempt)")
        lines.append(f"{what}: " + ", ".join(
            f"{k} {v}" for k, v in sorted(report.logged_lanes.items())))
    lines.append(_input_line(report))
    return "\n".join(lines)


def _input_line(report: ReplayReport) -> str:
    s = report.input
    text = (f"input: {s.lines:,} lines, {s.other:,} without message facts, "
            f"{s.unparsable:,} unparsable, {s.no_time:,} without a time, "
            f"{s.retries_merged:,} retries merged; mail without smtpd's client line "
            f"{s.no_intake:,}, without qmgr's sender line {s.no_sender:,}")
    if s.decision_lines or s.unreadable_decisions:
        text += (f"\nmqpolicy's decisions: {s.decision_lines:,} lines, "
                 f"{s.unreadable_decisions:,} unreadable, {s.no_rcpt_decisions:,} message "
                 f"ends without RCPT lines (log.decisions: notable?); Postfix's messages "
                 f"left to them: {s.mail_log_messages_ignored:,}")
    for sample in s.unparsable_samples:
        text += f"\n  unparsable: {sample}"
    return text


def render_compare(a: ReplayReport, b: ReplayReport) -> str:
    diff = compare(a, b)
    lines = [f"compare  A = {a.policy}  B = {b.policy}  "
             f"({a.mails:,} mails, {a.recipients:,} recipients)", "",
             "lane            outcome      messages A -> B      recipients A -> B"]
    for name in sorted(set(a.lanes) | set(b.lanes)):
        ta, tb = a.lane(name), b.lane(name)
        for c in COLUMNS:
            ma, mb = ta.messages[c], tb.messages[c]
            ra, rb = ta.recipients[c], tb.recipients[c]
            if (ma, mb, ra, rb) == (0, 0, 0, 0):
                continue
            mark = " *" if (ma, ra) != (mb, rb) else ""
            lines.append(f"{name:<16}{c:<12}{ma:>9} -> {mb:<9}{ra:>9} -> {rb:<9}{mark}")
    lines += ["", f"{'limit':<24}{'action':>10}  first try A -> B     retries A -> B"]
    limits = diff["limits"]
    assert isinstance(limits, dict)
    for name, row in limits.items():
        first, retries = row["first_tries"], row["retries"]
        mark = " *" if (first["a"], retries["a"]) != (first["b"], retries["b"]) else ""
        lines.append(f"{name:<24}{row['action']!s:>10}  {first['a']:>7} -> {first['b']:<7}"
                     f"{retries['a']:>7} -> {retries['b']:<7}{mark}")
    keys = diff["keys_most_affected"]
    assert isinstance(keys, list)
    if keys:
        lines += ["", "keys most affected (first tries that found them spent, A -> B):"]
        lines += [f"  {k['change']:>+8}  {k['limit']}  {k['key']}  ({k['a']} -> {k['b']})"
                  for k in keys]
    lines += ["", _input_line(a)]
    return "\n".join(lines)

