"""drop — write one message into `queue/drop/`, durably; the queue's front door.

Everything that enters the queue comes through `Drop`: `qpy-queue-inject`, the
sendmail front ends, `qpy-smtpd` (streaming DATA straight in), forwards from
`qpy-local` and bounces from `qpy-queue-send`. The file is written under a
temporary name, its header (lengths and CRC-32, qpy.common.dropfile) written
last, renamed to its final name, then fsync'd once; only then does `commit()`
return, and only then may the caller say "queued".

One fsync, after the rename, makes both the bytes and the name durable on the
filesystems qpy supports for its queue (ext4, xfs, btrfs): the rename dirties
the file's inode (its ctime), so the file's fsync commits the journal
transaction that holds the rename. (The injecting user may not read drop/, so
it could not fsync the directory anyway.) A crash before that fsync returns was
never acknowledged, and may leave under the final name a file whose header and
envelope are on disk but part of whose body is not (cyclic writeback can put
the tail and page 0 on disk before a middle page, so the lengths match the size
and only zeros mark the hole): pickup recomputes the CRC-32 and quarantines
such a file instead of admitting it.

Failures raise InjectError carrying qmail-queue's exit code for them.
"""

from __future__ import annotations

import errno
import os
import time
import zlib

from qpy.common import dropfile, envelope
from qpy.common.durable import write_all
from qpy.common.queue import drop_dir, make_id

DROP_MODE = 0o640          # group qpyq (setgid drop/) reads it; others nothing
BUFFER_BYTES = 64 * 1024

EXIT_REFUSED = 31          # qmail-queue: message refused (too big)
EXIT_WRITE = 53            # write error (disk full)
EXIT_QUEUE = 62            # trouble making files in the queue


_last_usec = 0


def new_id() -> str:
    """A fresh message id (qpy.common.queue.make_id), increasing within this process
    even if the clock steps back."""
    global _last_usec
    _last_usec = max(time.time_ns() // 1000, _last_usec + 1)
    return make_id(_last_usec, os.getpid())


class InjectError(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


def _io_error(e: OSError, what: str) -> InjectError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return InjectError(EXIT_WRITE, "%s: %s" % (what, e.strerror))
    return InjectError(EXIT_QUEUE if what == "create" else EXIT_WRITE,
                       "%s: %s" % (what, e.strerror))


class Drop:
    """One drop file being written: write() the message, then commit() it.
    `id` is the message's id from the start (for a Received: line written first);
    commit() names the file by it."""

    def __init__(self, root: str, databytes: int = 0):
        self.id = new_id()
        self.databytes = databytes
        self.size = 0
        self._crc = 0          # CRC-32 of what was written so far
        self._buf: list[bytes] = []
        self._buffered = 0
        self._dir = drop_dir(root)
        self._tmp = "%s%s.%s" % (dropfile.TMP_PREFIX, self.id, os.urandom(4).hex())
        # drop/ is not readable by the injecting user (nobody may list it): an O_PATH
        # descriptor is enough for openat/renameat, and the directory is never fsync'd
        try:
            self._dfd = os.open(self._dir, os.O_PATH | os.O_DIRECTORY)
        except OSError as e:
            raise _io_error(e, "create")
        try:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                               DROP_MODE, dir_fd=self._dfd)
        except OSError as e:
            os.close(self._dfd)
            raise _io_error(e, "create")
        try:
            os.fchmod(self._fd, DROP_MODE)
            write_all(self._fd, dropfile.header(0, 0, 0, 0))  # filled in by commit()
        except OSError as e:
            self.abort()
            raise _io_error(e, "write")

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.databytes and self.size > self.databytes:
            raise InjectError(EXIT_REFUSED, "message larger than databytes (%d)"
                              % self.databytes)
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered >= BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf, self._buffered = [], 0
        self._crc = zlib.crc32(data, self._crc)
        try:
            write_all(self._fd, data)
        except OSError as e:
            raise _io_error(e, "write")

    def commit(self, sender: bytes, recipients: list[bytes]) -> str:
        """Append the envelope, fix the header, make it durable; returns the id (the
        final name; a fresh one only if another user's file took this one)."""
        env = envelope.encode(sender, recipients)
        try:
            envelope.decode(env)  # the queue never holds an envelope pickup would refuse
        except envelope.EnvelopeError as e:
            self.abort()
            raise InjectError(e.code, str(e))
        try:
            self._flush()
            write_all(self._fd, env)
            crc = zlib.crc32(env, self._crc)
            os.pwrite(self._fd, dropfile.header(os.getpid(), self.size, len(env), crc), 0)
            for _ in range(3):
                try:
                    os.rename(self._tmp, self.id, src_dir_fd=self._dfd,
                              dst_dir_fd=self._dfd)
                    break
                except PermissionError:   # sticky drop/: another user's file has the name
                    self.id = new_id()
            else:
                raise InjectError(EXIT_QUEUE, "create: the drop names are taken")
            self._tmp = ""
            # durable: rename, then one fsync of the file commits its bytes and the
            # rename together (the module docstring says why; pickup checks the CRC)
            os.fsync(self._fd)
        except OSError as e:
            raise _io_error(e, "write")
        finally:
            self.abort()
        return self.id

    def abort(self) -> None:
        """Forget the drop file (a no-op after commit)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp:
            try:
                os.unlink(self._tmp, dir_fd=self._dfd)
            except OSError:
                pass
            self._tmp = ""
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1


def inject(root: str, message: bytes, sender: bytes, recipients: list[bytes],
           databytes: int = 0) -> str:
    """Queue a whole message; returns its id or raises InjectError."""
    d = Drop(root, databytes)
    try:
        d.write(message)
    except BaseException:
        d.abort()
        raise
    return d.commit(sender, recipients)
