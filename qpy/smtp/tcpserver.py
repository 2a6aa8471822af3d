"""qpy-tcpserver — accept SMTP connections; a pool of forked workers serves them.

SYNOPSIS
    qpy-tcpserver [-h] [ROOT]

RUNS AS
    root only to bind the listening sockets (ports below 1024), then qpyd for
    good, before it reads a byte from the network. Workers are forked from
    this already-imported process (no new interpreter, and no fork per
    connection), run as qpyd, and are titled `qpy-smtpd CLIENT-IP` while they
    serve a session and `qpy-smtpd idle` between sessions.

READS
    QPY_ROOT (or ROOT); control/smtplisten, control/submissionlisten,
    control/smtpslisten (one ADDRESS:PORT a line, IPv6 in brackets);
    per listener its rules file control/smtprules, control/submissionrules,
    control/smtpsrules (tcprules' text syntax, see qpy.smtp.rules);
    control/maxsmtpd (sessions at once, default 40) and what qpy-smtpd reads.

DOES
    The parent alone accepts. For each connection: the listener's rules
    (first match; `deny` closes at once, `allow` adds its variables), then
    over maxsmtpd a `421` and close, else the socket goes to an idle worker
    over that worker's Unix socketpair (SCM_RIGHTS, with the listener name
    and the rule's variables); with no idle worker one is forked for it. The
    worker writes one byte back when the session is over. Why the parent
    accepts rather than the workers: it then knows exactly how many sessions
    run (a worker is busy from the hand-over until its byte arrives), so
    maxsmtpd, its 421 and its log line stay exact and in one place, with no
    race between processes over accept() and no shared counter.

    A worker, per connection: restores the environment it was forked with,
    sets the ucspi-tcp one (PROTO=TCP, TCPLOCALIP, TCPLOCALPORT, TCPREMOTEIP,
    TCPREMOTEPORT, TCPREMOTEHOST only with -h, the rule's variables,
    QPY_LISTENER=smtp|submission|smtps), puts the connection on fd 0 and 1,
    runs qpy-smtpd's Session in-process, then shuts the connection down and
    puts /dev/null on fd 0 and 1. The Session, its Channel, TLS socket and
    Drop are made anew per connection: nothing of one client's session
    reaches the next.

    POOL_MIN workers are kept (forked ahead); more are forked on demand, when
    no worker is idle, up to maxsmtpd busy ones; idle workers beyond POOL_MIN
    exit one by one after IDLE_EXIT seconds without work; a worker exits after
    WORKER_CONNECTIONS sessions (bounds memory); a dead worker is replaced.

SIGNALS
    SIGHUP: control files, rules and the recipient table re-read (the listen
    addresses need a restart); idle workers exit at once and busy ones after
    their session, so every later session runs on the new control files.
    SIGTERM: stop accepting, let sessions finish for up to SHUTDOWN_GRACE
    seconds, then end them, then exit 0.

LOGS (stderr, one line per event)
    listening, pid P from IP (listener) (P: the worker serving it), deny IP,
    busy IP (421 over maxsmtpd), status N/MAX (sessions), worker P started,
    end P status S (a worker ended).

EXIT CODES
    0 after SIGTERM; 111 when it cannot listen or drop privileges.
"""

from __future__ import annotations

import array
import errno
import gc
import json
import os
import select
import selectors
import signal
import socket
import sys
import time

from qpy.common.control import Control, ControlError
from qpy.common.exits import EXIT_TEMP
from qpy.common.log import clean, log
from qpy.common.privilege import preamble, set_title
from qpy.common.queue import root_from
from qpy.smtp import ratelimit, secure, smtpd
from qpy.smtp import rules as rulesmod

PROGRAM = "qpy-tcpserver"
BACKLOG = 1024
SHUTDOWN_GRACE = 30.0       # seconds sessions may take to finish after SIGTERM
KILL_GRACE = 5.0
ACCEPT_BATCH = 16           # connections taken per wakeup of the loop
TICK = 5.0                  # the loop wakes at least this often (reaping, idle workers)
POOL_MIN = 2                # workers kept even when there is no work
IDLE_EXIT = 60.0            # seconds an idle worker beyond POOL_MIN waits before it exits
WORKER_CONNECTIONS = 1000   # sessions one worker serves before it exits (bounds its memory)
HANDOVER_BYTES = 64 * 1024  # largest hand-over message (listener name and rule variables)
END_WAIT = 0.002            # seconds to wait for a session to end before forking a worker
HANDOVER_TRIES = 3          # workers tried for one connection before giving up on it
BUSY_REPLY = b"421 4.3.2 Too many connections, try again later\r\n"
RATE_REPLY = b"421 4.7.0 Too many connections from your address, try again later\r\n"
TROUBLE_REPLY = b"421 4.3.0 Temporary problem, try again later\r\n"
DONE = b"."                 # worker -> parent: the session is over, give me the next
SESSION_ENV = ("PROTO", "RELAYCLIENT", "QPY_LISTENER")   # set per connection (and TCP*)

# (name, listen control file, rules control file): a listener profile per line.
PROFILES = (
    ("smtp", "smtplisten", "smtprules"),
    ("submission", "submissionlisten", "submissionrules"),
    ("smtps", "smtpslisten", "smtpsrules"),
)


def parse_listen(entry: str) -> tuple[int, str, int]:
    """`ADDRESS:PORT` or `[IPV6]:PORT` -> (family, address, port)."""
    host, sep, port = entry.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("bad listen address %r" % entry)
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, host[1:-1], int(port)
    if ":" in host:
        raise ValueError("IPv6 listen address needs brackets: %r" % entry)
    return socket.AF_INET, host or "0.0.0.0", int(port)


class Listener:
    def __init__(self, profile: str, rules_name: str, entry: str):
        family, host, port = parse_listen(entry)
        self.profile = profile
        self.rules_name = rules_name
        self.entry = entry
        self.rules: list[rulesmod.Rule] = []
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind((host, port))
        self.sock.listen(BACKLOG)
        self.sock.setblocking(False)


class Worker:
    """The parent's view of one worker: its end of the socketpair and whether it serves."""

    def __init__(self, pid: int, chan: socket.socket, gen: int):
        self.pid = pid
        self.chan = chan
        self.gen = gen            # control generation it was forked with (SIGHUP: +1)
        self.busy = False
        self.since = time.monotonic()


class Server:
    def __init__(self, root: str, lookup_host: bool = False):
        self.root = root
        self.lookup_host = lookup_host
        self.listeners: list[Listener] = []
        self.children: set[int] = set()          # forked, not yet reaped
        self.workers: dict[int, Worker] = {}     # with an open socketpair
        self.idle: list[Worker] = []             # oldest first; the newest is used first
        self.nbusy = 0
        self.gen = 0
        self.stopping = False
        self.reload_wanted = False
        self.maxsmtpd = 40
        self.cfg: smtpd.Config | None = None

    def bind(self) -> None:
        control = Control(self.root)
        for profile, listen_name, rules_name in PROFILES:
            for entry in control.lines(listen_name):
                self.listeners.append(Listener(profile, rules_name, entry))
                log("%s: listening on %s (%s)" % (PROGRAM, entry, profile))
        if not self.listeners:
            raise ValueError("no listen address in control/smtplisten")
        self.listen_config = [(lst.profile, lst.entry) for lst in self.listeners]

    def load(self) -> None:
        """Read control files, rules and the recipient table (at start and on SIGHUP)."""
        control = Control(self.root)
        self.cfg = smtpd.Config(self.root)
        secure.load(self.root, PROGRAM)   # the certificate: read once, before any fork
        try:
            self.maxsmtpd = max(1, control.integer("maxsmtpd"))
        except ControlError as e:      # logged by Control; every session gets 421
            self.maxsmtpd, self.cfg.unusable = 1, str(e)
        ratelimit.shared = ratelimit.RateLimits(control)   # shared with workers forked later
        for lst in self.listeners:
            lst.rules, problems = rulesmod.parse("\n".join(control.lines(lst.rules_name)))
            for p in problems:
                log("%s: control/%s %s" % (PROGRAM, lst.rules_name, p))
        wanted = [(p, e) for p, listen_name, _ in PROFILES for e in control.lines(listen_name)]
        if wanted != self.listen_config:
            log("%s: listen addresses changed; they take effect at restart" % PROGRAM)

    # -- the loop ----------------------------------------------------------------------
    def signals(self) -> None:
        """Catch signals from the very start: a SIGHUP while binding must not kill us."""
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self.wakeup = (rfd, wfd)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def run(self) -> int:
        rfd = self.wakeup[0]
        sel = self.sel = selectors.DefaultSelector()
        sel.register(rfd, selectors.EVENT_READ, None)
        for lst in self.listeners:
            sel.register(lst.sock, selectors.EVENT_READ, lst)
        self._tend()
        while not self.stopping:
            # session ends before new connections: they free workers the new ones need
            events = sorted(sel.select(TICK), key=lambda ev: not isinstance(ev[0].data, Worker))
            for key, _ in events:
                if key.data is None:
                    self._drain_wakeup()
                elif isinstance(key.data, Worker):
                    self._from_worker(key.data)
                elif not self.stopping:
                    for _ in range(ACCEPT_BATCH):
                        if not self._accept(key.data):
                            break
            self._reap()
            if self.reload_wanted:
                self.reload_wanted = False
                try:
                    self.load()
                    self.gen += 1             # workers forked before this one are recycled
                    for w in list(self.idle):
                        self._retire(w)
                    log("%s: control files re-read" % PROGRAM)
                except Exception as e:
                    log("%s: cannot re-read control files: %s" % (PROGRAM, clean(str(e))))
            self._tend()
        for lst in self.listeners:
            sel.unregister(lst.sock)
            lst.sock.close()
        self._shutdown()
        return 0

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reload_wanted = True

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup[0], 512):
                pass
        except BlockingIOError:
            pass

    def _status(self) -> None:
        log("%s: status: %d/%d" % (PROGRAM, self.nbusy, self.maxsmtpd))

    # -- the workers -------------------------------------------------------------------
    def _spawn(self, conn: socket.socket | None) -> Worker | None:
        """Fork one worker (conn: an accepted socket the child must not keep)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        assert self.cfg is not None
        self.cfg.refresh()                # a rebuilt recipient table: read once, here
        try:
            pid = os.fork()
        except OSError as e:
            mine.close()
            theirs.close()
            log("%s: cannot fork a worker: %s" % (PROGRAM, e.strerror))
            return None
        if pid == 0:
            mine.close()
            self._worker(theirs, conn)    # never returns
        theirs.close()
        w = Worker(pid, mine, self.gen)
        self.children.add(pid)
        self.workers[pid] = w
        self.sel.register(mine, selectors.EVENT_READ, w)
        log("%s: worker %d started" % (PROGRAM, pid))
        return w

    def _retire(self, w: Worker) -> None:
        """Close our end: an idle worker exits at once, a busy one after its session."""
        if self.workers.pop(w.pid, None) is None:
            return
        self.sel.unregister(w.chan)
        w.chan.close()
        if w.busy:
            w.busy = False
            self.nbusy -= 1
            self._status()
        if w in self.idle:
            self.idle.remove(w)

    def _from_worker(self, w: Worker) -> None:
        if self.workers.get(w.pid) is not w:
            return                        # retired earlier in this same round of events
        try:
            data = w.chan.recv(16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:                      # it ended (recycled, killed, crashed)
            self._retire(w)
            return
        if not w.busy:
            return                        # not after a session of ours: ignore it
        w.busy = False
        self.nbusy -= 1
        self._status()
        if w.gen != self.gen or self.stopping:
            self._retire(w)
        else:
            w.since = time.monotonic()
            self.idle.append(w)

    def _collect(self, wait: float) -> None:
        """Take in session ends before counting sessions or forking: a client that got
        its 221 often connects again before its worker has said it is free; waiting up
        to END_WAIT for that saves a needless fork (and a worker kept for IDLE_EXIT)."""
        busy = [w for w in self.workers.values() if w.busy]
        if not busy:
            return
        poll = select.poll()
        for w in busy:
            poll.register(w.chan, select.POLLIN)
        if poll.poll(wait * 1000):
            for w in busy:
                self._from_worker(w)

    def _tend(self) -> None:
        """Keep POOL_MIN workers (forked with the current control files); let the
        oldest idle one beyond them go after IDLE_EXIT seconds without work."""
        now = time.monotonic()
        if len(self.workers) > POOL_MIN and self.idle and now - self.idle[0].since > IDLE_EXIT:
            self._retire(self.idle[0])
        current = sum(1 for w in self.workers.values() if w.gen == self.gen)
        while not self.stopping and current < min(POOL_MIN, self.maxsmtpd - self.nbusy):
            w = self._spawn(None)
            if w is None:
                break
            self.idle.append(w)
            current += 1

    def _hand_over(self, conn: socket.socket, lst: Listener,
                   rule: rulesmod.Rule | None) -> Worker | None:
        """Pass conn to an idle (or new) worker; the worker, or None when none took it."""
        message = json.dumps({"listener": lst.profile,
                              "env": rule.env if rule is not None else {}}).encode()
        if len(message) > HANDOVER_BYTES:
            log("%s: rule variables too long for %s" % (PROGRAM, lst.rules_name))
            return None
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))]
        for _ in range(HANDOVER_TRIES):
            if not self.idle:
                self._collect(END_WAIT)
            w = self.idle.pop() if self.idle else self._spawn(conn)
            if w is None:
                return None
            try:
                w.chan.sendmsg([message], fds)
            except OSError as e:          # it died while idle: the next one
                log("%s: worker %d: hand-over: %s" % (PROGRAM, w.pid, e.strerror))
                self._retire(w)
                continue
            w.busy = True
            self.nbusy += 1
            return w
        return None

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.discard(pid)
                log("%s: end %d status %d" % (PROGRAM, pid, os.waitstatus_to_exitcode(status)))
            w = self.workers.get(pid)
            if w is not None:
                self._retire(w)

    def _shutdown(self) -> None:
        deadline = time.monotonic() + SHUTDOWN_GRACE
        if self.nbusy:
            log("%s: stopping; waiting for %d sessions" % (PROGRAM, self.nbusy))
        for w in list(self.workers.values()):
            if not w.busy:
                self._retire(w)
        killed = False
        while self.children:
            self._reap()
            for key, _ in self.sel.select(0.05):
                if isinstance(key.data, Worker):
                    self._from_worker(key.data)   # a session ended: that worker exits
                elif key.data is None:
                    self._drain_wakeup()
            if not self.children:
                break
            if time.monotonic() > deadline:
                sig = signal.SIGKILL if killed else signal.SIGTERM
                for pid in list(self.children):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                if killed:
                    deadline = time.monotonic() + 3600
                else:
                    killed, deadline = True, time.monotonic() + KILL_GRACE
        log("%s: stopped" % PROGRAM)

    def _accept(self, lst: Listener) -> bool:
        """Take one connection; False when there was none to take."""
        try:
            conn, peer = lst.sock.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log("%s: accept: %s" % (PROGRAM, e.strerror))
                time.sleep(0.1)
                return False
            if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                return True
            raise
        ip = peer[0]
        try:
            rule = rulesmod.match(lst.rules, ip)
            if rule is not None and not rule.allow:
                log("%s: deny %s (%s)" % (PROGRAM, ip, lst.profile))
                return True
            if ratelimit.shared is not None and ratelimit.shared.over("connections", ip):
                log("%s: rate limit %s: 421, over %d connections a minute"
                    % (PROGRAM, ip, ratelimit.shared.limits["connections"]))
                self._refuse(conn, RATE_REPLY)
                return True
            if self.nbusy >= self.maxsmtpd:
                self._collect(0)          # no wait: a flood of 421s must stay cheap
            if self.nbusy >= self.maxsmtpd:
                log("%s: busy %s: 421, %d sessions (maxsmtpd)" % (PROGRAM, ip, self.nbusy))
                self._refuse(conn, BUSY_REPLY)
                return True
            w = self._hand_over(conn, lst, rule)
            if w is None:
                log("%s: no worker for %s: 421" % (PROGRAM, ip))
                self._refuse(conn, TROUBLE_REPLY)
                return True
            log("%s: pid %d from %s (%s)" % (PROGRAM, w.pid, ip, lst.profile))
            self._status()
        finally:
            conn.close()                  # the worker has its own descriptor of it
        return True

    @staticmethod
    def _refuse(conn: socket.socket, reply: bytes) -> None:
        try:
            conn.send(reply, socket.MSG_DONTWAIT)
        except OSError:
            pass

    # -- in a worker -------------------------------------------------------------------
    def _worker(self, chan: socket.socket, conn: socket.socket | None) -> None:
        """The forked worker: serve connections handed over on chan, then exit."""
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, _stop)     # smtpd.serve relies on these two
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            for fd in self.wakeup:
                os.close(fd)
            self.sel.close()
            for lst in self.listeners:
                lst.sock.close()
            for w in self.workers.values():
                w.chan.close()            # else a sibling never sees its EOF
            if conn is not None:
                conn.close()
            set_title("qpy-smtpd idle")
            gc.freeze()                   # the parent's objects: never scanned, never copied
            base = {name: value for name, value in os.environ.items()
                    if not name.startswith("TCP") and name not in SESSION_ENV}
            null = os.open(os.devnull, os.O_RDWR)
            for served in range(1, WORKER_CONNECTIONS + 1):
                got = _receive(chan)
                if got is None:
                    break
                self._session(*got, base, null)
                if served < WORKER_CONNECTIONS:
                    try:
                        chan.send(DONE)
                    except OSError:   # the parent closed our pair (SIGTERM, SIGHUP)
                        break
        except BaseException as e:  # never let a worker return into the parent's loop
            if not isinstance(e, SystemExit):
                log("%s: session error: %s" % (PROGRAM, clean(repr(e))))
        finally:
            os._exit(0)

    def _session(self, conn: socket.socket, profile: str, rule_env: dict[str, str],
                 base: dict[str, str], null: int) -> None:
        """One connection: a fresh environment, fd 0/1, qpy-smtpd's session, clean-up."""
        try:
            peer, local = conn.getpeername(), conn.getsockname()
        except OSError:                   # gone before we looked
            conn.close()
            return
        try:
            set_title("qpy-smtpd %s" % peer[0])
            env = os.environ
            env.clear()                   # nothing of the last client's environment stays
            env.update(base)
            env.update(PROTO="TCP", TCPLOCALIP=local[0], TCPLOCALPORT=str(local[1]),
                       TCPREMOTEIP=peer[0], TCPREMOTEPORT=str(peer[1]),
                       QPY_LISTENER=profile)
            if self.lookup_host:
                try:
                    env["TCPREMOTEHOST"] = socket.gethostbyaddr(peer[0])[0].lower()
                except OSError:
                    pass
            env.update(rule_env)
            conn.setblocking(True)
            # replies go out in one write per batch already; do not let Nagle hold them
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            os.dup2(conn.fileno(), 0)
            os.dup2(conn.fileno(), 1)
            assert self.cfg is not None
            self.cfg.refresh()
            smtpd.serve(self.cfg, env)
        finally:
            try:                          # the end for the client, whatever still holds a dup
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
            os.dup2(null, 0)
            os.dup2(null, 1)
            set_title("qpy-smtpd idle")


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _receive(chan: socket.socket) -> tuple[socket.socket, str, dict[str, str]] | None:
    """The next connection from the parent; None when the parent closed our pair."""
    fds = array.array("i")
    msg, ancillary, flags, _ = chan.recvmsg(HANDOVER_BYTES, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if not msg or len(fds) != 1 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        return None
    conn = socket.socket(fileno=fds[0])
    try:
        order = json.loads(msg)
        return conn, str(order["listener"]), {str(k): str(v) for k, v in order["env"].items()}
    except (ValueError, KeyError, AttributeError):
        conn.close()
        return None


def main() -> int:
    args = sys.argv[1:]
    lookup = False
    if args and args[0] == "-h":
        lookup, args = True, args[1:]
    root = root_from(args[:1] or None)
    preamble(PROGRAM, root, None)
    server = Server(root, lookup)
    server.signals()
    try:
        server.bind()
    except (OSError, ValueError) as e:
        log("%s: cannot listen: %s" % (PROGRAM, clean(str(e))))
        return EXIT_TEMP
    preamble(PROGRAM, root, "qpyd")   # bound: drop to qpyd before any connection
    try:
        server.load()
    except Exception as e:
        log("%s: cannot read control files: %s" % (PROGRAM, clean(str(e))))
        return EXIT_TEMP
    return server.run()
