"""maildir — deliver one message into a Maildir, as maildir(5).

    deliver("./Maildir/", msgfd, head, queue_dev)

Runs as the recipient, in the recipient's home. The file is created in `tmp/`
under a unique name (`SECONDS.MUSECPPID_COUNT.HOST`, `/` and `:` in the host
escaped), written as `head` (Return-Path + Delivered-To) followed by the
message, fsync'd and closed; then linked into `new/` (the delivery instant),
the tmp name removed and `new/` fsync'd. Any failure (not a directory, no
`tmp/`, disk full, quota) removes the tmp file and raises OSError: the caller
defers (111), so nothing is lost and nothing is half-delivered in `new/`.

A Maildir may be named in a directory other users can write, so its
directories are checked as mbox files are (qpy.local.mbox): `tmp/` and `new/`
are opened without following a symbolic link, the Maildir itself through one
only when that link is the recipient's own, and all three must be owned by the
recipient; else the delivery is refused with the reason (a temporary failure:
nothing goes into a directory another user planted and can read).

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
import stat
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
    path = os.fsencode(path).rstrip(b"/") or b"/"   # a trailing / would follow a link
    if os.path.islink(path) and os.lstat(path).st_uid != os.geteuid():
        raise OSError(errno.EPERM, "maildir is a symbolic link of uid %d, not of the "
                      "recipient (refused)" % os.lstat(path).st_uid)
    dfd = _open_dir(path, None)
    try:
        tmpfd = _open_dir(b"tmp", dfd, os.O_NOFOLLOW)
        try:
            newfd = _open_dir(b"new", dfd, os.O_NOFOLLOW)
            try:
                return _deliver(tmpfd, newfd, msgfd, head, queue_dev)
            finally:
                os.close(newfd)
        finally:
            os.close(tmpfd)
    finally:
        os.close(dfd)


def _open_dir(name: bytes, dfd: int | None, flags: int = 0) -> int:
    """A directory of the Maildir, refused unless the recipient owns it."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | flags, dir_fd=dfd)
    except OSError as e:
        # O_DIRECTORY|O_NOFOLLOW on a link fails with ENOTDIR (or ELOOP): say which
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and flags & os.O_NOFOLLOW and \
                stat.S_ISLNK(os.lstat(name, dir_fd=dfd).st_mode):
            raise OSError(errno.ELOOP, "maildir %s is a symbolic link (refused)"
                          % os.fsdecode(name))
        raise
    owner = os.fstat(fd).st_uid
    if owner != os.geteuid():
        os.close(fd)
        raise OSError(errno.EPERM, "maildir %s is owned by uid %d, not by the recipient "
                      "(refused)" % (os.fsdecode(name), owner))
    return fd


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
