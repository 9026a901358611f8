"""``mqpolicy top``: what an operator watches during a campaign, refreshed every second.

Reads only what a running ``mqpolicy serve`` exposes on its metrics port: ``GET /metrics``
(Prometheus text) and ``GET /top.json`` (busiest limit keys, any section a part registers). Rates
are differences between two scrapes; the first screen, and ``--once``, show totals since
the server started. Plain ANSI (cursor home, clear to end of line and of screen): no
curses. Everything shown that came from the server is stripped of control characters.
q typed at its terminal, Ctrl-C (SIGINT, even when it was started with SIGINT ignored) and
SIGTERM quit it, the cursor shown again and the terminal's modes as they were.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import re
import select
import shutil
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Final, NoReturn, TextIO
from urllib.parse import urlsplit

from mqpolicy.commands.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from mqpolicy.metrics.registry import (
    DESTINATION_PAUSED,
    DESTINATIONS_IN_BACKOFF,
    HELD_MESSAGES,
    LANE_PAUSED,
    RELEASES,
)
from mqpolicy.policy.loader import ConfigError, load_policy
from mqpolicy.store.urls import check_store_url

MAX_BODY_BYTES: Final = 16 << 20
_ACTIONS: Final = ("accept", "defer", "hold", "reject")
_HOME: Final = "\x1b[H"
_EOL: Final = "\x1b[K"
_EOS: Final = "\x1b[J"


class TopError(Exception):
    """The metrics endpoint could not be read."""


# ---------------------------------------------------------------- exposition parser

Families = dict[str, list[tuple[dict[str, str], float]]]

_METRIC_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_UNESCAPE: Final = {"\\": "\\", '"': '"', "n": "\n"}


def _parse_labels(line: str, i: int) -> tuple[dict[str, str], int]:
    """Labels from ``line[i] == '{'``; returns them and the index after ``}``."""
    labels: dict[str, str] = {}
    i += 1
    while True:
        while i < len(line) and line[i] in " \t":
            i += 1
        if i < len(line) and line[i] == "}":
            return labels, i + 1
        match = _LABEL_NAME.match(line, i)
        if match is None:
            raise ValueError("label name expected")
        name = match.group()
        i = match.end()
        if line[i:i + 2] != '="':
            raise ValueError("=\" expected")
        i += 2
        value: list[str] = []
        while True:
            if i >= len(line):
                raise ValueError("unterminated label value")
            c = line[i]
            if c == "\\":
                if i + 1 >= len(line) or line[i + 1] not in _UNESCAPE:
                    raise ValueError("bad escape")
                value.append(_UNESCAPE[line[i + 1]])
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                value.append(c)
                i += 1
        labels[name] = "".join(value)
        while i < len(line) and line[i] in " \t":
            i += 1
        if i < len(line) and line[i] == ",":
            i += 1
        elif i >= len(line) or line[i] != "}":
            raise ValueError(", or } expected")


def parse_exposition(text: str) -> Families:
    """Samples of the Prometheus text format by sample name; malformed lines are skipped."""
    families: Families = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _METRIC_NAME.match(line)
        if match is None:
            continue
        name, i = match.group(), match.end()
        labels: dict[str, str] = {}
        try:
            if i < len(line) and line[i] == "{":
                labels, i = _parse_labels(line, i)
            fields = line[i:].split()
            if not fields or len(fields) > 2 or (i < len(line) and line[i] not in " \t"):
                continue
            value = float(fields[0])
        except ValueError:
            continue
        families.setdefault(name, []).append((labels, value))
    return families


# ---------------------------------------------------------------- snapshots


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One scrape: when (monotonic seconds), the samples, the /top.json sections."""

    at: float
    samples: Families
    sections: Mapping[str, object] | None  # None: /top.json not available

    def has(self, name: str) -> bool:
        return name in self.samples

    def total(self, name: str, **match: str) -> float | None:
        """Sum of the samples of ``name`` whose labels include ``match``; None if absent."""
        rows = self.samples.get(name)
        if rows is None:
            return None
        return sum(v for labels, v in rows
                   if all(labels.get(k) == want for k, want in match.items()))

    def by(self, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for labels, value in self.samples.get(name, []):
            key = tuple(labels.get(n, "") for n in label_names)
            out[key] = out.get(key, 0.0) + value
        return out


def counter_rate(now: float, before: float, seconds: float) -> float:
    """Per-second increase; a counter that went down restarted from zero."""
    if seconds <= 0:
        return 0.0
    increase = now - before if now >= before else now
    return increase / seconds


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus's estimate of quantile ``q`` from cumulative ``(le, count)`` pairs."""
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        return None
    total = ordered[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return lower_bound
            if count == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return lower_bound


def _buckets(snap: Snapshot, name: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for labels, value in snap.samples.get(name + "_bucket", []):
        try:
            le = float(labels.get("le", ""))
        except ValueError:
            continue
        out[le] = out.get(le, 0.0) + value
    return out


def latency_quantiles(prev: Snapshot | None, cur: Snapshot, name: str,
                      qs: Iterable[float] = (0.5, 0.99)) -> list[float | None]:
    """Quantiles of histogram ``name`` over the last interval (or since start)."""
    now = _buckets(cur, name)
    if prev is not None:
        before = _buckets(prev, name)
        if all(now.get(le, 0) >= n for le, n in before.items()):
            now = {le: n - before.get(le, 0.0) for le, n in now.items()}
    pairs = list(now.items())
    return [histogram_quantile(q, pairs) for q in qs]


# ---------------------------------------------------------------- fetching


def http_get(url: str, timeout: float) -> tuple[int, bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise TopError(f"{url}: only http://HOST:PORT/... URLs are supported")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    except (ValueError, http.client.HTTPException) as exc:
        raise TopError(f"{url}: {exc}") from None
    try:
        conn.request("GET", path, headers={"Accept": "text/plain"})
        response = conn.getresponse()
        body = response.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise TopError(f"{url}: answer larger than {MAX_BODY_BYTES} bytes")
        return response.status, body
    except (OSError, http.client.HTTPException) as exc:
        raise TopError(f"cannot read {url}: {exc or type(exc).__name__}") from None
    finally:
        conn.close()


def top_json_url(metrics_url: str) -> str:
    parts = urlsplit(metrics_url)
    return f"{parts.scheme}://{parts.netloc}/top.json"


def fetch_snapshot(url: str, timeout: float = 2.0) -> Snapshot:
    status, body = http_get(url, timeout)
    if status != 200:
        raise TopError(f"{url}: HTTP {status}")
    samples = parse_exposition(body.decode("utf-8", "replace"))
    sections: Mapping[str, object] | None = None
    try:
        status, body = http_get(top_json_url(url), timeout)
        if status == 200:
            data = json.loads(body)
            if isinstance(data, dict) and isinstance(data.get("sections"), dict):
                sections = data["sections"]
    except (TopError, ValueError):
        sections = None
    return Snapshot(time.monotonic(), samples, sections)


# ---------------------------------------------------------------- rendering


def clean(text: object, limit: int = 60) -> str:
    """Printable text only (a key comes from an SMTP client), cut to ``limit``."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[: limit - 1] + "~"


def _num(value: float | None, width: int = 9) -> str:
    if value is None:
        return "-".rjust(width)
    if value >= 1e6:
        return f"{value / 1e6:.1f}M".rjust(width)
    if value >= 1e4:
        return f"{value / 1e3:.1f}k".rjust(width)
    if value == int(value):
        return f"{int(value)}".rjust(width)
    return f"{value:.1f}".rjust(width)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms"
    return f"{seconds:.2f}s"


def _uptime(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


class _View:
    """Values of one screen: rates against ``prev`` when there is one, else totals."""

    def __init__(self, prev: Snapshot | None, cur: Snapshot) -> None:
        self.prev = prev
        self.cur = cur
        self.seconds = cur.at - prev.at if prev is not None else 0.0
        self.live = prev is not None and self.seconds > 0

    def value(self, name: str, **match: str) -> float | None:
        now = self.cur.total(name, **match)
        if now is None or not self.live:
            return now
        assert self.prev is not None
        before = self.prev.total(name, **match)
        return counter_rate(now, before or 0.0, self.seconds)

    def values(self, name: str, *labels: str) -> dict[tuple[str, ...], float]:
        now = self.cur.by(name, *labels)
        if not self.live:
            return now
        assert self.prev is not None
        before = self.prev.by(name, *labels)
        return {k: counter_rate(v, before.get(k, 0.0), self.seconds) for k, v in now.items()}


def _lanes(cur: Snapshot, decisions: Mapping[tuple[str, ...], float]) -> list[str]:
    priority = {k[0]: v for k, v in cur.by("mqpolicy_lane_priority", "lane").items()}
    names = set(priority) | {lane for _, lane in decisions}
    return sorted(names, key=lambda n: (priority.get(n, math.inf), n))


def _busiest_rows(prev: Snapshot | None, cur: Snapshot,
                  seconds: float) -> list[tuple[str, str, str, int, float | None]] | None:
    def rows(snap: Snapshot | None) -> list[tuple[str, str, str, int]] | None:
        if snap is None or snap.sections is None:
            return None
        items = snap.sections.get("busiest_keys")
        if not isinstance(items, list):
            return None
        out = []
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("hits"), int):
                out.append((str(item.get("limit", "")), str(item.get("action", "")),
                            str(item.get("key", "")), int(item["hits"])))
        return out

    now = rows(cur)
    if now is None:
        return None
    before = {(lim, key): hits for lim, _, key, hits in rows(prev) or []}
    result: list[tuple[str, str, str, int, float | None]] = []
    for limit, action, key, hits in now:
        old = before.get((limit, key))
        rate = counter_rate(hits, old, seconds) if old is not None and seconds > 0 else None
        result.append((limit, action, key, hits, rate))
    if prev is not None:
        result.sort(key=lambda r: (-1.0 if r[4] is None else r[4], r[3]), reverse=True)
    return result


def render(prev: Snapshot | None, cur: Snapshot, source: str, *,
           height: int | None = None, clock: float | None = None) -> list[str]:
    """The lines of one screen. ``height`` bounds the busiest-keys list (live mode)."""
    view = _View(prev, cur)
    unit = "/s" if view.live else ""
    lines: list[str] = []
    stamp = time.strftime("%H:%M:%S", time.localtime(clock))
    mode = f"every {view.seconds:.1f}s, q or Ctrl-C quits" if view.live else "totals since start"
    lines.append(f"mqpolicy top  {clean(source, 80)}  {stamp}  ({mode})")

    version = next(iter(cur.by("mqpolicy_build_info", "version")), ("?",))[0]
    started = cur.total("mqpolicy_start_time_seconds")
    up = f", up {_uptime(time.time() - started)}" if started else ""
    all_decisions = view.value("mqpolicy_decisions_total")
    d50, d99 = latency_quantiles(prev, cur, "mqpolicy_decision_seconds")
    s50, s99 = latency_quantiles(prev, cur, "mqpolicy_store_seconds")
    lines.append(
        f"mqpolicy {clean(version, 20)}{up} | decisions{unit} {_num(all_decisions, 0)}"
        f" | decision p50 {_duration(d50)} p99 {_duration(d99)}"
        f" | store p50 {_duration(s50)} p99 {_duration(s99)}"
    )
    errors = view.value("mqpolicy_store_errors_total", kind="error")
    timeouts = view.value("mqpolicy_store_errors_total", kind="timeout")
    parts = [f"store errors{unit} {_num(errors, 0)} timeouts{unit} {_num(timeouts, 0)}"]
    if cur.has("mqpolicy_policy_connections"):
        connections = cur.total("mqpolicy_policy_connections")
        requests = view.value("mqpolicy_policy_requests_total")
        parts.append(f"policy connections {_num(connections, 0)} "
                     f"requests{unit} {_num(requests, 0)}")
    if cur.has("mqpolicy_config_reloads_total"):
        ok = cur.total("mqpolicy_config_reloads_total", result="ok")
        failed = cur.total("mqpolicy_config_reloads_total", result="failed")
        parts.append(f"reloads ok {_num(ok, 0)} failed {_num(failed, 0)}")
    lines.append(" | ".join(parts))
    lines.append("")

    # decisions by lane and action, with the hold queue per lane when it is known
    decisions = view.values("mqpolicy_decisions_total", "action", "lane")
    held = cur.by(HELD_MESSAGES, "lane") if cur.has(HELD_MESSAGES) else None
    released = view.values(RELEASES, "lane") if cur.has(RELEASES) else None
    head = f"{'LANE':<20}" + "".join(f"{a + unit:>10}" for a in ("all", *_ACTIONS))
    head += f"{'held':>9}{'released' + unit:>12}"
    lines.append(head)
    for lane in _lanes(cur, decisions):
        row = [decisions.get((a, lane), 0.0) for a in _ACTIONS]
        line = f"{clean(lane, 19):<20}{_num(sum(row), 10)}" + "".join(_num(v, 10) for v in row)
        line += _num(held.get((lane,), 0.0), 9) if held is not None else f"{'n/a':>9}"
        line += _num(released.get((lane,), 0.0), 12) if released is not None else f"{'n/a':>12}"
        lines.append(line)
    lines.append("")

    hits = view.values("mqpolicy_limit_hits_total", "limit", "action")
    lines.append(f"{'LIMIT':<28}{'ACTION':<10}{'hits' + unit:>10}")
    for (limit, action), value in sorted(hits.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{clean(limit, 27):<28}{clean(action, 9):<10}{_num(value, 10)}")
    lines.append("")

    hold_total = f"{_num(sum(held.values()), 0)} held" if held is not None else "n/a"
    backoff = cur.total(DESTINATIONS_IN_BACKOFF)
    lines.append(f"HOLD QUEUE {hold_total} | DESTINATIONS IN BACKOFF "
                 f"{'n/a' if backoff is None else _num(backoff, 0)}")
    lines.extend(_paused_lines(cur))
    lines.extend(_section_lines(cur))
    lines.append("")

    busiest = _busiest_rows(prev, cur, view.seconds)
    if busiest is None:
        lines.append("BUSIEST KEYS n/a (no /top.json)")
    else:
        lines.append(f"{'BUSIEST KEYS (limit)':<28}{'ACTION':<10}{'hits/s':>9}{'total':>10}  KEY")
        room = len(busiest) if height is None else max(0, height - len(lines) - 1)
        for limit, action, key, total, rate in busiest[:room]:
            lines.append(f"{clean(limit, 27):<28}{clean(action, 9):<10}{_num(rate, 9)}"
                         f"{_num(total, 10)}  {clean(key)}")
        if not busiest:
            lines.append("  (no limit hit yet)")
    return lines


def _paused_lines(cur: Snapshot) -> list[str]:
    """``PAUSED destinations: a, b | lanes: c`` while something is paused."""
    parts = []
    for title, name, label in (("destinations", DESTINATION_PAUSED, "destination"),
                               ("lanes", LANE_PAUSED, "lane")):
        paused = sorted(k[0] for k, v in cur.by(name, label).items() if v >= 1)
        if paused:
            parts.append(f"{title}: {', '.join(clean(p, 40) for p in paused)}")
    return [f"PAUSED {' | '.join(parts)}"] if parts else []


def _section_lines(cur: Snapshot, rows: int = 5) -> list[str]:
    """The sections of /top.json other than the busiest keys (those a part registers with
    ``json_section``), as small tables."""
    out: list[str] = []
    for name, value in sorted((cur.sections or {}).items()):
        if name == "busiest_keys":
            continue
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            out.append(f"{clean(name, 40).upper()} ({len(value)})")
            columns = list(dict.fromkeys(k for v in value[:rows] for k in v))[:6]
            if columns:
                out.append("  " + "".join(f"{clean(c, 19):<20}" for c in columns))
            for v in value[:rows]:
                out.append("  " + "".join(f"{clean(v.get(c, ''), 19):<20}" for c in columns))
        else:
            out.append(f"{clean(name, 40).upper()} {clean(json.dumps(value), 100)}")
    return out


# ---------------------------------------------------------------- the command


def add_top_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="metrics URL (default: metrics.listen of the policy "
                        "file, e.g. http://127.0.0.1:9309/metrics)")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between refreshes (default 1)")
    parser.add_argument("--once", action="store_true",
                        help="print one snapshot (totals since start) and exit")


def metrics_url(config: str) -> str:
    """The URL of the metrics endpoint a policy file configures."""
    policy = load_policy(config, check_store_url)
    endpoint = policy.metrics.listen
    if endpoint is None:
        raise TopError(f"{config}: metrics are off (set metrics: {{listen: HOST:PORT}} "
                       "or give --url)")
    host = endpoint.host or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    netloc = f"[{host}]" if ":" in host else host
    return f"http://{netloc}:{endpoint.port}/metrics"


def run_top(args: argparse.Namespace, out: TextIO, keys: TextIO | None = None) -> int:
    """``keys``: where q is typed to quit (the terminal; None: signals only)."""
    interval: float = args.interval
    if not interval > 0:
        print("mqpolicy top: --interval must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        url: str = args.url or metrics_url(args.config)
    except ConfigError as exc:
        print(f"mqpolicy top: invalid policy file:\n{exc}", file=sys.stderr)
        return EXIT_FAILURE
    except TopError as exc:
        print(f"mqpolicy top: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.once:
        try:
            snapshot = fetch_snapshot(url)
        except TopError as exc:
            print(f"mqpolicy top: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        out.write("\n".join(render(None, snapshot, url)) + "\n")
        return EXIT_OK
    return _live(url, interval, out, keys)


class _Quit(Exception):
    """A signal asked ``top`` to quit."""


def _quit(signum: int, frame: FrameType | None) -> NoReturn:
    raise _Quit(signum)


@contextlib.contextmanager
def _quit_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM quit, whatever ``top`` inherited: a job started in the background
    by a shell (``cmd &``) has SIGINT ignored, and Python then never raises
    KeyboardInterrupt. The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; KeyboardInterrupt still quits
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _quit)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _keys_from(keys: TextIO | None) -> Iterator[int | None]:
    """The terminal's file descriptor, set to pass each key as it is typed, unechoed (Ctrl-C
    still signals); its modes are put back afterwards. None when ``keys`` is no terminal, or
    one ``top`` runs in the background of (changing its modes would stop ``top``)."""
    fd = keys.fileno() if keys is not None and keys.isatty() else -1
    try:
        saved = termios.tcgetattr(fd) if fd >= 0 and os.tcgetpgrp(fd) == os.getpgrp() else None
    except (OSError, termios.error):
        saved = None
    if saved is None:
        yield None
        return
    tty.setcbreak(fd, termios.TCSANOW)
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError, termios.error):  # a terminal hung up meanwhile
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_key(fd: int | None, until: float) -> tuple[bool, int | None]:
    """Wait until the monotonic time ``until``; (True, _) as soon as q is typed. The
    descriptor comes back None once the terminal is gone (then the wait is a sleep)."""
    while (remaining := until - time.monotonic()) > 0:
        if fd is None:
            time.sleep(remaining)
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        try:
            typed = os.read(fd, 64)
        except OSError:
            typed = b""
        if not typed:
            fd = None
        elif b"q" in typed or b"Q" in typed:
            return True, fd
    return False, fd


def _live(url: str, interval: float, out: TextIO, keys: TextIO | None) -> int:
    tty_out = out.isatty()
    prev: Snapshot | None = None
    if tty_out:
        out.write("\x1b[?25l\x1b[2J")  # hide the cursor, clear once
    try:
        with _quit_on_signals(), _keys_from(keys) as key_fd:
            while True:
                began = time.monotonic()
                size = shutil.get_terminal_size((120, 40))
                try:
                    cur = fetch_snapshot(url, timeout=max(0.5, min(interval, 5.0)))
                    lines = render(prev, cur, url, height=size.lines - 1)
                    prev = cur
                except TopError as exc:
                    lines = [f"mqpolicy top  {clean(url, 80)}  {time.strftime('%H:%M:%S')}",
                             "", f"  {clean(exc, 200)}", "  retrying..."]
                lines = [line[: size.columns] for line in lines[: size.lines - 1]]
                out.write(_HOME + "".join(line + _EOL + "\n" for line in lines) + _EOS)
                out.flush()
                typed_q, key_fd = _wait_for_key(key_fd, began + interval)
                if typed_q:
                    return EXIT_OK
    except (_Quit, KeyboardInterrupt):
        return EXIT_OK
    finally:
        if tty_out:
            out.write("\x1b[?25h\n")
            out.flush()
