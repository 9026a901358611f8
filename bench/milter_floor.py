"""The do-nothing pymilter milter ``bench/milter_bench.py`` measures mqpolicy against.

It negotiates what mqpolicy negotiates for the bench policy (connect, MAIL and headers
without replies; RCPT and end of message answered) and answers CONTINUE everywhere; in the
``header`` and ``addheader`` modes it adds one header per message at the end.

    python bench/milter_floor.py SPEC MODE

SPEC is libmilter's socket (``unix:/path``, ``inet:PORT@HOST``); MODE is ``plain``,
``header`` (on TCP it binds its socket itself with TCP_NODELAY, like mqpolicy) or
``addheader`` (one header, on libmilter's own socket). ``bench/milter_profile.py`` imports
:class:`Floor`.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import Milter

MODES = ("plain", "header", "addheader")


class Floor(Milter.Base):  # type: ignore[misc]  # pymilter is untyped
    mode = "plain"

    @Milter.noreply  # type: ignore[misc]
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    @Milter.noreply  # type: ignore[misc]
    def envfrom(self, f: str, *a: str) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def envrcpt(self, to: str, *a: str) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    @Milter.noreply  # type: ignore[misc]
    def header(self, name: str, value: str) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def eom(self) -> int:
        if self.mode != "plain":
            self.addheader("X-MQ-Lane", "normal")
        return Milter.CONTINUE  # type: ignore[no-any-return]


def main(argv: list[str]) -> None:
    spec, mode = argv
    if mode not in MODES:
        raise SystemExit(f"milter_floor: MODE is one of {', '.join(MODES)}, not {mode!r}")
    Floor.mode = mode
    if mode == "header" and spec.startswith("inet:"):
        port, host = spec[len("inet:"):].split("@")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, int(port)))
        sock.listen(128)
        spec = f"fd:{sock.detach()}"
    Milter.factory = Floor
    Milter.runmilter("floor", spec, 300, rmsock=not spec.startswith("fd:"))


if __name__ == "__main__":
    main(sys.argv[1:])
