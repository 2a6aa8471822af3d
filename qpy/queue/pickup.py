"""qpy-pickup — admit drop files into the strict queue.

SYNOPSIS
    qpy-pickup            (QPY_ROOT names the root; started by qpy-start)

RUNS AS
    qpyq (started as root, it drops privileges at once).

READS
    queue/drop/NAME: files written by qpy.inject.drop, owned by whoever injected.
    control/databytes.

WRITES
    queue/mess/ID (the message with a Received: line), queue/todo/ID (arrival
    time, injecting uid, size, envelope), queue/pickup/journal, and moves bad
    drop files to queue/quarantine/.

HOW A BATCH IS ADMITTED (crash safety)
    1. for each drop file: todo/.tmp.ID, then mess/ID, written (nothing is
       visible to queue-send yet); then one journal record per drop file,
       "NAME ID", appended to queue/pickup/journal without an fsync.
    2. one syncfs(2) of the queue's filesystem, which returns only once every
       dirty file and directory of that filesystem is on disk: the temporaries,
       both directories and the journal records, in one call where per-file
       fsyncs would take five per message. Its return is the commit point; a
       "C" record appended after it (not fsync'd) marks it in the journal.
       syncfs is used only where it reports write errors (Linux 5.8 and later)
       and when mess/ and todo/ share one filesystem; elsewhere each file and
       both directories are fsync'd, then the records and their "C" appended
       and fsync'd. When syncfs fails, the batch is not committed: its
       temporaries are removed, the drop files stay, an "X" record after its
       records (written before the next batch's) voids them, and from then on
       every file is fsync'd. (syncfs also writes other programs' dirty data on that
       filesystem; a queue on a busy shared filesystem is better on its own one.)
    3. todo/.tmp.ID renamed to todo/ID: queue-send sees them. todo/ is not
       fsync'd here: a rename lost in a crash is redone from the journal.
    4. the drop files are unlinked.
    At start (qpy.queue.journal's recover()), a batch whose "C" is in the journal, or one of whose
    todo/ID exists, is finished (steps 3 and 4); any other batch is undone (its
    temporaries removed, its drop files admitted again). A power cut can lose
    the unsynced "C", but the renames and unlinks that follow it become durable
    only after it on the filesystems qpy supports for its queue (ext4, xfs,
    btrfs keep metadata changes in order), so a batch whose drop files are gone
    always has its "C" or its todo/ID (or was delivered and removed already):
    no message is lost, and a kill -9 admits none twice. Once no drop
    file has come for JOURNAL_LINGER seconds (or the journal holds
    JOURNAL_MAX_RECORDS), todo/ and drop/ are fsync'd and the journal emptied:
    finishing a batch twice is harmless (drop names hold the inode, a
    nanosecond clock and the pid, and are never reused), so the records may
    wait for a quiet moment.

SECURITY
    The injecting user owns the drop file and may rewrite it at any time, so
    its bytes are copied (never linked) and every check is made on the open
    descriptor: opened without following links and without blocking, a plain
    file with one link, lengths that add up to its size, an envelope that
    passes the strict parser, a size within limits. A file that fails goes to
    quarantine/ with a log line; pickup goes on.

    Its memory stays bounded whatever the drop files claim: each length in the
    header is checked against its limit before anything is read for it (the
    message against the size limit, the envelope against 6,400,000 bytes,
    qpy.common.envelope.MAX_ENVELOPE), the message is copied in pieces of 1 MiB,
    and a drop file over 64 KiB with less than half of its size allocated on
    disk (st_blocks) is refused as "sparse file": its copy in mess/ would take
    real disk its writer never used (no injector writes one). A file that makes
    pickup fail in a way no check foresaw is quarantined ("cannot admit"); an
    error outside one file (the journal, a rename) leaves the batch's drop files
    in drop/ for the next pass. Pickup runs under a memory limit of 256 MiB
    (RLIMIT_AS) in the tests, with every such file.

EXIT CODES
    0 after SIGTERM; 111 when the queue cannot be used.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import stat
import sys
import time
import zlib

from qpy.common import dropfile, durable, envelope
from qpy.common.control import Control
from qpy.common.log import clean, log
from qpy.common.privilege import preamble, resolve_user
from qpy.common.queue import DropIds, Paths, make_id, root_from, todo_encode
from qpy.common.watch import Watcher
from qpy.queue.journal import COMMIT, TODO_TMP, Journal, unlink_quietly

BATCH_MAX = 64                    # drop files admitted under one journal fsync
SYNCFS_MIN_BATCH = 1              # from this many files on, one syncfs replaces their fsyncs
MAX_MESSAGE_BYTES = 1 << 30       # hard cap when databytes is unset
HEADER_SLACK = 64 * 1024          # room for trace lines added after databytes was checked
STALE_TMP_SECONDS = 36 * 3600     # qmail's limit for a half-written file
COPY_BYTES = 1 << 20              # the message is copied in pieces of this size
SPARSE_SLACK = 64 * 1024          # a larger drop file with under half its size on disk
                                  # has holes: refused
IDLE_WAIT = 5.0
RETRY_WAIT = 1.0                  # after the queue refused a write (disk full)
JOURNAL_MAX_RECORDS = 10_000      # empty the journal at least this often
JOURNAL_LINGER = 2.0              # seconds without new drop files before it is emptied

_stop = False
_reload = False


def _on_term(signum, frame):
    global _stop
    _stop = True


def _on_hup(signum, frame):
    global _reload
    _reload = True


def rfc822_date(t: float) -> str:
    tm = time.gmtime(t)
    return "%d %s %d %02d:%02d:%02d -0000" % (
        tm.tm_mday, ("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec").split()[tm.tm_mon - 1],
        tm.tm_year, tm.tm_hour, tm.tm_min, tm.tm_sec)


def _load_syncfs():
    """libc's syncfs, where the kernel reports write errors through it (5.8+)."""
    try:
        version = tuple(int(x) for x in os.uname().release.split(".")[:2])
        f = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError, ValueError):
        return None
    if version < (5, 8):
        return None
    f.argtypes = [ctypes.c_int]
    f.restype = ctypes.c_int
    return f


class Rejected(Exception):
    """The drop file fails a check; it goes to quarantine."""


class Pickup:
    def __init__(self, root: str):
        self.root = root
        self.paths = Paths(root)
        self.control = Control(root)
        self.journal = Journal(self.paths)
        self.last_id = 0
        self.ids = DropIds()
        self.last_admit = 0.0
        self.stuck: set[str] = set()      # entries pickup can neither admit nor move
        self.who = self._who_table()
        self.syncfs = _load_syncfs()
        if os.stat(self.paths.mess).st_dev != os.stat(self.paths.todo).st_dev:
            self.syncfs = None            # one syncfs would not cover both

    def _who_table(self) -> dict[int, str]:
        import pwd
        table = {}
        if self.paths.oneuser():
            return table
        for name, words in (("qpyd", "from network"), ("qpyalias", "by alias"),
                            ("qpys", "for bounce")):
            try:
                table[pwd.getpwnam(resolve_user(self.root, name)).pw_uid] = words
            except KeyError:
                pass
        return table

    def limit(self) -> int:
        databytes = self.control.integer("databytes")
        return databytes + HEADER_SLACK if databytes else MAX_MESSAGE_BYTES

    # --- ids ------------------------------------------------------------
    def new_id(self) -> str:
        self.last_id = max(self.last_id + 1, time.time_ns() // 1000)
        return make_id(self.last_id, os.getpid())

    # --- one drop file --------------------------------------------------
    def admit_one(self, name: str, dfd: int, sync: bool = True) -> tuple[str, int, int] | None:
        """Write mess/ID and todo/.tmp.ID for one drop file; (id, uid, bytes) or None."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
                         dir_fd=dfd)
        except FileNotFoundError:
            return None
        except OSError as e:
            self.quarantine(name, dfd, "cannot open: %s" % e.strerror)
            return None
        try:
            return self._copy(name, fd, sync)
        except Rejected as e:
            self.quarantine(name, dfd, str(e))
            return None
        except OSError:
            raise                # the queue refused a write: admit_batch retries
        except Exception as e:   # a file no check foresaw must not stop pickup
            self.quarantine(name, dfd, "cannot admit: %s" % type(e).__name__)
            return None
        finally:
            os.close(fd)

    def _copy(self, name: str, fd: int, sync: bool) -> tuple[str, int, int]:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("not a plain file")
        if st.st_nlink != 1:
            raise Rejected("has %d links" % st.st_nlink)
        if st.st_size > self.limit() + dropfile.HEADER_LEN + envelope.MAX_ENVELOPE:
            raise Rejected("too large (%d bytes)" % st.st_size)
        if st.st_size > SPARSE_SLACK and st.st_blocks * 512 < st.st_size // 2:
            # holes: its copy in mess/ would take real disk its writer never used
            raise Rejected("sparse file (%d bytes, %d allocated)"
                           % (st.st_size, st.st_blocks * 512))
        try:
            # every length is checked against its limit before a byte is read for it
            h = dropfile.parse_header(os.pread(fd, dropfile.HEADER_LEN, 0), st.st_size)
            if h.msglen > self.limit():
                raise Rejected("message too large (%d bytes)" % h.msglen)
            if h.envlen > envelope.MAX_ENVELOPE:
                raise Rejected("envelope too large (%d bytes)" % h.envlen)
            env = os.pread(fd, h.envlen, h.length + h.msglen)
            if len(env) != h.envlen:
                raise Rejected("envelope truncated")
            sender, rcpts = envelope.decode(env)
        except (dropfile.DropError, envelope.EnvelopeError) as e:
            raise Rejected(str(e))
        except OSError as e:
            raise Rejected("cannot read: %s" % e.strerror)
        now = time.time()
        who = self.who.get(st.st_uid, "by uid %d" % st.st_uid).encode()
        # todo/.tmp.ID comes first: from here on a crash leaves a temporary that
        # recover() removes together with mess/ID, so no orphan mess file is possible.
        msg_id = self.ids.wanted(name, st.st_ctime)   # the injector's id, if it may be
        while True:
            msg_id = msg_id or self.new_id()
            received = b"Received: (qpy %d invoked %s) id %s; %s\n" % (
                h.pid, who, msg_id.encode(), rfc822_date(now).encode())
            size = len(received) + h.msglen
            if self._reserve(msg_id, todo_encode(int(now), st.st_uid, size,
                                                 envelope.encode(sender, rcpts), h.pid),
                             sync):
                break
            msg_id = None
        try:
            mfd = os.open(os.path.join(self.paths.mess, msg_id),
                          os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
            try:
                durable.write_all(mfd, received)
                crc = self._copy_range(fd, mfd, h.length, h.msglen)
                if h.crc is not None and zlib.crc32(env, crc) != h.crc:
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
        if os.path.lexists(os.path.join(self.paths.mess, msg_id)):
            return False
        try:
            fd = os.open(os.path.join(self.paths.todo, TODO_TMP + msg_id),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
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
    def _copy_range(src: int, dst: int, offset: int, count: int) -> int:
        """Copy count bytes from offset; the CRC-32 of exactly the bytes copied."""
        crc = 0
        while count > 0:
            try:
                data = os.pread(src, min(count, COPY_BYTES), offset)
            except OSError as e:     # the drop file's fault, not the queue's
                raise Rejected("cannot read: %s" % e.strerror)
            if not data:
                raise Rejected("file shrank while being read")
            crc = zlib.crc32(data, crc)
            durable.write_all(dst, data)
            offset += len(data)
            count -= len(data)
        return crc

    def quarantine(self, name: str, dfd: int, reason: str) -> None:
        target = "%s.%d" % (name, time.time_ns())
        try:
            qfd = os.open(self.paths.quarantine, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.rename(name, target, src_dir_fd=dfd, dst_dir_fd=qfd)
                os.fsync(qfd)
            finally:
                os.close(qfd)
        except OSError as e:
            # A directory made by a user cannot be moved (its ".." is not ours to
            # change); an empty one can still be removed. Anything else is left
            # alone and reported once.
            try:
                os.rmdir(name, dir_fd=dfd)
                log("removed directory %s from drop: %s" % (clean(name), clean(reason)))
                return
            except OSError:
                pass
            if name not in self.stuck:
                self.stuck.add(name)
                log("warning: cannot quarantine drop %s (%s): %s"
                    % (clean(name), clean(reason), e.strerror))
            return
        log("quarantine drop %s as %s: %s" % (clean(name), clean(target), clean(reason)))

    # --- batches --------------------------------------------------------
    def admit_batch(self, names: list[str], dfd: int) -> bool:
        """Admit what it can of names; False when the queue refused a write."""
        admitted: list[tuple[str, str, int, int]] = []
        ok = True
        batched = len(names) >= SYNCFS_MIN_BATCH and self.syncfs is not None
        for name in names:
            try:
                r = self.admit_one(name, dfd, sync=not batched)
            except OSError as e:
                log("warning: cannot admit drop %s: %s" % (clean(name), e.strerror))
                ok = False       # disk full or worse: retry later, nothing lost
                break
            if r:
                admitted.append((name, *r))
        if not admitted:
            return ok
        try:
            committed = self._commit(admitted, batched)
        except BaseException:
            # records may be in the journal without their "C": void them, and drop
            # the temporaries not yet renamed (their drop files stay and come again)
            self.journal.void_owed = True
            self._undo(admitted)
            raise
        if not committed:
            self._undo(admitted)
            return False
        self.last_admit = time.monotonic()
        for name, msg_id, uid, size in admitted:
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            self.ids.remember(msg_id)      # committed: never taken from a drop name again
            log("pickup msg %s: uid %d bytes %d%s" % (
                msg_id, uid, size, "" if name == msg_id else " (drop %s)" % clean(name)))
        return ok

    def _commit(self, admitted: list[tuple[str, str, int, int]], batched: bool) -> bool:
        """Journal records, commit point, renames to todo/ID; False if not committed."""
        records = b"".join(b"%s %s\n" % (n.encode(), i.encode()) for n, i, _, _ in admitted)
        if batched:
            # durable: one syncfs for every mess/ID, todo/.tmp.ID, both directories and
            # the journal records; its return is the commit point, marked by a "C"
            # record written after it (see qpy.queue.journal)
            self.journal.add(records, len(admitted), sync=False)
            if not self._syncfs_queue():
                self.journal.void_owed = True       # its records: void before the next
                return False
            self.journal.append(COMMIT, sync=False)
        else:
            durable.fsync_dir(self.paths.mess)
            durable.fsync_dir(self.paths.todo)
            self.journal.add(records + COMMIT, len(admitted), sync=True)  # the commit point
        for _, msg_id, _, _ in admitted:
            os.rename(os.path.join(self.paths.todo, TODO_TMP + msg_id),
                      os.path.join(self.paths.todo, msg_id))
        # no fsync of todo/ here: the journal record redoes a lost rename at start, and
        # Journal.empty() fsyncs todo/ before it lets the records go
        return True

    def _undo(self, admitted: list[tuple[str, str, int, int]]) -> None:
        for _, msg_id, _, _ in admitted:
            if not os.path.lexists(os.path.join(self.paths.todo, msg_id)):
                unlink_quietly(self.paths.mess, msg_id)
                unlink_quietly(self.paths.todo, TODO_TMP + msg_id)

    def _syncfs_queue(self) -> bool:
        """syncfs(2) of the queue's filesystem; on failure, fsync each file from now on."""
        assert self.syncfs is not None
        fd = os.open(self.paths.mess, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if self.syncfs(fd) == 0:
                return True
            err = ctypes.get_errno()
        finally:
            os.close(fd)
        log("warning: syncfs failed (%s): batch not admitted; fsync each file from now on"
            % os.strerror(err))
        self.syncfs = None
        return False

    def scan(self, dfd: int) -> list[str]:
        """Names ready for admission; quarantines names pickup cannot know."""
        ready = []
        now = time.time()
        for entry in os.scandir(dfd):
            name = entry.name
            if name in self.stuck:
                continue
            if dropfile.is_final_name(name):
                ready.append(name)
            elif name.startswith(dropfile.TMP_PREFIX):
                try:
                    age = now - entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if age > STALE_TMP_SECONDS:   # its writer died long ago: never acknowledged
                    unlink_quietly(self.paths.drop, name)
            else:
                self.quarantine(name, dfd, "not a drop file name")
        ready.sort()
        return ready

    def run(self) -> int:
        global _reload
        lock = os.open(self.journal.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("fatal: qpy-pickup: another qpy-pickup runs on %s" % self.root)
            return 111
        self.journal.recover()
        watcher = Watcher([self.paths.drop])
        dfd = os.open(self.paths.drop, os.O_RDONLY | os.O_DIRECTORY)
        log("qpy-pickup: started on %s" % self.root)
        pending: list[str] = []
        while not _stop:
            if _reload:
                _reload = False
                self.control.reload()
            if not pending:
                # inotify only wakes us early; every wake lists the whole directory
                watcher.wait(JOURNAL_LINGER if self.journal.records else IDLE_WAIT)
                # scan() lists the whole directory on every wake, so this is the due
                # rescan too; not taking it leaves wait() with a zero timeout (a busy loop)
                watcher.rescan_due()
                pending = self.scan(dfd)
            if not pending:
                # idle: the records go once no drop file came for JOURNAL_LINGER seconds
                # (their three fsyncs would cost more than the admission of one message)
                if time.monotonic() - self.last_admit >= JOURNAL_LINGER:
                    self.journal.empty()
                continue
            batch, pending = pending[:BATCH_MAX], pending[BATCH_MAX:]
            try:
                admitted = self.admit_batch(batch, dfd)
            except Exception as e:   # pickup goes on: the batch's drop files stay
                log("warning: batch not admitted: %s: %s" % (type(e).__name__, e))
                admitted = False
            if not admitted:
                pending = []
                time.sleep(RETRY_WAIT)
            if self.journal.records >= JOURNAL_MAX_RECORDS:
                self.journal.empty()
        self.journal.empty()
        log("qpy-pickup: exiting")
        return 0


def main() -> int:
    root = root_from()
    preamble("qpy-pickup", root, "qpyq")
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    signal.signal(signal.SIGHUP, _on_hup)
    try:
        return Pickup(root).run()
    except OSError as e:
        log("fatal: qpy-pickup: %s" % e)
        return 111


if __name__ == "__main__":
    sys.exit(main())
