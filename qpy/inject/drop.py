"""drop — write one message into `queue/drop/`, durably; the queue's front door.

Everything that enters the queue comes through `Drop`: `qpy-queue-inject`, the
sendmail front ends, `qpy-smtpd` (streaming DATA straight in), forwards from
`qpy-local` and bounces from `qpy-queue-send`. The file is written under a
temporary name, fsync'd, renamed to its final name and the directory fsync'd;
only then does `commit()` return, and only then may the caller say "queued".

Why the fsync before the rename stays (issue 7 weighed dropping it): without it a
crash before the acknowledgement can leave a file under its final name whose
header and envelope are on disk but part of whose body is not. The body is
written in chunks that end inside a page; a page written back early and then
appended to is dirty again, and cyclic writeback can put the tail, the size and
page 0 (the header) on disk before it. The lengths then match the size, the
envelope parses, and pickup would admit a copy with a run of zeros. A checksum in
the drop header, checked by pickup, would let the first fsync go.

Failures raise InjectError carrying qmail-queue's exit code for them.
"""

from __future__ import annotations

import errno
import os
import time

from qpy.common import dropfile, envelope
from qpy.common.durable import write_all
from qpy.common.queue import Paths

DROP_MODE = 0o640          # group qpyq (setgid drop/) reads it; others nothing
BUFFER_BYTES = 64 * 1024

EXIT_REFUSED = 31          # qmail-queue: message refused (too big)
EXIT_WRITE = 53            # write error (disk full)
EXIT_QUEUE = 62            # trouble making files in the queue


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
    """One drop file being written: write() the message, then commit() it."""

    def __init__(self, root: str, databytes: int = 0):
        self.databytes = databytes
        self.size = 0
        self._buf: list[bytes] = []
        self._buffered = 0
        self._dir = Paths(root).drop
        self._tmp = "%s%d.%d.%s" % (dropfile.TMP_PREFIX, time.time_ns(), os.getpid(),
                                     os.urandom(4).hex())
        # drop/ is not readable by the injecting user (nobody may list it), so a
        # plain user gets an O_PATH descriptor: enough for openat/renameat, but
        # not for fsync of the directory (see commit()).
        self._dir_readable = True
        try:
            self._dfd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        except PermissionError:
            self._dir_readable = False
            try:
                self._dfd = os.open(self._dir, os.O_PATH | os.O_DIRECTORY)
            except OSError as e:
                raise _io_error(e, "create")
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
            write_all(self._fd, dropfile.header(0, 0, 0))
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
        try:
            write_all(self._fd, data)
        except OSError as e:
            raise _io_error(e, "write")

    def commit(self, sender: bytes, recipients: list[bytes]) -> str:
        """Append the envelope, fix the header, make it durable; returns the final name."""
        env = envelope.encode(sender, recipients)
        try:
            envelope.decode(env)  # the queue never holds an envelope pickup would refuse
        except envelope.EnvelopeError as e:
            self.abort()
            raise InjectError(e.code, str(e))
        try:
            self._flush()
            write_all(self._fd, env)
            os.pwrite(self._fd, dropfile.header(os.getpid(), self.size, len(env)), 0)
            # durable: fsync the file, rename to the final name, fsync the directory
            os.fsync(self._fd)
            ino = os.fstat(self._fd).st_ino
            final = "%d.%d.%d" % (ino, time.time_ns(), os.getpid())
            os.rename(self._tmp, final, src_dir_fd=self._dfd, dst_dir_fd=self._dfd)
            self._tmp = ""
            if self._dir_readable:
                os.fsync(self._dfd)
            else:
                # A user who may not read drop/ cannot fsync it. The rename changed
                # the file's inode (ctime), so fsync of the file commits the journal
                # transaction holding the rename (ext4, xfs, btrfs all do).
                os.fsync(self._fd)
        except OSError as e:
            raise _io_error(e, "write")
        finally:
            self.abort()
        return final

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
    """Queue a whole message; returns the drop name or raises InjectError."""
    d = Drop(root, databytes)
    try:
        d.write(message)
    except BaseException:
        d.abort()
        raise
    return d.commit(sender, recipients)
