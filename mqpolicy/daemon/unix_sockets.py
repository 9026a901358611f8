"""Unix socket files: binding one (taking over a path a dead process left behind, nothing
else), and removing it later only while it is still ours."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from typing import NamedTuple


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


class OwnedSocket(NamedTuple):
    """A socket file this process made: its path and the inode it had."""

    path: str
    dev: int
    ino: int

    def remove(self) -> None:
        """Unlink the file if it is still ours: a successor may already have replaced it."""
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == (self.dev, self.ino):
                os.unlink(self.path)


def bind_unix(path: str, mode: int) -> tuple[socket.socket, OwnedSocket]:
    """A unix stream socket bound to ``path`` with file mode ``mode``, not listening yet:
    the mode is set before ``listen()``, so nobody connects with the umask's permissions
    meanwhile. A stale socket file is taken over (:func:`remove_stale_socket`)."""
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        st = os.stat(path)
    except BaseException:
        sock.close()
        raise
    return sock, OwnedSocket(path, st.st_dev, st.st_ino)
