"""Unix socket files: taking over a path a dead process left behind, and nothing else."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat


def remove_stale_socket(path: str) -> None:
    """Unlink a unix socket left behind by a dead process; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise OSError(errno.EADDRINUSE, f"socket in use ({exc})", path) from exc
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process is listening on", path)
