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
such a file instead of admitting it. When that fsync fails the final name is
removed again (its header spoiled first), so that the retry the caller makes after
exit 53 is not a duplicate; a pickup that read the whole file in the moment between
the rename and the unlink is the one window left.

With door=True (qpy-smtpd) the message is written into a memfd instead, sealed,
and handed to qpy-pickup over its door (qpy.common.door): pickup copies it into
the queue and makes it durable, and `commit()` returns the id
pickup admitted it under (its own if the proposed one was taken). No drop
file is made and nothing is fsync'd here; the envelope is checked by pickup, before it
answers, not here as well; the memfd stays open until the caller's abort() (after its
reply: the last close frees the message's pages). A message past MEMORY_MAX, or one whose
door is shut (pickup not running), moves to a drop file as above: memory stays
bounded and mail is still accepted while pickup is down.

Failures raise InjectError carrying qmail-queue's exit code for them.
"""

# (no __future__ import: the front ends load this module on every run; docs/queue.md)

import fcntl
import posix
import time
import zlib

from qpy.common import dropfile, envelope
from qpy.common.durable import write_all
from qpy.common.exits import EXIT_QUEUE, EXIT_REFUSED, EXIT_WRITE
from qpy.common.queue import drop_dir, is_id, make_id

DROP_MODE = 0o640          # group qpyq (setgid drop/) reads it; others nothing
BUFFER_BYTES = 64 * 1024
MEMORY_MAX = 4 << 20       # a larger message goes to drop/: a session's memory stays bounded
ANSWER_TIMEOUT = 300.0     # pickup answers after its next sync; this bounds a hung pickup
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL



_last_usec = 0


def new_id() -> str:
    """A fresh message id (qpy.common.queue.make_id), increasing within this process
    even if the clock steps back."""
    global _last_usec
    _last_usec = max(time.time_ns() // 1000, _last_usec + 1)
    return make_id(_last_usec, posix.getpid())


class InjectError(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


def _io_error(e: OSError, what: str) -> InjectError:
    import errno  # only on failure
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return InjectError(EXIT_WRITE, "%s: %s" % (what, e.strerror))
    return InjectError(EXIT_QUEUE if what == "create" else EXIT_WRITE,
                       "%s: %s" % (what, e.strerror))


class Drop:
    """One drop file being written: write() the message, then commit() it.
    `id` is the message's id from the start (for a Received: line written first);
    commit() names the file by it."""

    def __init__(self, root: str, databytes: int = 0, door: bool = False):
        self.id = new_id()
        self.databytes = databytes
        self.size = 0
        self._crc = 0          # CRC-32 of what was written so far
        self._buf: list[bytes] = []
        self._buffered = 0
        self._root = root
        self._tmp = ""
        self._dfd = -1
        self._memory = door
        self._held = False     # committed through the door; abort() closes the memfd
        # a memfd gets its header with its first write: a message that commit() finds
        # all in _buf goes in with header and envelope in one write
        self._fresh = door
        if door:
            self._fd = posix.memfd_create("qpy-message",
                                          posix.MFD_CLOEXEC | posix.MFD_ALLOW_SEALING)
            return
        self._fd = self._create()
        try:
            write_all(self._fd, dropfile.header(0, 0, 0, 0))  # filled in by commit()
        except OSError as e:
            self.abort()
            raise _io_error(e, "write")

    def _create(self) -> int:
        """The drop file under its temporary name; its descriptor."""
        tmp = "%s%s.%s" % (dropfile.TMP_PREFIX, self.id, posix.urandom(4).hex())
        # drop/ is not readable by the injecting user (nobody may list it): an O_PATH
        # descriptor is enough for openat/renameat, and the directory is never fsync'd
        try:
            self._dfd = posix.open(drop_dir(self._root), posix.O_PATH | posix.O_DIRECTORY)
            fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_NOFOLLOW,
                            DROP_MODE, dir_fd=self._dfd)
        except OSError as e:
            raise _io_error(e, "create")
        self._tmp = tmp
        try:
            posix.fchmod(fd, DROP_MODE)
            # held until the file is closed, i.e. as long as this writer lives: pickup
            # removes a temporary file nobody holds (qpy.common.dropfile.orphaned)
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError as e:
            posix.close(fd)
            raise _io_error(e, "create")
        return fd

    def _spill(self) -> None:
        """Move what the memfd holds into a drop file and go on writing there."""
        fd = self._create()
        try:
            length = posix.fstat(self._fd).st_size
            done = 0
            while done < length:
                done += posix.sendfile(fd, self._fd, done, length - done)
            posix.lseek(fd, 0, 2)                # SEEK_END
        except OSError as e:
            posix.close(fd)
            raise _io_error(e, "write")
        posix.close(self._fd)
        self._fd, self._memory = fd, False

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
        if self._fresh:
            self._fresh = False
            data = dropfile.header(0, 0, 0, 0) + data  # filled in by commit()
        try:
            write_all(self._fd, data)
        except OSError as e:
            raise _io_error(e, "write")
        if self._memory and self.size > MEMORY_MAX:
            self._spill()

    def commit(self, sender: bytes, recipients: list[bytes], mail: bytes = b"",
               rcpt: list[bytes] | None = None) -> str:
        """Append the envelope, fix the header, make it durable; returns the id (the
        final name; a fresh one only if another user's file took this one). `mail`
        and `rcpt`: the DSN parameters (qpy.common.envelope's P and Q records)."""
        env = envelope.encode(sender, recipients, mail, rcpt)
        if not self._memory:
            self._check(env)
        try:
            if self._fresh:
                data = b"".join(self._buf)
                self._buf, self._buffered, self._fresh = [], 0, False
                crc = zlib.crc32(env, zlib.crc32(data))
                write_all(self._fd, dropfile.header(posix.getpid(), self.size, len(env), crc)
                          + data + env)
            else:
                self._flush()
                write_all(self._fd, env)
                crc = zlib.crc32(env, self._crc)
                posix.pwrite(self._fd, dropfile.header(posix.getpid(), self.size, len(env),
                                                       crc), 0)
            if self._memory:
                # sealed: pickup checks it, so what it copies is what was checked (the
                # envelope too, before it answers: its refusal comes before any 250)
                fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, SEALS)
                try:
                    self.id = through_door(self._root, self._fd, self.id)
                    # the memfd stays open: the caller's abort() after its reply is the
                    # last close, which frees the message's pages (off the reply's path)
                    self._held = True
                    return self.id
                except DoorShut:
                    self._check(env)
                    self._spill()            # nobody at the door: drop/, as ever
            for _ in range(3):
                try:
                    posix.rename(self._tmp, self.id, src_dir_fd=self._dfd,
                                 dst_dir_fd=self._dfd)
                    break
                except PermissionError:   # sticky drop/: another user's file has the name
                    self.id = new_id()
            else:
                raise InjectError(EXIT_QUEUE, "create: the drop names are taken")
            self._tmp = self.id   # until the fsync returns, abort() removes the final name
            # durable: rename, then one fsync of the file commits its bytes and the
            # rename together (the module docstring says why; pickup checks the CRC)
            posix.fsync(self._fd)
            self._tmp = ""
        except OSError as e:
            if self._tmp == self.id:
                self._void()
            raise _io_error(e, "write")
        finally:
            if not self._held:
                self.abort()
        return self.id

    def _check(self, env: bytes) -> None:
        """The queue never holds an envelope pickup would refuse (at the door pickup
        checks it before it answers; a drop file it would quarantine after the 250)."""
        try:
            envelope.decode(env)
        except envelope.EnvelopeError as e:
            self.abort()
            raise InjectError(e.code, str(e))

    def _void(self) -> None:
        """The fsync failed after the rename: a complete file with a valid CRC stands
        under the final name, which pickup would admit though the caller hears 53 and
        retries. Spoil its header first (a pickup that has it open but not yet read
        it quarantines it), then abort() unlinks it."""
        try:
            posix.pwrite(self._fd, b"\0" * dropfile.HEADER_LEN, 0)
        except OSError:
            pass

    def abort(self) -> None:
        """Forget the message; after commit(), let go of what it still holds."""
        if self._fd >= 0:
            posix.close(self._fd)
            self._fd = -1
        if self._tmp:
            try:
                posix.unlink(self._tmp, dir_fd=self._dfd)
            except OSError:
                pass
            self._tmp = ""
        if self._dfd >= 0:
            posix.close(self._dfd)
            self._dfd = -1


class DoorShut(Exception):
    """Nobody listens at pickup's door; the message was not handed over."""


_door = None      # the socket to pickup's door, kept for the next message of this process


def _close_door() -> None:
    global _door
    if _door is not None:
        _door.close()
        _door = None


def through_door(root: str, fd: int, want: str) -> str:
    """Hand a sealed message to qpy-pickup, proposing `want` as its id; the id it got,
    once durable.

    DoorShut when it could not be handed over (the caller writes a drop file
    instead); InjectError when it was handed over and pickup said no, or did not
    answer (then it may be queued: the client's retry can make a duplicate, the
    window every SMTP server has between its commit and its 250)."""
    global _door
    import socket  # here, not at the top: the sendmail front ends never need them
    import struct

    from qpy.common import door, unixsock
    for attempt in (1, 2):
        if _door is None:
            # blocking, bounded by the kernel's timeouts: a send and a receive are one
            # system call each, where a Python timeout polls before each of them
            bound = struct.pack("ll", int(ANSWER_TIMEOUT), 0)
            try:
                _door = unixsock.connect(door.directory(root), door.LEAF,
                                         socket.SOCK_SEQPACKET, ANSWER_TIMEOUT)
                _door.settimeout(None)
                _door.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
                _door.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
            except OSError:
                _close_door()
                raise DoorShut()
        try:
            socket.send_fds(_door, [door.REQUEST + b" " + want.encode()], [fd])
        except OSError:
            _close_door()        # a connection to a pickup that has since restarted
            if attempt == 2:
                raise DoorShut()
            continue
        try:
            answer = _door.recv(door.MAX_DATAGRAM)
        except OSError as e:
            _close_door()
            raise InjectError(EXIT_WRITE, "no answer from the queue: %s" % e)
        break
    code, _, text = answer.partition(b" ")
    if code == door.QUEUED and is_id(text.decode("ascii", "replace")):
        return text.decode("ascii")
    reason = text.decode("utf-8", "replace")
    if code == door.REFUSED:
        raise InjectError(EXIT_REFUSED, reason)
    _close_door()
    raise InjectError(EXIT_WRITE, reason if code == door.TEMPORARY else
                      "the queue closed without an answer")


def inject(root: str, message: bytes, sender: bytes, recipients: list[bytes],
           databytes: int = 0, mail: bytes = b"", rcpt: list[bytes] | None = None) -> str:
    """Queue a whole message; returns its id or raises InjectError."""
    d = Drop(root, databytes)
    try:
        d.write(message)
    except BaseException:
        d.abort()
        raise
    return d.commit(sender, recipients, mail, rcpt)
