"""admit — one message from an open descriptor into the queue: mess/ID and todo/.tmp.ID.

qpy-pickup's copy of a drop file (or of a sealed memfd from its door): every check
is made on the open descriptor, every length against its limit before a byte is read
for it, the message copied in pieces, and qpy's Received: line put in front. A file of
at most WHOLE_BYTES (an SMTP message of a few KiB) is read whole with one pread (its
size is the bound) and what was checked is what is written; the files are opened
relative to descriptors of mess/ and todo/ held open (no path joined per message). What
makes the two files durable and visible is the batch's business (qpy-pickup,
qpy.queue.journal); a crash between here and there leaves only a todo/.tmp.ID and its
mess/ID, which recovery removes.
"""

from __future__ import annotations

import os
import stat
import time
import zlib

from qpy.common import dropfile, durable, envelope
from qpy.common.control import DATABYTES_CEILING, Control, ControlError, message_limit
from qpy.common.privilege import resolve_user
from qpy.common.queue import DropIds, Paths, make_id, todo_encode
from qpy.common.rfcdate import rfc5322_date
from qpy.queue import nonsmtp
from qpy.queue.door import sealed
from qpy.queue.journal import TODO_TMP, unlink_quietly

HEADER_SLACK = 64 * 1024          # room for trace lines added after databytes was checked
COPY_BYTES = 1 << 20              # the message is copied in pieces of this size
WHOLE_BYTES = 64 * 1024           # a file up to this size is read with one pread
SPARSE_SLACK = 64 * 1024          # a larger drop file with under half its size on disk
                                  # has holes: refused


class Rejected(Exception):
    """The drop file fails a check; it goes to quarantine."""


Held = nonsmtp.Held   # not admitted now: filtered local mail waits, or was bounced


class Admitter:
    def __init__(self, root: str, paths: Paths, control: Control):
        self.paths = paths
        self.control = control
        self.last_id = 0
        self.ids = DropIds()
        self.who = self._who_table(root)
        # names are opened relative to these: no path joined, one component looked up
        self.mess_fd = os.open(paths.mess, os.O_RDONLY | os.O_DIRECTORY)
        self.todo_fd = os.open(paths.todo, os.O_RDONLY | os.O_DIRECTORY)
        self.filters = nonsmtp.NonSmtp(root, control, set(self.who))

    def _who_table(self, root: str) -> dict[int, str]:
        import pwd
        table = {}
        if self.paths.oneuser():
            return table
        for name, words in (("qpyd", "from network"), ("qpyalias", "by alias"),
                            ("qpys", "for bounce")):
            try:
                table[pwd.getpwnam(resolve_user(root, name)).pw_uid] = words
            except KeyError:
                pass
        return table

    def limit(self) -> int:
        """A defence only: whoever acknowledged the file applied message_limit first."""
        try:
            return message_limit(self.control) + HEADER_SLACK
        except ControlError:   # the acknowledgers refuse meanwhile; admit what they took
            return DATABYTES_CEILING + HEADER_SLACK

    def new_id(self) -> str:
        self.last_id = max(self.last_id + 1, time.time_ns() // 1000)
        return make_id(self.last_id, os.getpid())

    def copy(self, fd: int, sync: bool, want: str | None,
             from_door: bool = False) -> tuple[str, int, int]:
        """Write mess/ID and todo/.tmp.ID from a drop file's bytes; (id, uid, size).
        `want` is the id its injector chose (the drop file's name, or the one proposed
        at the door); it is kept when qpy.common.queue.DropIds allows, else pickup
        picks one. Raises Rejected when the bytes fail a check, OSError when the
        queue does."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("not a plain file")
        if from_door:
            if not sealed(fd):         # its sender could still change what we check
                raise Rejected("not sealed")
        elif st.st_nlink != 1:
            raise Rejected("has %d links" % st.st_nlink)
        limit = self.limit()
        if st.st_size > limit + dropfile.HEADER_LEN + envelope.MAX_ENVELOPE:
            raise Rejected("too large (%d bytes)" % st.st_size)
        if st.st_size > SPARSE_SLACK and st.st_blocks * 512 < st.st_size // 2:
            # holes: its copy in mess/ would take real disk its writer never used
            raise Rejected("sparse file (%d bytes, %d allocated)"
                           % (st.st_size, st.st_blocks * 512))
        try:
            # every length is checked against its limit before a byte is read for it; a
            # small file is read whole (its size, bounded, is the limit): one system
            # call for header, message and envelope
            small = st.st_size <= WHOLE_BYTES
            whole = os.pread(fd, st.st_size, 0) if small else b""
            if small and len(whole) != st.st_size:
                raise Rejected("file shrank while being read")
            h = dropfile.parse_header(whole[:dropfile.HEADER_LEN] if whole else
                                      os.pread(fd, dropfile.HEADER_LEN, 0), st.st_size)
            if h.msglen > limit:
                raise Rejected("message too large (%d bytes)" % h.msglen)
            if h.envlen > envelope.MAX_ENVELOPE:
                raise Rejected("envelope too large (%d bytes)" % h.envlen)
            env = whole[h.length + h.msglen:] if whole else \
                os.pread(fd, h.envlen, h.length + h.msglen)
            if len(env) != h.envlen:
                raise Rejected("envelope truncated")
            decoded = envelope.decode_all(env)
            sender, rcpts = decoded.sender, decoded.recipients
        except (dropfile.DropError, envelope.EnvelopeError) as e:
            raise Rejected(str(e))
        except OSError as e:
            raise Rejected("cannot read: %s" % e.strerror)
        now = time.time()
        who = self.who.get(st.st_uid, "by uid %d" % st.st_uid).encode()
        # control/nonsmtpmilters: what the filters leave, where they apply (else the drop)
        try:
            src, offset, length, crc_want, sender, rcpts = self.filters.admit(
                want or "", st.st_uid, fd, h, env, sender, rcpts)
        except nonsmtp.Torn as e:
            raise Rejected(str(e))
        # todo/.tmp.ID comes first: from here on a crash leaves a temporary that
        # recover() removes together with mess/ID, so no orphan mess file is possible.
        msg_id = self.ids.wanted(want or "", st.st_ctime)   # the injector's id, if it may be
        while True:
            msg_id = msg_id or self.new_id()
            received = b"Received: (qpy %d invoked %s) id %s; %s\n" % (
                h.pid, who, msg_id.encode(), rfc5322_date(now, weekday=False).encode())
            size = len(received) + length
            # the DSN parameters ride along (a recipient a filter kept keeps its own)
            todo = todo_encode(int(now), st.st_uid, size,
                               decoded.with_recipients(sender, rcpts).encode(), h.pid)
            if self._reserve(msg_id, todo, sync):
                break
            msg_id = None
        try:
            mfd = os.open(msg_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640,
                          dir_fd=self.mess_fd)
            try:
                if src == fd and whole:     # read already: what was checked is copied
                    data = whole[offset:offset + length]
                    crc = zlib.crc32(data)
                    durable.write_all(mfd, received + data)
                else:
                    crc = self._copy_range(src, mfd, offset, length, received)
                if crc_want is not None and zlib.crc32(env, crc) != crc_want:
                    # torn by a crash before its writer's fsync returned: never
                    # acknowledged, so its sender still has it
                    raise Rejected("checksum mismatch (torn by a crash before it was "
                                   "acknowledged)")
                if sync:           # else the batch's syncfs makes it durable
                    os.fsync(mfd)  # its directory entry is fsync'd for the whole batch
            finally:
                os.close(mfd)
        except BaseException:
            unlink_quietly(self.paths.mess, msg_id)
            unlink_quietly(self.paths.todo, TODO_TMP + msg_id)
            raise
        return msg_id, st.st_uid, size

    def _reserve(self, msg_id: str, todo: bytes, sync: bool) -> bool:
        """Write todo/.tmp.ID unless the id is taken (fsync'd unless the batch's syncfs
        will do it); pickup runs alone (flock)."""
        try:
            os.lstat(msg_id, dir_fd=self.mess_fd)
            return False
        except FileNotFoundError:
            pass
        try:
            fd = os.open(TODO_TMP + msg_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o640, dir_fd=self.todo_fd)
        except FileExistsError:
            return False
        try:
            durable.write_all(fd, todo)
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            unlink_quietly(self.paths.todo, TODO_TMP + msg_id)
            raise
        os.close(fd)
        return True

    @staticmethod
    def _copy_range(src: int, dst: int, offset: int, count: int, head: bytes) -> int:
        """Write head, then copy count bytes from offset (the head goes out with the
        first piece: one write for a message under COPY_BYTES); the CRC-32 of exactly
        the bytes copied."""
        crc = 0
        if not count:
            durable.write_all(dst, head)
        while count > 0:
            try:
                data = os.pread(src, min(count, COPY_BYTES), offset)
            except OSError as e:     # the drop file's fault, not the queue's
                raise Rejected("cannot read: %s" % e.strerror)
            if not data:
                raise Rejected("file shrank while being read")
            crc = zlib.crc32(data, crc)
            durable.write_all(dst, head + data if head else data)
            head = b""
            offset += len(data)
            count -= len(data)
        return crc
