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
    control/maxsmtpd (sessions at once, default 40), control/maxperip
    (sessions at once per client, default 10), control/smtpdsessions
    (sessions per worker, default 100), control/ratelimits (`connections N`,
    `messages N` per client address per minute, qpy.smtp.ratelimit: over it
    `421 4.7.0`, logged as `rate limit`) and what qpy-smtpd reads.

DOES
    The parent alone accepts. For each connection: the listener's rules
    (first match; `deny` closes at once, `allow` adds its variables); then,
    when that client already has maxperip sessions, `421 4.7.0` and close
    (a client is an IPv4 address or an IPv6 /64; a client whose rule sets
    RELAYCLIENT is trusted and exempt, as Postfix exempts mynetworks; 0 turns
    the check off; a malformed maxperip, as a malformed maxsmtpd, gives every
    session `421 4.3.0` and a log line);
    then over maxsmtpd `421 4.3.2` and close; else the socket goes to an idle
    worker over that worker's Unix socketpair (SCM_RIGHTS, with the listener
    name and the rule's variables); with no idle worker one is forked for it.
    The worker writes one byte back when the session is over. Why the parent
    accepts rather than the workers: it then knows exactly how many sessions
    run, in all and per client (a worker is busy from the hand-over until its
    byte arrives), so both caps, their 421 and their log lines stay exact and
    in one place, with no race between processes over accept() and no shared
    counter.

    A worker (qpy.smtp.worker) holds fd 0 and 1 (/dev/null, the client's
    during a session), fd 2 (the log) and fd 3 (its socketpair), nothing else
    of the parent's: no listener, no other worker's pair or client. Per
    connection it sets the ucspi-tcp environment afresh (PROTO=TCP,
    TCPLOCALIP, TCPLOCALPORT, TCPREMOTEIP, TCPREMOTEPORT, TCPREMOTEHOST only
    with -h, the rule's variables, QPY_LISTENER=smtp|submission|smtps) and
    runs qpy-smtpd's Session in-process: nothing of one client's session
    reaches the next.

    The workers are qpy.common.pool's (fork, descriptor clean-up, idle
    workers, retirement, reaping: the same pool as qpy-lspawn's and
    qpy-rspawn's); qpy.smtp.worker holds the policy. POOL_MIN workers are kept
    (forked ahead); more are forked on demand, when no worker is idle, up to
    maxsmtpd busy ones; idle workers beyond POOL_MIN exit one by one after
    IDLE_EXIT seconds without work; a dead worker is replaced. A worker exits
    after smtpdsessions sessions.

WORKER REUSE (control/smtpdsessions)
    A worker that served one client serves the next: nothing of a session's
    objects survives it, but code execution gained in one session (a bug in
    the parser or in Python itself) would stay in the process and see later
    sessions' mail and AUTH passwords, until the worker exits. smtpdsessions
    bounds that: default 100 (Postfix's max_use); 1 forks a fresh process per
    connection (qmail's model, still forked ahead, so the client never waits
    for the fork). What 1 costs is a fork and a worker's start-up per
    connection: docs/security.md gives the measured figure.

SIGNALS
    SIGHUP: control files, rules and the recipient table re-read (the listen
    addresses need a restart); idle workers exit at once and busy ones after
    their session, so every later session runs on the new control files.
    SIGTERM: stop accepting, let sessions finish for up to SHUTDOWN_GRACE
    seconds, then end them, then exit 0.

LOGS (stderr, one line per event)
    listening, pid P from IP (listener) (P: the worker serving it), deny IP,
    maxperip IP (421 over maxperip), busy IP (421 over maxsmtpd), status
    N/MAX (sessions), worker P started, end P status S (a worker ended).

EXIT CODES
    0 after SIGTERM; 111 when it cannot listen or drop privileges.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import NamedTuple

from qpy.common.control import Control, ControlError
from qpy.common.exits import EXIT_TEMP
from qpy.common.log import clean, flush, hold, log, release
from qpy.common.pool import Worker
from qpy.common.privilege import preamble
from qpy.common.queue import root_from
from qpy.common.wakeup import Wakeup
from qpy.smtp import ratelimit, secure, smtpd
from qpy.smtp import rules as rulesmod
from qpy.smtp.listen import PROFILES, Listener
from qpy.smtp.worker import Workers

PROGRAM = "qpy-tcpserver"
SHUTDOWN_GRACE = 30.0       # seconds sessions may take to finish after SIGTERM
ACCEPT_BATCH = 16           # connections taken per wakeup of the loop
TICK = 5.0                  # the loop wakes at least this often (reaping, idle workers)
BUSY_REPLY = b"421 4.3.2 Too many connections, try again later\r\n"
PERIP_REPLY = b"421 4.7.0 Too many connections from your address, try again later\r\n"
RATE_REPLY = PERIP_REPLY
TROUBLE_REPLY = b"421 4.3.0 Temporary problem, try again later\r\n"
ADMISSIONS_KEPT = 4096      # client addresses whose rule match is kept (until SIGHUP)


class Admission(NamedTuple):
    allowed: bool           # not denied by the listener's rules
    key: str                # whose sessions maxperip counts together (rules.client_key)
    trusted: bool           # its rule sets RELAYCLIENT: exempt from maxperip
    order: bytes            # the worker's order: listener and the rule's variables (JSON)


class Server:
    def __init__(self, root: str, lookup_host: bool = False):
        self.root = root
        self.lookup_host = lookup_host
        self.listeners: list[Listener] = []
        self.stopping = False
        self.reload_wanted = False
        self.reap_wanted = False
        self.maxperip = 10
        self.per_ip: dict[str, int] = {}  # sessions running per client_key
        self.admissions: dict[tuple[Listener, str], Admission] = {}   # emptied by load()
        self.sel = selectors.DefaultSelector()
        self.workers = Workers(PROGRAM, self.sel, lookup_host, self._ended)

    def bind(self) -> None:
        control = Control(self.root)
        for profile, listen_name, rules_name in PROFILES:
            for entry in control.lines(listen_name):
                self.listeners.append(Listener(profile, rules_name, entry))
                log("listening on %s (%s)" % (entry, profile))
        if not self.listeners:
            raise ValueError("no listen address in control/smtplisten")
        self.listen_config = [(lst.profile, lst.entry) for lst in self.listeners]
        self.workers.pool.detach.extend(lst.sock for lst in self.listeners)  # not a worker's

    def load(self) -> None:
        """Read control files, rules and the recipient table (at start and on SIGHUP)."""
        control = Control(self.root)
        workers = self.workers
        workers.cfg = cfg = smtpd.Config(self.root)
        self.admissions.clear()           # the rules may have changed
        secure.load(self.root)            # the certificate: read once, before any fork
        try:
            workers.limit = max(1, control.integer("maxsmtpd"))
            self.maxperip = control.integer("maxperip")
        except ControlError as e:      # logged by Control; every session gets 421
            workers.limit, cfg.unusable = 1, str(e)
        workers.sessions = max(1, control.integer("smtpdsessions"))
        ratelimit.shared = ratelimit.RateLimits(control)   # shared with workers forked later
        for lst in self.listeners:
            lst.rules, problems = rulesmod.parse("\n".join(control.lines(lst.rules_name)))
            for p in problems:
                log("control/%s %s" % (lst.rules_name, p))
        wanted = [(p, e) for p, listen_name, _ in PROFILES for e in control.lines(listen_name)]
        if wanted != self.listen_config:
            log("listen addresses changed; they take effect at restart")

    # -- the loop ----------------------------------------------------------------------
    def signals(self) -> None:
        """Catch signals from the very start: a SIGHUP while binding must not kill us."""
        self.sigs = Wakeup((signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT))

    def take_signals(self, woken: bool = True) -> None:
        for sig in self.sigs.take_if(woken):
            if sig == signal.SIGCHLD:
                self.reap_wanted = True
            elif sig == signal.SIGHUP:
                self.reload_wanted = True
            elif sig in (signal.SIGTERM, signal.SIGINT):
                self.stopping = True

    def run(self) -> int:
        sel, workers = self.sel, self.workers
        sel.register(self.sigs.fd, selectors.EVENT_READ, None)
        for lst in self.listeners:
            sel.register(lst.sock, selectors.EVENT_READ, lst)
        workers.tend()
        hold()                            # a pass's log lines: one write, flush() below
        try:
            while not self.stopping:
                # new connections before session ends: a client waits for its 220, and
                # a worker's end is taken in anyway where a count or a free worker is
                # needed (Workers.collect: maxperip, maxsmtpd, no idle worker)
                events = sel.select(TICK)
                if len(events) > 1:
                    events.sort(key=lambda ev: isinstance(ev[0].data, Worker))
                self.take_signals(any(key.data is None for key, _ in events))
                for key, _ in events:
                    if key.data is None:
                        continue                # the signals: taken above
                    elif isinstance(key.data, Worker):
                        workers.readable(key.data)
                    elif not self.stopping:
                        for _ in range(ACCEPT_BATCH):
                            if not self._accept(key.data):
                                break
                if self.reap_wanted:          # after a SIGCHLD only: no wait4 per pass
                    self.reap_wanted = False
                    workers.reap()
                if self.reload_wanted:
                    self.reload_wanted = False
                    try:
                        self.load()
                        workers.recycle()     # workers forked before this are retired
                        log("control files re-read")
                    except Exception as e:
                        log("cannot re-read control files: %s" % (clean(str(e))))
                workers.tend()
                flush()
        finally:
            flush()
            release()
        for lst in self.listeners:
            sel.unregister(lst.sock)
            lst.sock.close()
        workers.shutdown(SHUTDOWN_GRACE, lambda data: self.take_signals())
        log("stopped")
        return 0

    def _status(self) -> None:
        log("status: %d/%d" % (self.workers.nbusy, self.workers.limit))

    def _ended(self, client: str) -> None:
        """A session of client is over (the workers' accounting hook)."""
        left = self.per_ip.get(client, 0) - 1
        if left > 0:
            self.per_ip[client] = left
        else:
            self.per_ip.pop(client, None)
        self._status()

    def _accept(self, lst: Listener) -> bool:
        """Take one connection; False when there was none to take."""
        try:
            # the bare descriptor and the peer's address: socket.accept() would wrap it
            # in a socket object (a getsockname, enum conversions) that only the worker uses
            fd, peer = lst.sock._accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log("accept: %s" % (e.strerror))
                time.sleep(0.1)
                return False
            if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                return True
            raise
        try:
            self._admit(fd, peer, lst)
        finally:
            os.close(fd)                  # the worker has its own descriptor of it
        return True

    def _admission(self, lst: Listener, ip: str) -> Admission:
        """What the listener's rules say of a client address (cached until the rules
        are re-read): allowed, its maxperip key, trusted, the worker's order."""
        rule = rulesmod.match(lst.rules, ip)
        got = Admission(
            rule is None or rule.allow, rulesmod.client_key(ip),
            rule is not None and "RELAYCLIENT" in rule.env,   # as Postfix's mynetworks
            json.dumps({"listener": lst.profile,
                        "env": rule.env if rule is not None else {}}).encode())
        if len(self.admissions) >= ADMISSIONS_KEPT:   # memory stays bounded: start again
            log("info: %d client addresses' admissions forgotten" % len(self.admissions))
            self.admissions.clear()
        self.admissions[(lst, ip)] = got
        return got

    def _admit(self, fd: int, peer: tuple, lst: Listener) -> None:
        """The listener's rules, then maxperip, then maxsmtpd, then a worker."""
        workers = self.workers
        ip = peer[0]
        adm = self.admissions.get((lst, ip)) or self._admission(lst, ip)
        if not adm.allowed:
            log("deny %s (%s)" % (ip, lst.profile))
            return
        if ratelimit.shared is not None and ratelimit.shared.over("connections", ip):
            log("rate limit %s: 421, over %d connections a minute"
                % (ip, ratelimit.shared.limits["connections"]))
            self._refuse(fd, RATE_REPLY)
            return
        key = adm.key
        if self.maxperip and not adm.trusted and self.per_ip.get(key, 0) >= self.maxperip:
            workers.collect(0)        # no wait: a flood of 421s must stay cheap
            if self.per_ip.get(key, 0) >= self.maxperip:
                log("maxperip %s: 421, %d sessions from %s" % (ip, self.per_ip[key], key))
                self._refuse(fd, PERIP_REPLY)
                return
        if workers.nbusy >= workers.limit:
            workers.collect(0)
        if workers.nbusy >= workers.limit:
            log("busy %s: 421, %d sessions (maxsmtpd)" % (ip, workers.nbusy))
            self._refuse(fd, BUSY_REPLY)
            return
        # the peer's address goes with the order: the worker need not ask the kernel
        w = workers.hand_over(fd, b"%d %s %d\n" % (lst.family, ip.encode(), peer[1])
                              + adm.order, key)
        if w is None:
            log("no worker for %s: 421" % (ip))
            self._refuse(fd, TROUBLE_REPLY)
            return
        self.per_ip[key] = self.per_ip.get(key, 0) + 1
        log("pid %d from %s (%s)" % (w.pid, ip, lst.profile))
        self._status()

    @staticmethod
    def _refuse(fd: int, reply: bytes) -> None:
        conn = socket.socket(fileno=fd)   # borrowed: the caller closes fd
        try:
            conn.send(reply, socket.MSG_DONTWAIT)
        except OSError:
            pass
        finally:
            conn.detach()


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
        log("cannot listen: %s" % (clean(str(e))))
        return EXIT_TEMP
    preamble(PROGRAM, root, "qpyd")   # bound: drop to qpyd before any connection
    try:
        server.load()
    except Exception as e:
        log("cannot read control files: %s" % (clean(str(e))))
        return EXIT_TEMP
    return server.run()
