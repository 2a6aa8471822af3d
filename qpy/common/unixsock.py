"""unixsock — bind and connect UNIX sockets by a short name, whatever the root's path.

A socket's path is limited to 108 bytes (sun_path). qpy's sockets live under the root
(`queue/door/socket`, `queue/run/auth/socket`), whose path the admin chooses; so each is
reached, when its path is too long, through an O_PATH descriptor of its directory:
`/proc/self/fd/N/NAME` is short for any root, and the kernel resolves it to the same
inode as the long path. A path that fits is used as it is, so that the socket's name
(/proc/net/unix, ss, lsof) still says which root it serves; qpy-status relies on that
to tell whose qpy-authd runs.
"""

from __future__ import annotations

import os
import socket

SUN_PATH_MAX = 107          # bytes of sun_path, less its terminating NUL


class InDir:
    """A directory held by an O_PATH descriptor; name(leaf) is a socket address in it
    short enough for sun_path."""

    def __init__(self, directory: str):
        self.directory = directory
        self.fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def name(self, leaf: str) -> str:
        path = os.path.join(self.directory, leaf)
        if len(os.fsencode(path)) <= SUN_PATH_MAX:
            return path
        return "/proc/self/fd/%d/%s" % (self.fd, leaf)

    def __enter__(self) -> InDir:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def bind(directory: str, leaf: str, kind: int, mode: int) -> socket.socket:
    """A socket bound as directory/leaf (a stale socket there is replaced), mode set."""
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        with InDir(directory) as d:
            try:
                os.unlink(leaf, dir_fd=d.fd)
            except FileNotFoundError:
                pass
            sock.bind(d.name(leaf))
            os.chmod(leaf, mode, dir_fd=d.fd)     # the directory is the binder's own
    except BaseException:
        sock.close()
        raise
    return sock


def connect(directory: str, leaf: str, kind: int, timeout: float | None) -> socket.socket:
    """A socket connected to directory/leaf; OSError when nobody listens there."""
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.settimeout(timeout)
    try:
        with InDir(directory) as d:
            sock.connect(d.name(leaf))
    except BaseException:
        sock.close()
        raise
    return sock
