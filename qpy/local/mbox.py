"""mbox — append one message to an mbox file, as mbox(5) and qmail-local.

    deliver("./Mailbox", msgfd, ufline, head)

Runs as the recipient. Opens the file for append without blocking, so a FIFO or
device never hangs a delivery, and by Postfix local(8)'s rules, for an mbox may
live in a shared sticky directory (/var/mail) where another user can plant
names: never through a symbolic link (O_NOFOLLOW, whatever the kernel's
fs.protected_symlinks says), only a regular file, owned by the recipient, with
one link (a hard link planted to the recipient's ~/.profile is refused); an
mbox that is missing is created 0600 with O_EXCL, so a name planted between
the two opens is checked like any other. A refused mbox is a temporary failure
(the caller defers with the reason): the recipient or the admin removes the
planted name and the mail is delivered; a bounce would let the planter make
the recipient's mail bounce. Locks with a dot-lock `PATH.lock` (skipped when the
directory is not writable by the user, as in a shared spool) and flock, each
waited for at most LOCK_WAIT seconds; a dot-lock older than STALE_LOCK seconds
is broken. Writes the `From ` line, `head` (Return-Path + Delivered-To), the
message with `>From ` quoting (a line that starts with any number of `>` and
then `From ` gets one more `>`), a final newline if missing and one blank line;
fsyncs. On any failure the file is truncated back to its old length and
OSError raised: the caller defers (111).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from qpy.common.durable import write_all

CHUNK = 64 * 1024
LOCK_WAIT = 30
STALE_LOCK = 300
LOCK_POLL = 0.1
FILE_MODE = 0o600


def _from(line: bytes) -> bool:
    return line.lstrip(b">").startswith(b"From ")


def quote_lines(msgfd: int, out: int) -> None:
    """Copy the message from offset 0 with >From quoting and the mbox ending."""
    carry = b""
    cont = False  # the start of the current line was already written (a very long line)
    off = 0
    buf: list[bytes] = []
    while True:
        chunk = os.pread(msgfd, CHUNK, off)
        off += len(chunk)
        if not chunk:
            if carry or cont:  # a partial last line gets its newline
                buf.append((b">" if not cont and _from(carry) else b"") + carry + b"\n")
            buf.append(b"\n")
            write_all(out, b"".join(buf))
            return
        lines = (carry + chunk).split(b"\n")
        carry = lines.pop()
        for line in lines:
            if not cont and _from(line):
                buf.append(b">")
            buf.append(line + b"\n")
            cont = False
        if len(carry) > CHUNK:  # flush a long line's head instead of copying it again and again
            if not cont and _from(carry):
                buf.append(b">")
            buf.append(carry)
            carry, cont = b"", True
        write_all(out, b"".join(buf))
        buf = []


def _dotlock(path: bytes) -> bytes | None:
    """Take PATH.lock; None when the directory does not let us (flock alone then)."""
    lock = path + b".lock"
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            try:
                if time.time() - os.lstat(lock).st_mtime > STALE_LOCK:
                    os.unlink(lock)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise OSError(errno.EAGAIN, f"mbox has been dot-locked for {LOCK_WAIT} seconds")
            time.sleep(LOCK_POLL)
            continue
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise
        os.write(fd, b"%d\n" % os.getpid())
        os.close(fd)
        return lock


def _flock(fd: int) -> None:
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise OSError(errno.EAGAIN, f"mbox has been locked for {LOCK_WAIT} seconds")
            time.sleep(LOCK_POLL)


def open_mbox(path: bytes) -> int:
    """The mbox open for append, by the rules in the module docstring; OSError with
    the reason when it is refused."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    for _ in range(3):
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            try:
                return os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
            except FileExistsError:
                continue        # made meanwhile (perhaps planted): checked as any other
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, "mbox is a symbolic link (refused)")
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            why = "mbox is not a regular file"
        elif st.st_uid != os.geteuid():
            why = "mbox is owned by uid %d, not by the recipient (refused)" % st.st_uid
        elif st.st_nlink != 1:
            why = "mbox has %d hard links (refused)" % st.st_nlink
        else:
            return fd
        os.close(fd)
        raise OSError(errno.EPERM, why)
    raise OSError(errno.EAGAIN, "mbox appears and disappears")


def deliver(path: str | bytes, msgfd: int, ufline: bytes, head: bytes) -> None:
    path = os.fsencode(path)
    fd = open_mbox(path)
    lock = None
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        lock = _dotlock(path)
        _flock(fd)
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            write_all(fd, ufline + head)
            quote_lines(msgfd, fd)
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, start)  # never leave half a message in the mbox
            raise
    finally:
        os.close(fd)  # also drops the flock
        if lock:
            try:
                os.unlink(lock)
            except OSError:
                pass
