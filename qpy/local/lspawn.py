"""qpy-lspawn — run local deliveries for qpy-queue-send, each under its recipient's uid.

SYNOPSIS
    qpy-lspawn            (started by qpy-start; fd 0 is a SOCK_SEQPACKET socket)

RUNS AS
    root: the only resident root process, and it does nothing else. In a one-user
    root it runs as that user and delivers only as that user.

WHAT IT DOES
    Reads delivery requests on fd 0 (qpy.common.spawn: delivery number, sender,
    recipients `local@domain`, the message as a read-only fd). A sender or
    recipient holding CR, LF or NUL is refused for good (D, and a log line):
    the address parser lets none in, this is the check before a delivery. For
    each recipient it finds the owner (qpy.common.rewrite.owner: the canonical
    local part looked up in users/assign, the passwd database, then the alias
    user qpyalias; never root) and hands the delivery
    to a worker (qpy.local.worker) that runs as that owner, with the message
    descriptor as queue-send passed it (never reopened: through /proc/self/fd
    that would be with root's access; one not open for reading is refused).
    A worker is a child forked from this process: it starts a new session,
    keeps only its socket (fd 0; fd 1 and 2 are /dev/null), drops to the
    user's groups, gid and uid
    (qpy.common.privilege.become, which proves root cannot be regained), names
    itself `qpy-local USER` and runs deliveries in-process (qpy.local.local: no
    new interpreter per delivery), one at a time, answering each with
    qmail-local's code and text. An idle worker of the same identity (user,
    uid, gid, groups) is reused; a new one is forked when none is idle, so as
    many run as queue-send has deliveries in flight. A worker is retired (its
    socket closed, so it exits) after WORKER_IDLE idle seconds, after
    MAX_DELIVERIES deliveries, on SIGHUP, or when it answers EXIT_RETIRE. The
    parent answers each request with spawn.send_result once every recipient
    is done: K (code 0), D (code 100), Z (anything else, a crash, a timeout).

    A delivery that runs longer than `timeoutlocal` (control file, default
    3600 s) plus GRACE seconds gets its worker killed and is reported Z
    (deferred). A worker that dies on a signal takes its whole session with it
    (its programs run in it, in their own process groups), and lspawn is a
    child subreaper, so it reaps whatever they leave behind.

    Control files (defaultdelivery, envnoathost, timeoutlocal) are read at
    start and on SIGHUP; users/assign is re-read whenever it changes.

    The recipient's supplementary groups are looked up here, in the parent
    (os.getgrouplist, once per user), and kept for GROUPS_TTL seconds, until
    /etc/group or /etc/passwd changes, or until SIGHUP, whichever comes first:
    the worker does no name-service work at all. A user added to a group through
    a non-file source (LDAP, sssd) gets the new group within GROUPS_TTL seconds
    or at once on SIGHUP. The owner of a local part (users.lookup: a parse of
    users/assign and of /etc/passwd, a stat of the home) is kept likewise for
    OWNERS_TTL seconds, until /etc/passwd or users/assign changes, or SIGHUP; a
    home removed meanwhile makes the worker's own check of the home defer the
    delivery until then.

    End of file on fd 0 or SIGTERM: no new requests; retire the idle workers,
    wait for the deliveries in flight (their results are still sent while the
    socket lasts), then exit 0.

SECURITY
    Never delivers as uid 0. Refuses a message fd that is not a regular file
    owned by the queue user. A worker holds no descriptor but its socket and the
    message at hand when user code runs, and serves one identity only, so it
    never holds another user's mail. It still makes qpy-local's own checks (home
    owned by the user, not writable by group or others) as the user, per
    delivery; only the group lookup moved to the parent. Its answers are parsed
    strictly (qpy.local.worker.decode_result) and must name the delivery it was
    given; anything else retires it.

EXIT CODES
    0 after end of input; 111 when it cannot start (not root, fd 0 not a socket).
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import os
import pwd
import selectors
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from qpy.common import address, children, control, privilege, rewrite, spawn, users
from qpy.common.exits import EXIT_TEMP
from qpy.common.log import clean, log
from qpy.common.queue import Paths, root_from
from qpy.local import local as qlocal
from qpy.local import worker

GRACE = 30              # seconds past timeoutlocal before the parent kills a worker
MAX_WORKERS = 2000      # a hard cap; queue-send's concurrencylocal is far lower
MAX_DELIVERIES = 500    # a worker is retired after this many (bounds any slow leak)
WORKER_IDLE = 5.0       # seconds an idle worker is kept for the next delivery
MAX_REPORT = 4000       # bytes of a worker's report kept
STOP_WAIT = 60          # seconds SIGTERM waits for deliveries in flight
PR_SET_CHILD_SUBREAPER = 36
GROUPS_TTL = 60.0       # seconds a user's supplementary groups are kept
GROUP_FILE = "/etc/group"
PASSWD_FILE = "/etc/passwd"
OWNERS_TTL = 60.0       # seconds an address's owner (users.lookup) is kept
T = TypeVar("T")


@dataclass
class Job:
    delivery: int
    msgfd: int
    results: list[tuple[bytes, bytes] | None]
    pending: int = 0


@dataclass(eq=False)
class Worker:
    """A forked delivery process for one identity (qpy.local.worker), kept for reuse."""
    pid: int
    key: tuple                  # (user, uid, gid, groups): who it runs as
    sock: socket.socket         # our end of its SOCK_SEQPACKET pair
    served: int = 0
    job: Job | None = None      # the delivery in flight, with its recipient index
    index: int = 0
    seq: int = 0
    deadline: float = 0.0       # of the delivery in flight
    idle_since: float = 0.0
    killed: bool = False        # we sent SIGKILL (timeout)


class LSpawn:
    def __init__(self, root: str, sock: socket.socket):
        self.root = root
        self.sock = sock
        self.ctl = control.Control(root)
        self.workers: dict[int, Worker] = {}     # by pid
        self.idle: dict[tuple, list[Worker]] = {}
        self.seq = 0
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.oneuser = Paths(root).oneuser() is not None
        self.queue_uid = self._queue_uid()
        try:
            self.queue_dev = os.stat(Paths(root).queue).st_dev
        except OSError:
            self.queue_dev = -1     # unknown: every Maildir delivery fsyncs new/
        # supplementary groups by (user, gid); owners by local part (users.lookup)
        self.groups = StampedCache([GROUP_FILE, PASSWD_FILE], GROUPS_TTL)
        self.owners = StampedCache([PASSWD_FILE, os.path.join(Paths(root).users, "assign")],
                                   OWNERS_TTL)
        self._settings()

    def _queue_uid(self) -> int:
        try:
            return privilege.user_ids(privilege.resolve_user(self.root, "qpyq"))[0]
        except KeyError:
            return -1

    def _settings(self) -> None:
        self.ctl.reload()
        self.defaultdelivery = self.ctl.line("defaultdelivery").encode()
        self.envnoathost = self.ctl.line("envnoathost").encode()
        self.timeout = qlocal.timeout_from(self.ctl)

    # ---- requests -------------------------------------------------------------------
    def request(self) -> None:
        try:
            got = spawn.recv_request(self.sock)
        except spawn.SpawnError as e:
            log(f"warning: bad request: {e}")
            return
        except OSError as e:
            log(f"alert: cannot read requests: {e.strerror}")
            self.stop()
            return
        if got is None:
            self.stop()
            return
        delivery, sender, rcpts, msgfd = got
        job = Job(delivery, msgfd, [None] * len(rcpts))
        problem = self._check_message(msgfd)
        for i, rcpt in enumerate(rcpts):
            if problem:
                job.results[i] = (b"Z", problem)
            else:
                try:
                    job.results[i] = self.start(job, i, sender, rcpt)
                except Exception as e:  # a bug must cost one deferral, not the spawner
                    log(f"alert: delivery {delivery}: {type(e).__name__}: {e}")
                    job.results[i] = (b"Z", b"Temporary failure in qpy-lspawn. (#4.3.0)")
        self.maybe_done(job)

    def _check_message(self, fd: int) -> bytes | None:
        try:
            st = os.fstat(fd)
        except OSError:
            return b"qpy-lspawn unable to read message (#4.3.0)"
        if not stat.S_ISREG(st.st_mode) or (self.queue_uid >= 0 and st.st_uid != self.queue_uid):
            return b"Sorry, message has wrong type or owner. (#4.3.5)"
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if flags & os.O_PATH or flags & os.O_ACCMODE not in (os.O_RDONLY, os.O_RDWR):
            # read only through the descriptor as given: its holder's access, not ours
            return b"Sorry, message descriptor is not open for reading. (#4.3.5)"
        return None

    def start(self, job: Job, index: int, sender: bytes, rcpt: bytes) -> tuple[bytes, bytes] | None:
        """Hand one recipient to a worker; a result now when none can run."""
        if any(c in b"\r\n\0" for c in sender + rcpt):
            # the parser refuses these at every entry; this is the last door before
            # they reach a delivery's environment, a Return-Path or a Delivered-To
            log(f"warning: qpy-lspawn: delivery {job.delivery}: refused: control character "
                f"in sender <{clean(sender)}> or recipient <{clean(rcpt)}>")
            return b"D", b"Sorry, control character in the sender or recipient. (#5.1.3)"
        local, domain = address.split(rcpt)
        if not domain:
            return b"D", b"Sorry, address must include host name. (#5.1.3)"
        if not local:
            return b"K", b"empty local part: trash address"
        try:
            who = self.owners.get(local, lambda: rewrite.owner(self.root, local))
        except users.UsersError as e:
            return b"Z", f"Unable to find the owner of this address: {e}. (#4.3.0)".encode()
        if who.uid == 0:
            return b"Z", b"Not allowed to perform deliveries as root. (#4.3.0)"
        if self.oneuser and who.uid != os.getuid():
            return b"Z", b"One-user mode: cannot deliver as another uid. (#4.3.0)"
        try:
            groups = self.groups.get((who.user, who.gid), lambda: _groups(who.user, who.gid)) \
                if os.getuid() == 0 else []
        except OSError:
            return b"Z", b"Unable to look up the groups of the recipient. (#4.3.0)"
        key = (who.user, who.uid, who.gid, tuple(groups))
        fields = [who.user.encode(), os.fsencode(who.home), local, domain, who.dash, who.ext,
                  sender, self.defaultdelivery, self.envnoathost, b"%d" % self.timeout]
        # the descriptor queue-send passed, never reopened (through /proc that would be
        # with root's access): workers read it by offset (pread), programs get a copy
        msgfd = job.msgfd
        for _ in range(2):  # an idle worker may have died just now: then a new one
            w = self._worker(key, who, groups)
            if w is None:
                return b"Z", b"qpy-lspawn unable to start a delivery process. (#4.3.0)"
            self.seq += 1
            try:
                w.sock.sendmsg([worker.encode_request(self.seq, fields)], [
                    (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [msgfd]))])
                break
            except OSError:
                self.retire(w)  # its exit is reaped; it had no delivery of ours
        else:
            return b"Z", b"qpy-lspawn unable to reach a delivery process. (#4.3.0)"
        w.job, w.index, w.seq = job, index, self.seq
        w.deadline = time.monotonic() + self.timeout + GRACE
        w.served += 1
        job.pending += 1
        return None

    def _worker(self, key: tuple, who: users.Recipient, groups: list[int]) -> Worker | None:
        """An idle worker for this identity, or a new one; None when none can start."""
        idle = self.idle.get(key)
        if idle:
            w = idle.pop()
            if not idle:
                del self.idle[key]
            return w
        if len(self.workers) >= MAX_WORKERS:
            self.retire_idle(0.0, 1)   # make room: the idle worker unused the longest
            if len(self.workers) >= MAX_WORKERS:
                return None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            return None
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            self.child(who, groups, ours, theirs)  # never returns
        theirs.close()
        w = Worker(pid, key, ours)
        self.workers[pid] = w
        self.sel.register(ours, selectors.EVENT_READ, w)
        return w

    # ---- the child ------------------------------------------------------------------
    def child(self, who: users.Recipient, groups: list[int], ours: socket.socket,
              theirs: socket.socket) -> None:
        code = EXIT_TEMP
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            os.setsid()
            # no Python object may close an fd number the worker reuses for a message
            for s in [ours, self.sock] + [o.sock for o in self.workers.values()]:
                s.detach()
            os.dup2(theirs.detach(), 0)  # also closes the request socket in this process
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.closerange(3, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0
                          else 65536)
            if os.getuid() == 0:
                privilege.become(who.uid, who.gid, groups)  # groups from the parent's cache
            if os.getuid() == 0 or os.geteuid() == 0:
                raise privilege.PrivilegeError("still root")
            privilege.set_title("qpy-local " + who.user)
            os.umask(0o077)  # as qmail-local: new mail and program files private to the user
            os.chdir("/")
            code = worker.serve(socket.socket(fileno=0), self.root, who.uid, self.queue_dev)
        except BaseException:  # never return into the parent's loop
            code = EXIT_TEMP
        finally:
            os._exit(code)

    # ---- results --------------------------------------------------------------------
    def readable(self, w: Worker) -> None:
        """A worker's answer, or its end of file."""
        try:
            data = w.sock.recv(worker.MAX_RESULT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.retire(w)      # it exited or is exiting: reap() reports its delivery
            return
        if w.job is None:
            log(f"warning: unasked answer from qpy-local {w.pid}: retired")
            self.retire(w)
            return
        code = self._take_answer(w, data)
        if code is None:
            log(f"warning: qpy-local {w.pid}: mangled answer: retired")
            self._report(w, b"Z", b"qpy-local sent a mangled report. (#4.3.0)")
            self.retire(w)
            return
        if code == worker.EXIT_RETIRE or w.served >= MAX_DELIVERIES or self.stopping:
            self.retire(w)
        else:
            w.idle_since = time.monotonic()
            self.idle.setdefault(w.key, []).append(w)

    def _take_answer(self, w: Worker, data: bytes) -> int | None:
        """Report w's delivery from its answer; its code, or None when the answer does
        not parse or names another delivery (nothing is reported then)."""
        try:
            seq, code, text = worker.decode_result(data)
        except worker.WorkerError:
            return None
        if seq != w.seq:
            return None
        self._report(w, {0: b"K", 100: b"D"}.get(code, b"Z"),
                     text[:MAX_REPORT].strip().replace(b"\n", b" "))
        return code

    def _report(self, w: Worker, letter: bytes, text: bytes) -> None:
        job, w.job = w.job, None
        if job is None:
            return
        job.results[w.index] = (letter, text)
        job.pending -= 1
        self.maybe_done(job)

    def _forget_socket(self, w: Worker) -> None:
        if w.sock.fileno() >= 0:
            self.sel.unregister(w.sock)
            w.sock.close()

    def retire(self, w: Worker) -> None:
        """No more work for w: closing its socket ends it (end of file), reap() collects it."""
        idle = self.idle.get(w.key)
        if idle and w in idle:
            idle.remove(w)
            if not idle:
                del self.idle[w.key]
        if w.sock.fileno() >= 0:
            self.readable_last(w)
        self._forget_socket(w)

    def readable_last(self, w: Worker) -> None:
        """Take an answer already sent before the socket closes (a worker that exited)."""
        if w.job is None:
            return
        try:
            w.sock.setblocking(False)
            data = w.sock.recv(worker.MAX_RESULT)
        except OSError:
            return
        if data:
            self._take_answer(w, data)     # a mangled one: reap() reports the delivery

    def retire_idle(self, older_than: float, most: int | None = None) -> None:
        """Retire idle workers unused for older_than seconds (at most `most` of them)."""
        now = time.monotonic()
        old = sorted((w for ws in self.idle.values() for w in ws
                      if now - w.idle_since >= older_than), key=lambda w: w.idle_since)
        for w in old[:most]:
            self.retire(w)

    def reap(self) -> None:
        # also orphans of deliveries: we are their subreaper
        for pid, status in children.exited():
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            self.retire(w)      # takes an answer it sent before it exited
            if w.job is not None:
                if w.killed:
                    text = b"Delivery timed out; killed."
                elif os.WIFEXITED(status):
                    text = b"qpy-local exited %d. (#4.3.0)" % os.WEXITSTATUS(status)
                else:
                    text = b"qpy-local crashed. (#4.3.0)"
                self._report(w, b"Z", text)
            if not os.WIFEXITED(status):
                kill_session(pid)  # its programs must not outlive a killed delivery

    def maybe_done(self, job: Job) -> None:
        if job.pending or any(r is None for r in job.results):
            return
        os.close(job.msgfd)
        results = [r for r in job.results if r is not None]
        try:
            spawn.send_result(self.sock, job.delivery, results)
        except OSError as e:
            log(f"warning: cannot send result {job.delivery}: {e.strerror}")
        for letter, text in results:
            if letter != b"K":
                log(f"delivery {job.delivery}: {letter.decode()} {clean(text)}")

    def kill_overdue(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.job is not None and w.deadline <= now and not w.killed:
                w.killed = True
                try:
                    os.kill(w.pid, signal.SIGKILL)  # reap() then clears its session
                except OSError:
                    pass

    # ---- main loop ------------------------------------------------------------------
    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_by = time.monotonic() + STOP_WAIT
            try:
                self.sel.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.retire_idle(0.0)

    def _wait(self) -> float | None:
        """How long the loop may sleep: until a deadline or an idle worker's retirement."""
        now = time.monotonic()
        times = [w.deadline for w in self.workers.values() if w.job is not None]
        times += [w.idle_since + WORKER_IDLE for ws in self.idle.values() for w in ws]
        wait = max(0.0, min(times) - now) if times else None
        if self.stopping:
            wait = 1.0 if wait is None else min(wait, 1.0)
        return wait

    def run(self) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signals: list[int] = []
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda s, f: signals.append(s))
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.sel.register(self.sock, selectors.EVENT_READ, "sock")
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        while not (self.stopping and not self.workers):
            for key, _ in self.sel.select(self._wait()):
                if key.data == "sock":
                    if not self.stopping:
                        self.request()
                elif key.data == "wake":
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                elif isinstance(key.data, Worker):
                    self.readable(key.data)
            while signals:
                sig = signals.pop()
                if sig == signal.SIGTERM:
                    self.stop()
                elif sig == signal.SIGHUP:
                    self._settings()
                    self.groups.clear()
                    self.owners.clear()
                    self.retire_idle(0.0)   # new settings and groups: fresh workers
            self.reap()
            self.kill_overdue()
            self.retire_idle(WORKER_IDLE)
            if self.stopping and time.monotonic() > self.stop_by:
                for w in self.workers.values():
                    w.deadline = 0
                    w.killed = w.job is not None
                    try:
                        os.kill(w.pid, signal.SIGKILL)
                    except OSError:
                        pass
        return 0


def kill_session(sid: int) -> None:
    """SIGKILL every process left in session `sid` (a delivery worker's session)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read(4096)
            fields = data[data.rfind(b")") + 2:].split()
            if len(fields) > 3 and int(fields[3]) == sid:
                os.kill(int(name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def become_subreaper() -> None:
    """Orphans of deliveries become our children, so that reap() collects them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class StampedCache:
    """Values worked out here once rather than per delivery (name-service lookups parse
    /etc/passwd and /etc/group on every call), each kept `ttl` seconds, and all
    dropped at once when one of `files` changes (inode, size, mtime) or on clear()."""

    def __init__(self, files: list[str], ttl: float) -> None:
        self.files = files
        self.ttl = ttl
        self.entries: dict[object, tuple[float, object]] = {}
        self.stamp: list[tuple[int, int, int] | None] = []

    def clear(self) -> None:
        self.entries.clear()

    def get(self, key: object, compute: Callable[[], T]) -> T:
        stamp = [_stamp(f) for f in self.files]
        if stamp != self.stamp:        # a file changed: nothing cached holds
            self.entries.clear()
            self.stamp = stamp
        now = time.monotonic()
        hit = self.entries.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]  # type: ignore[return-value]
        value = compute()              # an exception is not cached
        if len(self.entries) > MAX_WORKERS:
            self.entries.clear()
        self.entries[key] = (now, value)
        return value


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _groups(user: str, gid: int) -> list[int]:
    # a users/assign name missing from passwd gets its own gid only, as before
    return os.getgrouplist(user, gid) if _in_passwd(user) else [gid]


def _in_passwd(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def main(argv: list[str] | None = None) -> int:
    root = root_from()
    privilege.preamble("qpy-lspawn", root, None)
    if os.getuid() != 0 and Paths(root).oneuser() is None:
        sys.stderr.write("qpy-lspawn: must run as root (or in a one-user root)\n")
        return EXIT_TEMP
    try:
        sock = socket.socket(fileno=0)
        if sock.type != socket.SOCK_SEQPACKET:
            raise OSError("not a SOCK_SEQPACKET socket")
    except OSError as e:
        sys.stderr.write(f"qpy-lspawn: fd 0: {e}\n")
        return EXIT_TEMP
    os.chdir("/")
    become_subreaper()
    return LSpawn(root, sock).run()
