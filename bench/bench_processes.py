"""What every bench script shares: the processes it starts, each stopped by its PID, also
when the script is interrupted: SIGTERM (``timeout``, ``kill PID``) unwinds like Ctrl-C, so
the ``finally`` blocks run; and the CPU time they spend.

Only the standard library at import (``bench/policy_load.py``, which needs only that, is run
where mqpolicy is not installed); :func:`wait_accepting` imports mqpolicy's helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Raise KeyboardInterrupt on SIGTERM inside the block."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_queue_seconds(pid: int) -> float:
    """Seconds the threads of ``pid`` spent runnable but waiting for a CPU (the run delay of
    ``/proc/PID/task/*/schedstat``; 0 if gone). On a saturated machine, what a process
    that must answer at once loses to the others before it runs at all. Only the threads
    alive now count (a long-lived server's are), not its child processes; on a kernel
    without schedstat it reads 0."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its descendants, from /proc (0 if gone).

    Reads only the process tree (``/proc/PID/task/*/children``), so it is cheap enough to
    call from the load loop.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / tick
        for task in tasks:
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
            except OSError:
                continue
    return total


def _stat_fields(path: str) -> list[str]:
    """The fields of a ``/proc/.../stat`` file after the command name (state first)."""
    with open(path) as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2 :].split()


def reaped_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of the children ``pid`` has waited for (``cutime`` +
    ``cstime``; 0 if gone): with :func:`cpu_seconds`, all the time of a master that
    starts and reaps workers (Postfix's master: smtpd and cleanup exit after max_use)."""
    try:
        fields = _stat_fields(f"/proc/{pid}/stat")
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def main_thread_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of the main thread of ``pid`` alone (0 if gone): in ``mqpolicy
    serve``, the event loop (the policy server); its other threads are libmilter's (the
    milter's callbacks) and the log writer."""
    try:
        fields = _stat_fields(f"/proc/{pid}/task/{pid}/stat")
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM by PID, wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path  # its stdout and stderr


class Processes:
    """Everything a run started, each with its log in ``workdir``, stopped in reverse order
    by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Started] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Started:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=cwd,
            )
        started = Started(name, proc, log)
        self.started.append(started)
        return started

    def stop(self, started: Started) -> None:
        stop(started.proc)
        if started in self.started:
            self.started.remove(started)

    def stop_all(self) -> None:
        for started in reversed(self.started):
            stop(started.proc)
        self.started.clear()


def wait_accepting(started: Started, address: str | tuple[str, int],
                   timeout: float = 30.0) -> None:
    """Poll a connect to ``address`` (a unix socket path, or (host, port)) until it succeeds;
    RuntimeError with the end of its log if the process exits first or the time runs out."""
    from mqpolicy.lab.readiness import accepts, log_tail, poll  # noqa: PLC0415
    from mqpolicy.policy.endpoints import Endpoint  # noqa: PLC0415 (see the module's docstring)

    endpoint = (Endpoint(path=address) if isinstance(address, str)
                else Endpoint(host=address[0], port=address[1]))

    def ready() -> bool:
        if started.proc.poll() is not None:
            raise RuntimeError(f"{started.name} exited with {started.proc.returncode}:\n"
                               f"{log_tail(started.log, 20)}")
        return accepts(endpoint)

    try:
        poll(ready, timeout, f"{started.name} accepting on {address!r}", interval_s=0.01)
    except TimeoutError as exc:
        raise RuntimeError(f"{exc}:\n{log_tail(started.log, 20)}") from None
