"""maildir — deliver one message into a Maildir, as maildir(5).

    deliver("./Maildir/", msgfd, head, queue_dev)

Runs as the recipient, in the recipient's home. The file is created in `tmp/`
under a unique name (`SECONDS.MUSECPPID_COUNT.HOST`, `/` and `:` in the host
escaped), written as `head` (Return-Path + Delivered-To) followed by the
message, fsync'd and closed; then linked into `new/` (the delivery instant),
the tmp name removed and `new/` fsync'd. Any failure (not a directory, no
`tmp/`, disk full, quota) removes the tmp file and raises OSError: the caller
defers (111), so nothing is lost and nothing is half-delivered in `new/`.

The fsync of `new/` is skipped when `new/` is on the queue's own filesystem
(device `queue_dev`): the queue forgets the message only by later unlinks on
that filesystem, and its journal (ext4, xfs, btrfs: the filesystems qpy
supports for its queue) makes metadata changes durable in the order they were
made, so no crash can keep the queue's unlink and lose the link into `new/`.
The worst a crash can do is lose both: the message is delivered again. On
another filesystem nothing orders the two, so `new/` is fsync'd.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time

from qpy.common.durable import write_all

CHUNK = 64 * 1024
MAX_TRIES = 10
FILE_MODE = 0o600

_count = itertools.count()
_hostname: str | None = None


def _host() -> str:
    """The host part of new names, looked up once per process (a delivery worker lives
    for seconds to minutes; uname per delivery bought nothing)."""
    global _hostname
    if _hostname is None:
        _hostname = socket.gethostname()[:64].replace("/", "\\057").replace(":", "\\072")
    return _hostname


def unique_name() -> str:
    now = time.time_ns()
    return f"{now // 10**9}.M{now // 1000 % 10**6:06d}P{os.getpid()}_{next(_count)}.{_host()}"


def copy_message(src: int, dst: int, head: bytes) -> None:
    """Write head, then the whole message read from src (by offset, from 0)."""
    write_all(dst, head)
    off = 0
    while True:
        chunk = os.pread(src, CHUNK, off)
        if not chunk:
            return
        write_all(dst, chunk)
        off += len(chunk)


def deliver(path: str | bytes, msgfd: int, head: bytes, queue_dev: int = -1) -> str:
    """Deliver into Maildir `path`; returns the new file's name. Raises OSError.
    queue_dev: the queue's st_dev (-1: unknown, always fsync `new/`)."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        tmpfd = os.open("tmp", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
        try:
            newfd = os.open("new", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
            try:
                return _deliver(tmpfd, newfd, msgfd, head, queue_dev)
            finally:
                os.close(newfd)
        finally:
            os.close(tmpfd)
    finally:
        os.close(dfd)


def _deliver(tmpfd: int, newfd: int, msgfd: int, head: bytes, queue_dev: int) -> str:
    for _ in range(MAX_TRIES):
        name = unique_name()
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         FILE_MODE, dir_fd=tmpfd)
            break
        except FileExistsError:
            continue
    else:
        raise OSError(errno.EEXIST, "cannot make a unique name in tmp/")
    try:
        try:
            copy_message(msgfd, fd, head)
            os.fsync(fd)
        finally:
            os.close(fd)  # checked: NFS reports write errors here
        # durable: the file is fsync'd in tmp/; link into new/ is the delivery, then new/
        # is fsync'd unless the queue's filesystem orders it (module docstring)
        os.link(name, name, src_dir_fd=tmpfd, dst_dir_fd=newfd, follow_symlinks=False)
    except BaseException:
        try:
            os.unlink(name, dir_fd=tmpfd)
        except OSError:
            pass
        raise
    try:
        os.unlink(name, dir_fd=tmpfd)
    except OSError:
        pass  # a leftover in tmp/ is harmless: readers clean tmp/ after 36 hours
    if os.fstat(newfd).st_dev != queue_dev:
        os.fsync(newfd)
    return name
