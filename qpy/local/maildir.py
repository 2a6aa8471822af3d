"""maildir — deliver one message into a Maildir, as maildir(5).

    deliver("./Maildir/", msgfd, head, queue_dev)

Runs as the recipient, in the recipient's home. The file is created in `tmp/`
under a unique name (`SECONDS.MUSECPPID_COUNT.HOST`, `/` and `:` in the host
escaped), written as `head` (Return-Path + Delivered-To) followed by the
message (the head with the first piece, in one write), fsync'd and closed;
then moved into `new/` (the delivery instant) by one renameat2(2) with
RENAME_NOREPLACE, which never replaces a file there, or, where the filesystem
has no such rename, by qmail's link into `new/` and unlink of the tmp name; then
`new/` is fsync'd. Any failure (not a directory, no
`tmp/`, disk full, quota) removes the tmp file and raises OSError: the caller
defers (111), so nothing is lost and nothing is half-delivered in `new/`.

A Maildir may be named in a directory other users can write, so its
directories are checked as mbox files are (qpy.local.mbox): `tmp/` and `new/`
are opened without following a symbolic link, the Maildir itself through one
only when that link is the recipient's own, and all three must be owned by the
recipient; else the delivery is refused with the reason (a temporary failure:
nothing goes into a directory another user planted and can read). The Maildir
is opened without following a link first; only when that fails is it looked at
(lstat), so the usual delivery costs no extra call. The pid and euid are looked
up once per process, the host name once.

The fsync of `new/` is skipped when `new/` is on the queue's own filesystem
(device `queue_dev`): the queue forgets the message only by later unlinks on
that filesystem, and its journal (ext4, xfs, btrfs: the filesystems qpy
supports for its queue) makes metadata changes durable in the order they were
made, so no crash can keep the queue's unlink and lose the move into `new/`.
The worst a crash can do is lose both: the message is delivered again. On
another filesystem nothing orders the two, so `new/` is fsync'd; so it is on an
ext4 without a journal (made with `-O ^has_journal`, as some cloud images' root
filesystems are), which writes directory blocks back in no particular order:
qpy-lspawn passes queue_dev -1 there (qpy.common.durable.orders_metadata).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import stat
import time

from qpy.common.durable import rename_noreplace, write_all

CHUNK = 64 * 1024
MAX_TRIES = 10
FILE_MODE = 0o600

_count = itertools.count()
_hostname: str | None = None
_me: tuple[int, int] | None = None       # (pid, euid) of this process, looked up once


def _forget() -> None:
    global _me
    _me = None


os.register_at_fork(after_in_child=_forget)


def _ids() -> tuple[int, int]:
    """(pid, euid), looked up once per process: a delivery worker changes uid only
    before its first delivery and never forks a Python child that delivers; a fork
    forgets them."""
    global _me
    if _me is None:
        _me = (os.getpid(), os.geteuid())
    return _me


def _host() -> str:
    """The host part of new names, looked up once per process (a delivery worker lives
    for seconds to minutes; uname per delivery bought nothing)."""
    global _hostname
    if _hostname is None:
        _hostname = socket.gethostname()[:64].replace("/", "\\057").replace(":", "\\072")
    return _hostname


def unique_name() -> str:
    now = time.time_ns()
    return f"{now // 10**9}.M{now // 1000 % 10**6:06d}P{_ids()[0]}_{next(_count)}.{_host()}"


def copy_message(src: int, dst: int, head: bytes) -> None:
    """Write head, then the whole message read from src (by offset, from 0); the head
    goes out with the first piece (one write for a message under CHUNK bytes)."""
    off = 0
    while True:
        chunk = os.pread(src, CHUNK, off)
        off += len(chunk)
        if head:
            chunk, head = head + chunk, b""
        if not chunk:
            return
        write_all(dst, chunk)


def deliver(path: str | bytes, msgfd: int, head: bytes, queue_dev: int = -1) -> str:
    """Deliver into Maildir `path`; returns the new file's name. Raises OSError.
    queue_dev: the queue's st_dev (-1: unknown, always fsync `new/`)."""
    path = os.fsencode(path).rstrip(b"/") or b"/"   # a trailing / would follow a link
    dfd = _open_maildir(path)
    try:
        tmpfd = _open_dir(b"tmp", dfd, os.O_NOFOLLOW)[0]
        try:
            newfd, newdev = _open_dir(b"new", dfd, os.O_NOFOLLOW)
            try:
                return _deliver(tmpfd, newfd, msgfd, head, newdev != queue_dev)
            finally:
                os.close(newfd)
        finally:
            os.close(tmpfd)
    finally:
        os.close(dfd)


def _open_maildir(path: bytes) -> int:
    """The Maildir itself: through a symbolic link only when the link is the
    recipient's own. Opened without following one first, so the common case (no
    link) costs no lstat."""
    try:
        return _open_dir(path, None, os.O_NOFOLLOW)[0]
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR) or not os.path.islink(path):
            raise
    owner = os.lstat(path).st_uid
    if owner != _ids()[1]:
        raise OSError(errno.EPERM, "maildir is a symbolic link of uid %d, not of the "
                      "recipient (refused)" % owner)
    return _open_dir(path, None)[0]


def _open_dir(name: bytes, dfd: int | None, flags: int = 0) -> tuple[int, int]:
    """A directory of the Maildir and its st_dev, refused unless the recipient owns it."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | flags, dir_fd=dfd)
    except OSError as e:
        # O_DIRECTORY|O_NOFOLLOW on a link fails with ENOTDIR (or ELOOP): say which
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and flags & os.O_NOFOLLOW and \
                dfd is not None and stat.S_ISLNK(os.lstat(name, dir_fd=dfd).st_mode):
            raise OSError(errno.ELOOP, "maildir %s is a symbolic link (refused)"
                          % os.fsdecode(name))
        raise
    st = os.fstat(fd)
    if st.st_uid != _ids()[1]:
        os.close(fd)
        raise OSError(errno.EPERM, "maildir %s is owned by uid %d, not by the recipient "
                      "(refused)" % (os.fsdecode(name), st.st_uid))
    return fd, st.st_dev


def _deliver(tmpfd: int, newfd: int, msgfd: int, head: bytes, sync_new: bool) -> str:
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
        # durable: the file is fsync'd in tmp/; its move into new/ is the delivery
        # (one rename that never replaces, else a link and an unlink), then new/ is
        # fsync'd unless the queue's filesystem orders it (module docstring)
        moved = rename_noreplace(name, name, tmpfd, newfd)
        if not moved:
            os.link(name, name, src_dir_fd=tmpfd, dst_dir_fd=newfd, follow_symlinks=False)
    except BaseException:
        try:
            os.unlink(name, dir_fd=tmpfd)
        except OSError:
            pass
        raise
    if not moved:
        try:
            os.unlink(name, dir_fd=tmpfd)
        except OSError:
            pass  # a leftover in tmp/ is harmless: readers clean tmp/ after 36 hours
    if sync_new:
        os.fsync(newfd)
    return name
