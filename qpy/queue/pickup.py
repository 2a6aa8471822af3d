"""qpy-pickup — admit drop files into the strict queue.

SYNOPSIS
    qpy-pickup            (QPY_ROOT names the root; started by qpy-start)

RUNS AS
    qpyq (started as root, it drops privileges at once).

READS
    queue/drop/NAME: files written by qpy.inject.drop, owned by whoever injected;
    messages qpy-smtpd hands in at queue/door/socket (qpy.queue.door: a sealed
    memfd in the same format, answered with the queue id once it is durable);
    control/databytes; control/nonsmtpmilters (qpy.queue.nonsmtp, docs/milter.md).

WRITES
    queue/mess/ID (the message with a Received: line), queue/todo/ID (arrival
    time, injecting uid, size, the injector's pid (qp), envelope),
    queue/pickup/journal, and moves bad drop files to queue/quarantine/; tells
    qpy-queue-send of new todo/ID at queue/trigger/socket (qpy.common.trigger).

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
    3. todo/.tmp.ID renamed to todo/ID. todo/ is not fsync'd here: a rename
       lost in a crash is redone from the journal.
    4. each message that came through the door is answered with its id
       (qpy-smtpd says 250 only then); then queue-send is sent the batch's ids in
       one datagram (a hint; one that cannot go leaves a "list todo/" hint owed,
       retried each second; one is owed at start too, after recover()), and the
       drop files are unlinked. Messages that
       arrive at the door while a batch is being written wait for the next one,
       so one syncfs commits every message that came in meanwhile (group commit).
       A message from the door has no drop file: its journal record names "-";
       at start one without its "C" is finished when its temporaries are whole
       (it may have been answered), else dropped (never answered: journal.py).
    At start (qpy.queue.journal's recover()), a batch whose "C" is in the
    journal, or one of whose todo/ID exists, is finished (steps 3 and 4); in
    any other batch a record whose drop file is still there is undone (its
    temporaries removed, the drop file admitted again), and one with nothing to
    come again from (a door message, or a drop file already unlinked, which
    happens only after the commit point) is finished when its temporaries are
    whole. So a power cut that keeps a drop file's unlink but loses the
    unsynced "C" and the renames (possible where the filesystem keeps no
    metadata order: an ext4 without a journal) loses no message, and a kill -9
    admits none twice. Once no drop
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
    A `tmp.*` drop file goes once its writer is gone (dropfile.orphaned) or is 36 h old.

SIGNALS
    TERM (or INT): the batch in progress is finished, then exit 0. HUP: the
    control files are re-read. Each takes effect at once, also while pickup
    waits for drop files (qpy.common.wakeup).

EXIT CODES
    0 after SIGTERM; 111 when the queue cannot be used.

NOTES
    This module is over 400 lines (437) because this page, the crash argument of
    every step, is 98 of them; the code is the batch and the loop only (one
    message's admission is qpy.queue.admit, the journal qpy.queue.journal, the door
    qpy.queue.door, the hint to queue-send qpy.common.trigger).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import signal
import sys
import time
from collections.abc import Sequence

from qpy.common import door, dropfile, durable, trigger
from qpy.common.control import Control
from qpy.common.log import clean, log
from qpy.common.privilege import preamble, resolve_user
from qpy.common.queue import Paths, root_from
from qpy.common.wakeup import Wakeup
from qpy.common.watch import Watcher
from qpy.queue.admit import Admitter, Held, Rejected
from qpy.queue.door import Door, Request
from qpy.queue.journal import COMMIT, TODO_TMP, Journal, unlink_quietly

BATCH_MAX = 64                    # drop files admitted under one journal fsync
STALE_TMP_SECONDS = 36 * 3600     # qmail's limit for a half-written file
IDLE_WAIT = 5.0
RETRY_WAIT = 1.0                  # after the queue refused a write (disk full)
JOURNAL_MAX_RECORDS = 10_000      # empty the journal at least this often
JOURNAL_LINGER = 2.0              # seconds without new drop files before it is emptied

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


class Pickup:
    def __init__(self, root: str):
        self.root = root
        self.paths = Paths(root)
        self.control = Control(root)
        self.journal = Journal(self.paths)
        self.last_admit = 0.0
        self.stuck: set[str] = set()      # entries pickup can neither admit nor move
        self.admitter = Admitter(root, self.paths, self.control)
        self.door = Door.shut()           # opened by run()
        self.trigger = trigger.Sender(root)
        self.syncfs = _load_syncfs()
        self.mess_fd = self.admitter.mess_fd    # syncfs takes any descriptor on the fs
        self.todo_fd = self.admitter.todo_fd
        if os.fstat(self.mess_fd).st_dev != os.fstat(self.todo_fd).st_dev:
            self.syncfs = None            # one syncfs would not cover both

    def _open_door(self) -> Door:
        """The door for qpy-smtpd; a shut one (drop files only) when it cannot open."""
        import pwd
        allowed = {0, os.getuid()}
        try:
            allowed.add(pwd.getpwnam(resolve_user(self.root, "qpyd")).pw_uid)
        except KeyError:
            pass
        try:
            return Door(self.root, allowed)
        except OSError as e:
            log("warning: no door for qpy-smtpd (%s): SMTP mail comes by "
                "drop files" % e.strerror)
            return Door.shut()

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
            return self.admitter.copy(fd, sync, name)
        except Rejected as e:
            self.quarantine(name, dfd, str(e))
            return None
        except Held:             # control/nonsmtpmilters: waits, or bounced or discarded
            return None
        except OSError:
            raise                # the queue refused a write: admit_batch retries
        except Exception as e:   # a file no check foresaw must not stop pickup
            self.quarantine(name, dfd, "cannot admit: %s" % type(e).__name__)
            return None
        finally:
            os.close(fd)

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
    def admit_door(self, req: Request, sync: bool) -> tuple[str, int, int] | None:
        """Write mess/ID and todo/.tmp.ID for a message from the door, or refuse it."""
        try:
            return self.admitter.copy(req.fd, sync, req.want, from_door=True)
        except Rejected as e:
            log("door: refused a message from uid %d: %s" % (req.uid, e))
            self.door.answer(req, door.REFUSED, str(e))
        except OSError:
            raise
        except Exception as e:
            log("door: cannot admit a message from uid %d: %s" % (req.uid, type(e).__name__))
            self.door.answer(req, door.REFUSED, "cannot admit: %s" % type(e).__name__)
        return None

    def admit_batch(self, names: list[str], dfd: int, requests: Sequence[Request] = ()) -> bool:
        """Admit what it can of names and door requests; False when the queue refused a
        write. Every request is answered: its id once durable, else why not."""
        admitted: list[tuple[str, str, int, int]] = []
        from_door: list[tuple[Request, str]] = []
        ok = True
        batched = self.syncfs is not None
        try:
            for name in names:
                r = self.admit_one(name, dfd, sync=not batched)
                if r:
                    admitted.append((name, *r))
            for req in requests:
                r = self.admit_door(req, sync=not batched)
                if r:
                    admitted.append(("-", *r))
                    from_door.append((req, r[0]))
        except OSError as e:
            log("warning: cannot admit: %s" % e.strerror)
            ok = False           # disk full or worse: retry later, nothing lost
        try:
            committed = bool(admitted) and self._commit(admitted, batched)
        except BaseException:
            # records may be in the journal without their "C": void them, and drop
            # the temporaries not yet renamed (their drop files stay and come again)
            self.journal.void_owed = True
            self._undo(admitted)
            self._answer_rest(requests, "cannot commit the queue")
            raise
        if admitted and not committed:
            self._undo(admitted)
            ok = False
        if committed:
            self.last_admit = time.monotonic()
            # durable since the commit point: the clients waiting at the door first
            for req, msg_id in from_door:
                self.door.answer(req, door.QUEUED, msg_id)
            self.trigger.new([msg_id for _, msg_id, _, _ in admitted])  # queue-send
            for name, msg_id, uid, size in admitted:
                if name != "-":
                    try:
                        os.unlink(name, dir_fd=dfd)
                    except FileNotFoundError:
                        pass
                self.admitter.ids.remember(msg_id)   # committed: never taken again
                log("pickup msg %s: uid %d bytes %d%s" % (
                    msg_id, uid, size, " (door)" if name == "-" else
                    "" if name == msg_id else " (drop %s)" % clean(name)))
        self._answer_rest(requests, "cannot write the queue now")
        return ok

    def _answer_rest(self, requests: Sequence[Request], why: str) -> None:
        for req in requests:
            if not req.answered:
                self.door.answer(req, door.TEMPORARY, why)

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
            os.rename(TODO_TMP + msg_id, msg_id, src_dir_fd=self.todo_fd,
                      dst_dir_fd=self.todo_fd)
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
        if self.syncfs(self.mess_fd) == 0:
            return True
        err = ctypes.get_errno()
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
                if age > STALE_TMP_SECONDS or dropfile.orphaned(dfd, name, age):  # writer gone
                    unlink_quietly(self.paths.drop, name)
            else:
                self.quarantine(name, dfd, "not a drop file name")
        ready.sort()
        return ready

    def run(self, sigs: Wakeup) -> int:
        lock = os.open(self.journal.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("fatal: another qpy-pickup runs on %s" % self.root)
            return 111
        self.journal.recover()
        self.trigger.owe()            # recovery may have renamed todo/.tmp.ID files
        watcher = Watcher([self.paths.drop])
        dfd = os.open(self.paths.drop, os.O_RDONLY | os.O_DIRECTORY)
        self.door = self._open_door()
        log("started on %s" % self.root)
        pending: list[str] = []
        retry = False                 # a batch failed: list drop/ again after the pause
        ready = [sigs.fd]
        while True:
            # a signal ends any wait at once; a batch in progress is finished first
            got = sigs.take_if(sigs.fd in ready)
            if any(sig in STOP_SIGNALS for sig in got):
                break
            if signal.SIGHUP in got:
                self.control.reload()
                log("info: control files re-read")
            self.trigger.settle()       # a hint owed since a send failed
            busy = pending or self.door.pending
            ready = watcher.wait(self.trigger.timeout(0 if busy else JOURNAL_LINGER if
                                 self.journal.records else IDLE_WAIT), (sigs.fd, *self.door.fds()))
            if sigs.fd in ready:
                continue                    # the signal first; no quiet wake
            self.door.service(ready)
            # a hint, a quiet wake or a due rescan lists the whole directory (taking the
            # rescan here keeps wait() from a zero timeout, a busy loop); a wake by the
            # door alone does not
            if watcher.names() or watcher.rescan_due() or retry or not ready:
                pending, retry = self.scan(dfd), False
            # the door first: a client waits for each of those answers
            requests = self.door.take(BATCH_MAX)
            batch, pending = pending[:BATCH_MAX - len(requests)], \
                pending[BATCH_MAX - len(requests):]
            if not batch and not requests:
                # idle: the records go once no message came for JOURNAL_LINGER seconds
                # (their three fsyncs would cost more than the admission of one message)
                if time.monotonic() - self.last_admit >= JOURNAL_LINGER:
                    self.journal.empty()
                continue
            try:
                admitted = self.admit_batch(batch, dfd, requests)
            except Exception as e:   # pickup goes on: the batch's drop files stay
                log("warning: batch not admitted: %s: %s" % (type(e).__name__, e))
                admitted = False
            if not admitted:
                pending, retry = [], True
                select.select([sigs.fd], [], [], RETRY_WAIT)    # a signal ends it
            if self.journal.records >= JOURNAL_MAX_RECORDS:
                self.journal.empty()
        self.door.close()
        self.journal.empty()
        log("exiting")
        return 0


def main() -> int:
    root = root_from()
    preamble("qpy-pickup", root, "qpyq")
    sigs = Wakeup(STOP_SIGNALS + (signal.SIGHUP,))
    try:
        return Pickup(root).run(sigs)
    except OSError as e:
        log("fatal: %s" % e)
        return 111


if __name__ == "__main__":
    sys.exit(main())
