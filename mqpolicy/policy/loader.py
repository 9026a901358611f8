"""Reading the YAML policy: loaded with ``yaml.safe_load`` semantics, validated, built into
the frozen :class:`~mqpolicy.policy.model.Policy`.

Every problem is collected with its file and line; :class:`ConfigError` lists them all.
Rates, CIDRs, regexes and message templates are compiled here, once, so that no
decision repeats work that the load could do.

``store.url`` is parsed by the store's own parser, which the caller passes in
(:func:`mqpolicy.store.urls.check_store_url`): the policy language knows no store family,
and what serve would refuse to open, ``check`` refuses with the line.

Here: the file read and parsed, and the top-level assembly (defaults, what one section
says about another). The YAML keeps its lines in :mod:`mqpolicy.policy.yaml_lines`; the
reader and the single values are :mod:`mqpolicy.policy.value_readers`; the sections,
:mod:`mqpolicy.policy.settings_readers` and :mod:`mqpolicy.policy.rule_readers`.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import yaml

from mqpolicy.policy.model import DEFAULT_LISTEN_MODE, Destination, Policy
from mqpolicy.policy.rule_readers import (
    read_classify,
    read_destinations,
    read_lanes,
    read_limits,
    unknown_lane,
)
from mqpolicy.policy.settings_readers import (
    read_admin,
    read_dns,
    read_feedback,
    read_listen,
    read_log,
    read_messages,
    read_metrics,
    read_milter,
    read_scheduler,
    read_server,
    read_store,
)
from mqpolicy.policy.value_readers import ConfigIssue, Reader, StoreUrlCheck, file_mode
from mqpolicy.policy.yaml_lines import LineLoader, YamlAliasError

#: The largest policy file read (1 MiB): a large policy is a few dozen kilobytes, and the
#: YAML parser takes seconds per MiB; anything past this is refused unread.
MAX_POLICY_BYTES = 1024 * 1024

#: How often a file that changes while it is read is read again before giving up.
READ_ATTEMPTS = 5


class ConfigError(Exception):
    """The policy file is not valid. ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


_TOP_KEYS = {
    "listen",
    "listen_mode",
    "server",
    "store",
    "log",
    "metrics",
    "admin",
    "milter",
    "scheduler",
    "destinations",
    "dns",
    "feedback",
    "lanes",
    "default_lane",
    "classify",
    "limits",
    "messages",
}


def load_policy(path: str | Path, check_store_url: StoreUrlCheck) -> Policy:
    """Read and validate a policy file; raise :class:`ConfigError` listing every problem,
    ``store.url`` parsed by ``check_store_url``. The file is read once
    (:func:`read_policy_file`) and those bytes are parsed: a file replaced or rewritten
    while it is read never mixes two versions."""
    source = str(path)
    data = read_policy_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(source, 0, "", "not UTF-8 text")]) from None
    return parse_policy(text, source, check_store_url)


def read_policy_file(path: str | Path) -> bytes:
    """The bytes of one version of the policy file, read through one open descriptor: the
    size, times and inode before the read and after it must agree, else it is read again
    (up to :data:`READ_ATTEMPTS` times) and finally refused. A file moved into place with
    ``mv`` (a rename) is read whole, old or new; one written in place is read when it
    stays still. Larger than :data:`MAX_POLICY_BYTES`: refused."""
    source = str(path)

    def refused(why: str) -> ConfigError:
        return ConfigError([ConfigIssue(source, 0, "", why)])

    for attempt in range(READ_ATTEMPTS):
        if attempt:
            time.sleep(0.02 * attempt)  # let the writer finish
        try:
            with open(path, "rb") as file:  # one descriptor: read and fstat the same file
                before = os.fstat(file.fileno())
                if stat.S_ISREG(before.st_mode) and before.st_size > MAX_POLICY_BYTES:
                    raise refused(_too_large(before.st_size))
                data = file.read(MAX_POLICY_BYTES + 1)
                after = os.fstat(file.fileno())
        except OSError as exc:
            raise refused(f"cannot read: {exc.strerror or exc}") from None
        if len(data) > MAX_POLICY_BYTES:
            raise refused(_too_large(len(data)))
        if not stat.S_ISREG(after.st_mode):  # a pipe or a device: no versions to compare
            return data
        if _version(before) == _version(after) and len(data) == after.st_size:
            return data
    raise refused(f"the file changed while it was read ({READ_ATTEMPTS} times): write the "
                  "new version beside it and mv it into place")


def _too_large(size: int) -> str:
    return (f"the file is too large ({size} bytes; a policy file may have at most "
            f"{MAX_POLICY_BYTES} bytes, 1 MiB)")


def _version(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is written: its identity, size and times."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


#: Why an empty policy is refused rather than taken as every default.
EMPTY_POLICY = ("the policy is empty (no YAML in it: blank or only comments); a policy with no "
                "lanes and no limits would let all mail pass. Write {} to run on every "
                "default on purpose")


def parse_policy(text: str, source: str = "<string>",
                 check_store_url: StoreUrlCheck | None = None) -> Policy:
    """A policy from its YAML text (``source`` names it in the issues). Without
    ``check_store_url``, ``store.url`` is taken as written: for policies made in code, whose
    store is opened by the caller. Text without YAML (empty, blank, only comments) is
    refused: a truncated file must never empty the policy; ``{}`` is every default."""
    if not text.strip():  # blank: tabs included, which YAML would call a syntax error
        raise ConfigError([ConfigIssue(source, 0, "", EMPTY_POLICY)])
    try:
        data = yaml.load(text, Loader=LineLoader)  # noqa: S506 - a SafeLoader subclass
    except YamlAliasError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        raise ConfigError([ConfigIssue(source, line, "", f"YAML: {exc.problem}")]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError([ConfigIssue(source, line, "", f"YAML syntax: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(source, 0, "", f"YAML: {exc}")]) from None
    except RecursionError:
        raise ConfigError([ConfigIssue(source, 0, "", "YAML: nested too deeply")]) from None
    except ValueError as exc:  # a value YAML cannot hold, e.g. an integer of 5,000 digits
        raise ConfigError([ConfigIssue(source, 0, "", f"YAML: {exc}")]) from None
    if data is None:
        raise ConfigError([ConfigIssue(source, 0, "", EMPTY_POLICY)])
    reader = Reader(source, check_store_url)
    policy = _read_policy(reader, data)
    if reader.issues or policy is None:
        raise ConfigError(reader.issues)
    return policy


def _read_policy(r: Reader, data: Any) -> Policy | None:
    top = r.mapping(data, None, "", _TOP_KEYS)
    if top is None:
        return None
    defaults = Policy()

    mode = r.optional(top, "listen_mode", "", file_mode)
    listen_mode = DEFAULT_LISTEN_MODE if mode is None else mode  # "0000" is a mode too
    listen = defaults.listen
    if "listen" in top:
        listen = tuple(read_listen(r, top, listen_mode))

    server = read_server(r, top) if "server" in top else defaults.server
    store = read_store(r, top) if "store" in top else defaults.store
    if server.reuse_port and store.url.startswith("memory:"):
        r.error(top["server"], "reuse_port", "server.reuse_port",
                "several processes need a shared store (redis://...): with memory:// each "
                "would count its own budgets")
    log = read_log(r, top) if "log" in top else defaults.log
    metrics = read_metrics(r, top) if "metrics" in top else defaults.metrics
    admin = read_admin(r, top) if "admin" in top else None
    if admin is not None and server.reuse_port:
        r.error(top["admin"], "listen", "admin.listen",
                "several processes (server.reuse_port) cannot share one admin socket; they "
                "share a redis:// store, which the commands read themselves")
    messages = read_messages(r, top) if "messages" in top else defaults.messages

    lanes = tuple(read_lanes(r, top)) if "lanes" in top else defaults.lanes
    lane_names = {lane.name for lane in lanes}
    default_lane = defaults.default_lane
    if "default_lane" in top:
        default_lane = top["default_lane"]
        if default_lane not in lane_names:
            r.error(top, "default_lane", "default_lane", unknown_lane(default_lane, lane_names))
    elif len(lanes) == 1:
        default_lane = lanes[0].name
    elif lanes and default_lane not in lane_names:
        r.error(top, "lanes", "default_lane", "set default_lane: the lane of unmatched mail")

    milter = read_milter(r, top, store) if "milter" in top else None
    scheduler = read_scheduler(r, top) if "scheduler" in top else None
    classify = tuple(read_classify(r, top, lane_names)) if "classify" in top else ()
    limits = tuple(read_limits(r, top, lane_names, store)) if "limits" in top else ()
    destinations: tuple[Destination, ...] = ()
    if "destinations" in top:
        pairs = list(read_destinations(r, top, lane_names, store, {x.name for x in limits}))
        destinations = tuple(d for d, _ in pairs)
        limits = limits + tuple(limit for _, limit in pairs)
    dns_settings = read_dns(r, top) if "dns" in top else defaults.dns
    feedback = read_feedback(r, top) if "feedback" in top else None
    return Policy(
        source=r.source,
        listen=listen,
        server=server,
        store=store,
        log=log,
        metrics=metrics,
        admin=admin,
        milter=milter,
        scheduler=scheduler,
        destinations=destinations,
        dns=dns_settings,
        feedback=feedback,
        lanes=lanes,
        default_lane=default_lane,
        classify=classify,
        limits=limits,
        messages=messages,
        condition_keys=r.condition_keys,
        header_names=r.header_names,
    )
