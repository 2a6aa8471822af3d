"""qpy-start — start qpy's services with the wiring between them, supervise, collect logs.

SYNOPSIS
    qpy-start [ROOT] [--only NAME] [--no-newrcpt]
                                         (ROOT: first argument, else QPY_ROOT, else /var/qpy)

RUNS AS
    root, doing nothing else but start, wire, watch and signal: it must be able to
    restart qpy-lspawn. Every program is exec'd from its launcher beside this one
    (qpy.common.paths.BINDIR) as root with the environment {QPY_ROOT, PATH=/usr/bin:/bin}
    and drops its own privileges in its preamble. In a one-user root it runs as that
    user and says `one-user mode`.

SERVICES (design §8; --only NAME starts just one)
    send    qpy-clean, qpy-lspawn, qpy-rspawn (skipped, with a log line, while its
            launcher is missing) and qpy-queue-send, wired:
              queue-send fd 3 = SOCK_SEQPACKET to lspawn (lspawn's fd 0)
              queue-send fd 4 = SOCK_SEQPACKET to rspawn (rspawn's fd 0; /dev/null without it)
              queue-send fd 5 -> clean fd 0, clean fd 1 -> queue-send fd 6 (pipes)
            lspawn and rspawn have /dev/null on fd 1. If any of the four dies the
            whole group is stopped and restarted, since the pipes are shared.
    pickup  qpy-pickup
    smtpd   qpy-tcpserver, only when control/smtplisten exists
    authd   qpy-authd, only when auth/passwd holds a user or control/checkpassword
            or control/dovecotauth exists; looked at every second while authd
            is not running, so the first qpy-passwd on a running system (or a
            new control/checkpassword) starts it within seconds, no restart

LOG
    every child's stderr is read here and printed to stdout, one line each, as
    `TIMESTAMP SERVICE PROGRAM: text`; qpy-start's own lines name `start`.
    No log pipe may stall a service: each child's pipe is enlarged (LOG_PIPE) and read
    when it has data (once every LOG_ROUND after a second of over LOG_BUSY lines); the
    lines wait in a bounded buffer (OUT_MAX) until stdout takes them (a plain file: at
    once); past that bound lines are dropped and counted, rather than block.

WRITES
    queue/run/NAME.pid (root-owned) for each child program, NAME without `qpy-`.

SIGNALS
    ALRM: to queue-send.  HUP: to queue-send and pickup at once; qpy-newrcpt is
    run as a child like the others (killed after NEWRCPT_TIMEOUT) and tcpserver gets
    its HUP when the table is built. At start, smtpd waits for that first table.
    --no-newrcpt: the service manager runs qpy-newrcpt (qpy-smtpd.service does, with
    ExecStartPre=+ and ExecReload=+, outside the ProtectHome=yes that hides homes).
    TERM, INT: queue-send, pickup, tcpserver and authd get TERM; the spawners and
    clean end when queue-send closes their pipes; whatever is still running after
    STOP_WAIT seconds is killed; exit 0.
    A dead part is restarted after a back-off (1 s doubling to MAX_BACKOFF).

EXIT CODES
    0 after TERM; 100 usage; 111 cannot start.

NOTES
    Over 400 lines (500, 58 of them this page): the supervisor loop, the send group's
    pipes, log collection with its bounded buffers and qpy-newrcpt as a child share
    one event loop and its state; cut apart, that state would pass between modules.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from qpy.common import children, durable
from qpy.common.exits import EXIT_TEMP, EXIT_USAGE
from qpy.common.log import Outbox, clean
from qpy.common.paths import program
from qpy.common.privilege import preamble
from qpy.common.queue import Paths, root_from
from qpy.common.wakeup import Wakeup

PROGRAM = "qpy-start"
SERVICES = ("send", "pickup", "smtpd", "authd")
SEND_GROUP = ("clean", "lspawn", "rspawn", "queue-send")
STOP_WAIT = 75.0            # queue-send gives in-flight deliveries 60 s after TERM
MIN_BACKOFF = 1.0
MAX_BACKOFF = 60.0
STABLE_RUN = 2.0            # a service that ran this long restarts after MIN_BACKOFF;
                            # one that dies sooner is crash-looping: the wait doubles
NEWRCPT_TIMEOUT = 300      # seconds qpy-newrcpt may take
MAX_LINE = 4096             # longer child log lines are cut
LOG_PIPE = 1 << 20          # each child's log pipe (F_SETPIPE_SZ; the default is 64 KiB)
OUT_MAX = 8 << 20           # log bytes waiting for stdout before lines are dropped
READS_PER_ROUND = 16        # a chatty child cannot keep the others waiting
LOG_ROUND = 0.02            # while mail flows the log pipes are read at most this often
LOG_BUSY = 1000             # log lines in a second that mean mail flows (~100 messages)
CHILD_PATH = "/usr/bin:/bin"
FORWARDED = {signal.SIGALRM, signal.SIGHUP, signal.SIGUSR1}
HUP_TO = ("pickup", "tcpserver", "authd")


_second = [-1, ""]          # the last second formatted, and its text (strftime is slow)


def stamp() -> str:
    t = time.time()
    if int(t) != _second[0]:
        _second[:] = int(t), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
    return "%s.%06d" % (_second[1], (t % 1) * 1e6)


OUTPUT = Outbox(OUT_MAX)


def out(service: str, prog: str, text: str) -> None:
    """One log line; a line that starts with qpy- names its program already."""
    if text.startswith("qpy-"):
        line = "%s %s %s\n" % (stamp(), service, text)
    else:
        line = "%s %s %s: %s\n" % (stamp(), service, prog, text)
    OUTPUT.add(line.encode("utf-8", "replace"))


def say(text: str) -> None:
    out("start", "qpy-start", text)


@dataclass
class Child:
    service: str
    prog: str            # without qpy-
    pid: int
    logfd: int
    buf: bytes = b""


@dataclass
class Service:
    name: str
    children: dict[int, Child] = field(default_factory=dict)
    started: float = 0.0
    backoff: float = MIN_BACKOFF
    restart_at: float = 0.0        # 0: running or not wanted; else when to start it
    stopping: float = 0.0          # when the group was told to stop (kill after STOP_WAIT)


class Starter:
    def __init__(self, root: str, only: str | None, table: bool = True):
        self.root = root
        self.paths = Paths(root)
        self.only = only
        self.env = {"QPY_ROOT": root, "PATH": CHILD_PATH}
        self.services = {n: Service(n) for n in SERVICES if only in (None, n)}
        self.terminating = 0.0
        self.rcpt: Child | None = None          # a running qpy-newrcpt
        self.rcpt_deadline = 0.0
        self.rcpt_again = False
        self.auth_look = 0.0                    # when authd's files are looked at next
        self.table_first = True                 # smtpd starts after the first table
        self.table = table                      # False: the service manager runs newrcpt
        self.lines = 0                          # log lines read in this second

    # --- starting -----------------------------------------------------------------
    def exists(self, prog: str) -> bool:
        return os.access(program("qpy-" + prog), os.X_OK)

    def wanted(self, name: str) -> bool:
        if name == "smtpd":
            return os.path.exists(os.path.join(self.paths.control, "smtplisten"))
        if name == "authd":
            if any(os.path.exists(os.path.join(self.paths.control, n))
                   for n in ("checkpassword", "dovecotauth")):
                return True   # these backends need no auth/passwd
            try:
                return os.path.getsize(os.path.join(self.root, "auth", "passwd")) > 0
            except OSError:
                return False
        return True

    def fork(self, prog: str, fdmap: dict[int, int], args: tuple[str, ...] = (),
             log_stdout: bool = False) -> tuple[int, int]:
        """fork, put fdmap's sources on its target fds, exec the launcher: (pid, log fd)."""
        path = program("qpy-" + prog)
        logr, logw = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):   # above pipe-max-size the default still works
            fcntl.fcntl(logr, fcntl.F_SETPIPE_SZ, LOG_PIPE)
        fdmap = dict(fdmap)
        fdmap[2] = logw
        if log_stdout:
            fdmap[1] = logw
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        for fd in (0, 1):
            fdmap.setdefault(fd, devnull)
        fdmap = {t: (devnull if src == -1 else src) for t, src in fdmap.items()}
        # a forwarded signal must not kill a program still starting up: queue-send
        # gets them blocked (it unblocks once its handlers are set, so an early SIGALRM
        # still counts); the others ignore HUP until they set a handler
        pid = children.fork_exec(path, [path, *args], self.env, fdmap,
                                 FORWARDED if prog == "queue-send" else set(),
                                 {signal.SIGHUP} if prog in HUP_TO else set())
        os.close(logw)
        os.close(devnull)
        os.set_blocking(logr, False)
        return pid, logr

    def spawn(self, svc: Service, prog: str, fdmap: dict[int, int]) -> None:
        pid, logr = self.fork(prog, fdmap)
        svc.children[pid] = Child(svc.name, prog, pid, logr)
        try:
            # durable: temp name, fsync, rename, fsync dir (qpy.common.durable)
            durable.write_file(self.paths.run, prog + ".pid", b"%d\n" % pid, mode=0o600)
        except OSError as e:
            say("warning: cannot write %s.pid: %s" % (prog, e.strerror))

    def start(self, svc: Service) -> None:
        svc.restart_at = 0.0
        svc.stopping = 0.0
        svc.started = time.monotonic()
        if svc.name == "send":
            self.start_send(svc)
        elif svc.name == "pickup":
            self._start_one(svc, "pickup")
        elif svc.name == "smtpd":
            self._start_one(svc, "tcpserver")
        elif svc.name == "authd":
            self._start_one(svc, "authd")

    def _start_one(self, svc: Service, prog: str) -> None:
        if not self.exists(prog):
            say("warning: %s: qpy-%s is missing, not started" % (svc.name, prog))
            return
        say("starting %s: qpy-%s" % (svc.name, prog))
        self.spawn(svc, prog, {})

    def start_send(self, svc: Service) -> None:
        for prog in ("clean", "lspawn", "queue-send"):
            if not self.exists(prog):
                say("warning: send: qpy-%s is missing, send not started" % prog)
                return
        say("starting send: qpy-clean, qpy-lspawn, qpy-rspawn, qpy-queue-send")
        kind = socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        ls_q, ls_s = socket.socketpair(socket.AF_UNIX, kind)
        q2c_r, q2c_w = os.pipe2(os.O_CLOEXEC)
        c2q_r, c2q_w = os.pipe2(os.O_CLOEXEC)
        opened = [ls_q, ls_s]
        qfds = {3: ls_q.fileno(), 5: q2c_w, 6: c2q_r}
        try:
            self.spawn(svc, "clean", {0: q2c_r, 1: c2q_w})
            self.spawn(svc, "lspawn", {0: ls_s.fileno()})
            if self.exists("rspawn"):
                rs_q, rs_s = socket.socketpair(socket.AF_UNIX, kind)
                opened += [rs_q, rs_s]
                self.spawn(svc, "rspawn", {0: rs_s.fileno()})
                qfds[4] = rs_q.fileno()
            else:
                say("warning: send: qpy-rspawn is missing; remote mail waits in the queue")
                qfds[4] = -1    # /dev/null: no stray descriptor can land on fd 4
            self.spawn(svc, "queue-send", qfds)
        finally:
            # only the children hold the pipes now: an exit is seen as end of file
            for s in opened:
                s.close()
            for fd in (q2c_r, q2c_w, c2q_r, c2q_w):
                os.close(fd)

    # --- running ------------------------------------------------------------------
    def child(self, prog: str) -> Child | None:
        for svc in self.services.values():
            for c in svc.children.values():
                if c.prog == prog:
                    return c
        return None

    def signal(self, prog: str, sig: int) -> None:
        c = self.child(prog)
        if c is not None:
            kill(c.pid, sig)

    def stop(self, svc: Service) -> None:
        """Ask a service to end: TERM to its front program; the rest follow by EOF."""
        if svc.stopping:
            return
        svc.stopping = time.monotonic()
        for c in svc.children.values():
            # not the spawners nor clean: they end by EOF when queue-send is gone
            if c.prog in ("queue-send", "pickup", "tcpserver", "authd"):
                kill(c.pid, signal.SIGTERM)

    def reap(self) -> None:
        for pid, status in children.exited():
            if self.rcpt is not None and pid == self.rcpt.pid:
                self.rcpt_done(status)
                continue
            for svc in self.services.values():
                c = svc.children.pop(pid, None)
                if c is None:
                    continue
                self.drain(c, final=True)
                os.close(c.logfd)
                try:
                    os.unlink(os.path.join(self.paths.run, c.prog + ".pid"))
                except OSError:
                    pass
                say("%s: qpy-%s (pid %d) %s" % (svc.name, c.prog, pid, describe(status)))
                if not self.terminating:
                    self.stop(svc)     # the group shares pipes: all of it restarts
                    if not svc.children:
                        ran = time.monotonic() - svc.started
                        svc.backoff = MIN_BACKOFF if ran >= STABLE_RUN else \
                            min(MAX_BACKOFF, svc.backoff * 2)
                        svc.restart_at = time.monotonic() + svc.backoff
                        say("%s: restarting in %.0f s" % (svc.name, svc.backoff))

    def drain(self, c: Child, final: bool = False) -> None:
        for _ in range(READS_PER_ROUND if not final else 1 << 30):
            try:
                data = os.read(c.logfd, 65536)
            except OSError:
                break
            c.buf += data
            if not data or len(data) < 65536 and not final:
                break       # emptied the pipe; select() tells when there is more
        lines = c.buf.split(b"\n")
        c.buf = lines.pop()
        if c.buf and (final or len(c.buf) > MAX_LINE):
            lines.append(c.buf)
            c.buf = b""
        if lines:   # one stamp and one write for all the lines read together
            # a qpy program names itself (qpy.common.log); anything else gets the name
            # of the program whose pipe it came through
            head = "%s %s " % (stamp(), c.service)
            named = head + "qpy-%s: " % c.prog
            text = "".join((head if line.startswith(b"qpy-") else named)
                           + clean(line, MAX_LINE) + "\n" for line in lines)
            OUTPUT.add(text.encode("utf-8", "replace"))
            self.lines += len(lines)

    def handle_signals(self, flags: list[int]) -> None:
        if signal.SIGALRM in flags:
            self.signal("queue-send", signal.SIGALRM)
        if signal.SIGHUP in flags:
            for prog in ("queue-send", "pickup", "authd"):
                self.signal(prog, signal.SIGHUP)
            self.newrcpt()      # tcpserver's HUP follows the new table
        if (signal.SIGTERM in flags or signal.SIGINT in flags) and not self.terminating:
            say("stopping")
            self.terminating = time.monotonic()
            for svc in self.services.values():
                svc.restart_at = 0.0
                self.stop(svc)
            if self.rcpt is not None:
                kill(self.rcpt.pid, signal.SIGTERM)

    def newrcpt(self) -> None:
        """Rebuild the SMTP recipient table (design §8) in a child, when installed;
        a HUP while one runs makes one more run after it."""
        if self.rcpt is not None:
            self.rcpt_again = True
            return
        if not self.table or not self.exists("newrcpt"):
            self.rcpt_finished()
            return
        try:
            pid, logr = self.fork("newrcpt", {}, (self.root,), log_stdout=True)
        except OSError as e:
            say("warning: qpy-newrcpt: %s" % e.strerror)
            self.rcpt_finished()
            return
        self.rcpt = Child("start", "newrcpt", pid, logr)
        self.rcpt_deadline = time.monotonic() + NEWRCPT_TIMEOUT

    def rcpt_done(self, status: int) -> None:
        c, self.rcpt = self.rcpt, None
        assert c is not None
        self.drain(c, final=True)
        os.close(c.logfd)
        if status:
            say("warning: qpy-newrcpt (pid %d) %s" % (c.pid, describe(status)))
        self.rcpt_finished()
        if self.rcpt_again and not self.terminating:
            self.rcpt_again = False
            self.newrcpt()

    def rcpt_finished(self) -> None:
        """A table is built: the listener starts (the first time) or re-reads it."""
        self.signal("tcpserver", signal.SIGHUP)
        smtpd = self.services.get("smtpd")
        first, self.table_first = self.table_first, False
        if first and smtpd is not None and not self.terminating:
            self.start(smtpd) if self.wanted("smtpd") else say("smtpd: not configured")

    def check_rcpt(self, now: float) -> None:
        if self.rcpt is not None and now > self.rcpt_deadline:
            say("warning: qpy-newrcpt did not finish in %d s, killing it" % NEWRCPT_TIMEOUT)
            kill(self.rcpt.pid, signal.SIGKILL)
            self.rcpt_deadline = now + NEWRCPT_TIMEOUT

    def run(self, sigs: Wakeup) -> int:
        if self.paths.oneuser():
            say("one-user mode: every program runs as %s, not under separate users"
                % self.paths.oneuser())
        for svc in self.services.values():
            if svc.name == "smtpd":
                continue        # after the first recipient table (rcpt_finished)
            if self.wanted(svc.name):
                self.start(svc)
            else:
                say("%s: not configured, not started" % svc.name)
        self.newrcpt()
        to_file = os.path.isfile("/proc/self/fd/1")     # a write there never waits
        flags, last_round, busy, second = sigs.take(), 0.0, False, 0.0
        while True:
            self.handle_signals(flags)
            if signal.SIGCHLD in flags:
                self.reap()
            now = time.monotonic()
            self.check_rcpt(now)
            live = [c for s in self.services.values() for c in s.children.values()]
            if self.rcpt is not None:
                live.append(self.rcpt)
            if self.terminating and not live:
                say("stopped")
                OUTPUT.flush_all(1)
                return 0
            for svc in self.services.values():
                if svc.stopping and svc.children and now - svc.stopping > STOP_WAIT:
                    for c in svc.children.values():
                        say("%s: qpy-%s did not stop, killing it" % (svc.name, c.prog))
                        kill(c.pid, signal.SIGKILL)
                    svc.stopping = now      # and wait for the kill to be reaped
                if svc.restart_at and now >= svc.restart_at and not self.terminating:
                    self.start(svc)
                elif svc.name == "authd" and not (svc.children or svc.restart_at or
                                                  self.terminating or now < self.auth_look):
                    self.auth_look = now + 1.0      # once a second, not at every log line
                    if self.wanted("authd"):
                        say("authd: configured now")    # the first qpy-passwd: no restart
                        self.start(svc)
            if now >= second:       # mail flows: a line waits for the next round
                busy, self.lines, second = self.lines >= LOG_BUSY, 0, now + 1.0
            pause = last_round + LOG_ROUND - now if busy else 0.0
            fds = [sigs.fd] + ([c.logfd for c in live] if pause <= 0 else [])
            try:
                ready, writable, _ = select.select(fds, [1] if OUTPUT.buf else [], [],
                                                   pause if pause > 0 else 1.0)
            except InterruptedError:
                ready, writable = [], []
            for c in (c for c in live if c.logfd in ready):
                self.drain(c)
                last_round = now
            if to_file:
                OUTPUT.flush_all(1)
            elif writable:
                OUTPUT.flush(1)
            flags = sigs.take_if(sigs.fd in ready)


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exited %d" % os.waitstatus_to_exitcode(status)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    only = None
    table = "--no-newrcpt" not in args      # the systemd unit runs it (ExecReload=+)
    args = [a for a in args if a != "--no-newrcpt"]
    if "--only" in args:
        i = args.index("--only")
        if i + 1 >= len(args) or args[i + 1] not in SERVICES:
            sys.stderr.write("usage: qpy-start [ROOT] [--only %s]\n" % "|".join(SERVICES))
            return EXIT_USAGE
        only = args[i + 1]
        args = args[:i] + args[i + 2:]
    if len(args) > 1:
        sys.stderr.write("usage: qpy-start [ROOT] [--only %s]\n" % "|".join(SERVICES))
        return EXIT_USAGE
    root = root_from(args[:1])
    preamble(PROGRAM, root, None, root)
    paths = Paths(root)
    if os.getuid() != 0 and not paths.oneuser():
        sys.stderr.write("qpy-start: must run as root (or own a one-user root)\n")
        return EXIT_TEMP
    if not os.path.isdir(paths.queue):
        sys.stderr.write("qpy-start: %s is not a qpy root (run qpy-install)\n" % root)
        return EXIT_TEMP
    os.chdir("/")
    sigs = Wakeup((signal.SIGALRM, signal.SIGHUP, signal.SIGTERM, signal.SIGINT,
                   signal.SIGCHLD))
    return Starter(root, only, table).run(sigs)


if __name__ == "__main__":
    sys.exit(main())
