"""qpy-lspawn — run local deliveries for qpy-queue-send, each under its recipient's uid.

SYNOPSIS
    qpy-lspawn            (started by qpy-start; fd 0 is a SOCK_SEQPACKET socket)

RUNS AS
    root: the only resident root process, and it does nothing else. In a one-user
    root it runs as that user and delivers only as that user.

WHAT IT DOES
    Reads delivery requests on fd 0 (qpy.common.spawn: delivery number, sender,
    recipients `local@domain`, the message as a read-only fd). For each
    recipient it finds the owner (qpy.common.users.lookup: users/assign, the
    passwd database, the alias user qpyalias; never root), then forks. The child
    starts a new session, moves the message to fd 0 and a report pipe to fd 1
    and 2, closes every other descriptor (the request socket above all), drops
    to the user's groups, gid and uid (qpy.common.privilege.become, which proves
    root cannot be regained), names itself `qpy-local USER` and runs the
    delivery in-process (qpy.local.local: no new interpreter per delivery). It
    exits with qmail-local's code and writes its text to the report pipe. The
    parent answers each request with spawn.send_result once every recipient is
    done: K (exit 0), D (exit 100), Z (anything else, a crash, a timeout).

    Deliveries run concurrently (queue-send bounds how many). A child that runs
    longer than `timeoutlocal` (control file, default 3600 s) plus GRACE seconds
    is killed and reported Z (deferred). A child that dies on a signal takes its
    whole session with it (its programs run in it, in their own process groups),
    and lspawn is a child subreaper, so it reaps whatever they leave behind.

    Control files (defaultdelivery, envnoathost, timeoutlocal) are read at
    start and on SIGHUP; users/assign is re-read whenever it changes.

    The recipient's supplementary groups are looked up here, in the parent
    (os.getgrouplist, once per user), and kept for GROUPS_TTL seconds, until
    /etc/group changes, or until SIGHUP, whichever comes first: the child does no
    name-service work at all (libnss would be loaded and initialised again in
    every child). A user added to a group through a non-file source (LDAP,
    sssd) gets the new group within GROUPS_TTL seconds or at once on SIGHUP.

    End of file on fd 0 or SIGTERM: no new requests; wait for the children in
    flight (their results are still sent while the socket lasts), then exit 0.

SECURITY
    Never delivers as uid 0. Refuses a message fd that is not a regular file
    owned by the queue user. The child holds no descriptor but the message and
    its report pipe when user code runs. The child still makes qpy-local's own
    checks (home owned by the user, not writable by group or others) as the
    user, after dropping privileges; only the group lookup moved to the parent.

EXIT CODES
    0 after end of input; 111 when it cannot start (not root, fd 0 not a socket).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import selectors
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field

from qpy.common import address, children, control, privilege, spawn, users
from qpy.common.log import clean, log
from qpy.common.queue import Paths, root_from
from qpy.local import local as qlocal

GRACE = 30              # seconds past timeoutlocal before the parent kills a child
MAX_CHILDREN = 2000     # a hard cap; queue-send's concurrencylocal is far lower
MAX_REPORT = 4000       # bytes of a child's report kept
STOP_WAIT = 60          # seconds SIGTERM waits for deliveries in flight
PR_SET_CHILD_SUBREAPER = 36
GROUPS_TTL = 60.0       # seconds a user's supplementary groups are kept
GROUP_FILE = "/etc/group"
EXIT_TEMP = 111


@dataclass
class Job:
    delivery: int
    msgfd: int
    results: list[tuple[bytes, bytes] | None]
    pending: int = 0


@dataclass
class Child:
    pid: int
    job: Job
    index: int
    fd: int                     # read end of the report pipe
    deadline: float
    report: bytearray = field(default_factory=bytearray)
    status: int | None = None   # wait status once reaped
    eof: bool = False


class LSpawn:
    def __init__(self, root: str, sock: socket.socket):
        self.root = root
        self.sock = sock
        self.ctl = control.Control(root)
        self.children: dict[int, Child] = {}   # by pid
        self.by_fd: dict[int, Child] = {}
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.reload = False
        self.oneuser = Paths(root).oneuser() is not None
        self.queue_uid = self._queue_uid()
        self.groups = GroupCache()
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
            log(f"warning: qpy-lspawn: bad request: {e}")
            return
        except OSError as e:
            log(f"alert: qpy-lspawn: cannot read requests: {e.strerror}")
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
                    log(f"alert: qpy-lspawn: delivery {delivery}: {type(e).__name__}: {e}")
                    job.results[i] = (b"Z", b"Temporary failure in qpy-lspawn. (#4.3.0)")
        self.maybe_done(job)

    def _check_message(self, fd: int) -> bytes | None:
        try:
            st = os.fstat(fd)
        except OSError:
            return b"qpy-lspawn unable to read message (#4.3.0)"
        if not stat.S_ISREG(st.st_mode) or (self.queue_uid >= 0 and st.st_uid != self.queue_uid):
            return b"Sorry, message has wrong type or owner. (#4.3.5)"
        return None

    def start(self, job: Job, index: int, sender: bytes, rcpt: bytes) -> tuple[bytes, bytes] | None:
        """Fork the delivery for one recipient; a result now when none can run."""
        local, domain = address.split(rcpt)
        if not domain:
            return b"D", b"Sorry, address must include host name. (#5.1.3)"
        if not local:
            return b"K", b"empty local part: trash address"
        try:
            who = users.lookup(self.root, local)
        except users.UsersError as e:
            return b"Z", f"Unable to find the owner of this address: {e}. (#4.3.0)".encode()
        if who.uid == 0:
            return b"Z", b"Not allowed to perform deliveries as root. (#4.3.0)"
        if self.oneuser and who.uid != os.getuid():
            return b"Z", b"One-user mode: cannot deliver as another uid. (#4.3.0)"
        if len(self.children) >= MAX_CHILDREN:
            return b"Z", b"Too many deliveries in qpy-lspawn. (#4.3.0)"
        try:
            groups = self.groups.get(who.user, who.gid) if os.getuid() == 0 else []
        except OSError:
            return b"Z", b"Unable to look up the groups of the recipient. (#4.3.0)"
        d = qlocal.Delivery(root=self.root, user=who.user, uid=who.uid, home=who.home,
                            local=local, domain=domain, dash=who.dash, ext=who.ext,
                            sender=sender, msgfd=0, defaultdelivery=self.defaultdelivery,
                            timeout=self.timeout, envnoathost=self.envnoathost)
        try:
            r, w = os.pipe()
        except OSError:
            return b"Z", b"qpy-lspawn unable to create pipe. (#4.3.0)"
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            return b"Z", b"qpy-lspawn unable to fork. (#4.3.0)"
        if pid == 0:
            self.child(d, who, groups, job.msgfd, w)  # never returns
        os.close(w)
        os.set_blocking(r, False)
        c = Child(pid, job, index, r, time.monotonic() + self.timeout + GRACE)
        self.children[pid] = c
        self.by_fd[r] = c
        self.sel.register(r, selectors.EVENT_READ, "child")
        job.pending += 1
        return None

    # ---- the child ------------------------------------------------------------------
    def child(self, d: qlocal.Delivery, who: users.Recipient, groups: list[int], msgfd: int,
              w: int) -> None:
        code = EXIT_TEMP
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            self.sel.close()
            os.setsid()
            os.dup2(msgfd, 0)   # also closes the request socket in this process
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.closerange(3, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0
                          else 65536)
            if os.getuid() == 0:
                privilege.become(who.uid, who.gid, groups)  # groups from the parent's cache
            if os.getuid() == 0 or os.geteuid() == 0:
                raise privilege.PrivilegeError("still root")
            privilege.set_title("qpy-local " + who.user)
            os.umask(0o077)  # as qmail-local: new mail and program files private to the user
            code, text = qlocal.deliver(d)
            os.write(1, text.encode("utf-8", "replace")[:MAX_REPORT])
        except BaseException as e:  # report, never return into the parent's loop
            try:
                os.write(1, f"qpy-local failed: {type(e).__name__}: {e}".encode()[:MAX_REPORT])
            except BaseException:
                pass
            code = EXIT_TEMP
        finally:
            os._exit(code)

    # ---- results --------------------------------------------------------------------
    def readable(self, c: Child) -> None:
        """Read what the child reported so far; at end of file, try to finish it."""
        while True:
            try:
                data = os.read(c.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                break
            if len(c.report) < MAX_REPORT:
                c.report += data[: MAX_REPORT - len(c.report)]
        c.eof = True
        self.sel.unregister(c.fd)
        self.finish(c)

    def reap(self) -> None:
        # also orphans of deliveries: we are their subreaper
        for pid, status in children.exited():
            c = self.children.get(pid)
            if c is not None:
                c.status = status
                self.finish(c)

    def finish(self, c: Child) -> None:
        """Report the child once it has exited and its pipe is drained."""
        if c.status is None:
            return
        if not c.eof:
            self.readable(c)  # drains what is left; its end of file calls finish again
            if not c.eof:  # a writer survived the child: report what we have
                self.sel.unregister(c.fd)
                c.eof = True
        if c.pid not in self.children:
            return
        del self.children[c.pid]
        del self.by_fd[c.fd]
        os.close(c.fd)
        text = bytes(c.report).strip().replace(b"\n", b" ")
        if os.WIFEXITED(c.status):
            code = os.WEXITSTATUS(c.status)
            letter = {0: b"K", 100: b"D"}.get(code, b"Z")
        elif c.deadline <= time.monotonic():
            letter, text = b"Z", b"Delivery timed out; killed. " + text
        else:
            letter, text = b"Z", b"qpy-local crashed. " + text
        if not os.WIFEXITED(c.status):
            kill_session(c.pid)  # its programs must not outlive a killed delivery
        c.job.results[c.index] = (letter, text)
        c.job.pending -= 1
        self.maybe_done(c.job)

    def maybe_done(self, job: Job) -> None:
        if job.pending or any(r is None for r in job.results):
            return
        os.close(job.msgfd)
        results = [r for r in job.results if r is not None]
        try:
            spawn.send_result(self.sock, job.delivery, results)
        except OSError as e:
            log(f"warning: qpy-lspawn: cannot send result {job.delivery}: {e.strerror}")
        for letter, text in results:
            if letter != b"K":
                log(f"qpy-lspawn: delivery {job.delivery}: {letter.decode()} {clean(text)}")

    def kill_overdue(self) -> None:
        now = time.monotonic()
        for c in list(self.children.values()):
            if c.deadline <= now and c.status is None:
                try:
                    os.kill(c.pid, signal.SIGKILL)  # finish() then clears its session
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
        while not (self.stopping and not self.children):
            deadlines = [c.deadline for c in self.children.values()]
            wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            if self.stopping:
                wait = 1.0 if wait is None else min(wait, 1.0)
            for key, _ in self.sel.select(wait):
                if key.data == "sock":
                    if not self.stopping:
                        self.request()
                elif key.data == "wake":
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                elif key.fd in self.by_fd:
                    self.readable(self.by_fd[key.fd])
            while signals:
                sig = signals.pop()
                if sig == signal.SIGTERM:
                    self.stop()
                elif sig == signal.SIGHUP:
                    self._settings()
                    self.groups.clear()
            self.reap()
            self.kill_overdue()
            if self.stopping and time.monotonic() > self.stop_by:
                for c in list(self.children.values()):
                    c.deadline = 0
                self.kill_overdue()
        return 0


def kill_session(sid: int) -> None:
    """SIGKILL every process left in session `sid` (a delivery child's session)."""
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


class GroupCache:
    """Supplementary groups by (user, gid), looked up in lspawn rather than in each child."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], tuple[float, list[int]]] = {}
        self.stamp: tuple[int, int] | None = None

    def clear(self) -> None:
        self.entries.clear()

    def get(self, user: str, gid: int) -> list[int]:
        try:
            st = os.stat(GROUP_FILE)
            stamp = (st.st_ino, st.st_mtime_ns)
        except OSError:
            stamp = None
        if stamp != self.stamp:        # /etc/group changed: nothing cached holds
            self.entries.clear()
            self.stamp = stamp
        now = time.monotonic()
        hit = self.entries.get((user, gid))
        if hit is not None and now - hit[0] < GROUPS_TTL:
            return hit[1]
        # a users/assign name missing from passwd gets its own gid only, as before
        groups = os.getgrouplist(user, gid) if _in_passwd(user) else [gid]
        if len(self.entries) > MAX_CHILDREN:
            self.entries.clear()
        self.entries[(user, gid)] = (now, groups)
        return groups


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
