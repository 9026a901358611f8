"""Pauses: an operator (``mqpolicy pause``) or a feedback rule stops a destination or a lane
for a while, or until resumed. Pure: no I/O, no clock (times come in as ms).

Mail for a paused destination or lane is accepted and held in the MTA with a hold record
(reason ``paused: ...``), never refused; the scheduler releases nothing of it while the
pause lasts, and everything (highest lane first, FIFO within a lane, within budgets) once
it ends, by ``mqpolicy resume`` or when its ``--for`` runs out.

A message cannot be split by mqpolicy: one with recipients at several destinations waits
while any of them is paused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mqpolicy.policy.backoff import MAX_EVIDENCE

PauseKind = Literal["destination", "lane"]
KINDS: tuple[PauseKind, ...] = ("destination", "lane")
MAX_REASON = 500
"""Reasons are cut to this many characters."""


@dataclass(frozen=True, slots=True)
class Pause:
    """One destination or lane stopped since ``since_ms``, until ``until_ms`` (None: until
    resumed). ``by``: ``operator`` or ``rule:<match>``; ``evidence``: the log line that
    made a rule pause."""

    kind: PauseKind
    name: str
    since_ms: int
    until_ms: int | None = None
    reason: str = ""
    by: str = "operator"
    evidence: str = ""

    @property
    def field(self) -> str:
        """Its name in the store: ``destination:<name>`` or ``lane:<name>``."""
        return pause_field(self.kind, self.name)

    def active(self, now_ms: int) -> bool:
        return self.until_ms is None or self.until_ms > now_ms

    def describe(self) -> str:
        """Its name and reason, as a hold's text and record say them: ``google (why)``."""
        return self.name + (f" ({self.reason})" if self.reason else "")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "since_ms": self.since_ms,
                "until_ms": self.until_ms, "reason": self.reason, "by": self.by,
                "evidence": self.evidence}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Pause:
        """A stored pause; ValueError when it is not one."""
        kind = data["kind"]
        if kind not in KINDS:
            raise ValueError(f"not a pause kind: {kind!r}")
        until = data.get("until_ms")
        return cls(kind=kind, name=str(data["name"]), since_ms=int(data["since_ms"]),
                   until_ms=None if until is None else int(until),
                   reason=str(data.get("reason", ""))[:MAX_REASON],
                   by=str(data.get("by", "operator")),
                   evidence=str(data.get("evidence", ""))[:MAX_EVIDENCE])


def pause_field(kind: str, name: str) -> str:
    return f"{kind}:{name}"


def new_pause(kind: PauseKind, name: str, now_ms: int, for_ms: int | None = None,
              reason: str = "", by: str = "operator", evidence: str = "") -> Pause:
    """A pause starting now, for ``for_ms`` (None: until resumed)."""
    return Pause(kind, name, now_ms, None if for_ms is None else now_ms + for_ms,
                 one_line(reason)[:MAX_REASON], by, evidence[:MAX_EVIDENCE])


def one_line(text: str) -> str:
    """``text`` on one line, as Postfix's HOLD text and the logs need it."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def active_pauses(pauses: Iterable[Pause], now_ms: int
                  ) -> tuple[dict[str, str], dict[str, str]]:
    """(paused lanes, paused destinations), each name -> what a hold says of it."""
    lanes: dict[str, str] = {}
    destinations: dict[str, str] = {}
    for pause in pauses:
        if pause.active(now_ms):
            (lanes if pause.kind == "lane" else destinations)[pause.name] = pause.describe()
    return lanes, destinations


def pause_target_problem(kind: str, name: str, lanes: Iterable[str],
                         destinations: Iterable[str]) -> str | None:
    """Why ``kind name`` cannot be paused (None: it can). A lane must be configured; a
    destination is a configured one's name or a recipient domain (its own destination)."""
    if kind == "lane":
        names = list(lanes)
        if name not in names:
            return f"no lane named {name!r} (lanes: {', '.join(names)})"
        return None
    if kind != "destination":
        return f"pause what: destination or lane, not {kind!r}"
    names = list(destinations)
    if name in names or ("." in name and name == name.lower().rstrip(".")
                         and all(part for part in name.split("."))):
        return None
    return (f"no destination named {name!r} (destinations: {', '.join(names) or 'none'}; "
            "or a recipient domain in lower case, e.g. example.com)")
