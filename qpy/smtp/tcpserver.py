"""qpy-tcpserver — accept SMTP connections and fork one session per connection.

SYNOPSIS
    qpy-tcpserver [-h] [ROOT]

RUNS AS
    root only to bind the listening sockets (ports below 1024), then qpyd for
    good, before it reads a byte from the network. Sessions are forked from
    this already-imported process (no new interpreter per connection), run as
    qpyd, and are titled `qpy-smtpd CLIENT-IP`.

READS
    QPY_ROOT (or ROOT); control/smtplisten, control/submissionlisten,
    control/smtpslisten (one ADDRESS:PORT a line, IPv6 in brackets);
    per listener its rules file control/smtprules, control/submissionrules,
    control/smtpsrules (tcprules' text syntax, see qpy.smtp.rules);
    control/maxsmtpd (sessions at once, default 40) and what qpy-smtpd reads.

DOES
    For each connection: the listener's rules (first match; `deny` closes at
    once, `allow` adds its variables), then over maxsmtpd a `421` and close,
    else fork; the child sets the ucspi-tcp environment (PROTO=TCP,
    TCPLOCALIP, TCPLOCALPORT, TCPREMOTEIP, TCPREMOTEPORT, TCPREMOTEHOST only
    with -h, the rule's variables, QPY_LISTENER=smtp|submission|smtps), puts
    the connection on fd 0 and 1 and runs qpy-smtpd's Session in-process.

SIGNALS
    SIGHUP: control files, rules and the recipient table re-read (the listen
    addresses need a restart). SIGTERM: stop accepting, let sessions finish
    for up to SHUTDOWN_GRACE seconds, then end them, then exit 0.

LOGS (stderr, one line per event)
    listening, pid P from IP (listener), end P status S, deny IP,
    busy IP (421 over maxsmtpd), status N/MAX.

EXIT CODES
    0 after SIGTERM; 111 when it cannot listen or drop privileges.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import sys
import time

from qpy.common.control import Control
from qpy.common.log import clean, log
from qpy.common.privilege import preamble, set_title
from qpy.common.queue import root_from
from qpy.smtp import rules as rulesmod
from qpy.smtp import secure, smtpd

PROGRAM = "qpy-tcpserver"
BACKLOG = 1024
SHUTDOWN_GRACE = 30.0       # seconds sessions may take to finish after SIGTERM
KILL_GRACE = 5.0
ACCEPT_BATCH = 16           # connections taken per wakeup of the loop
TICK = 5.0                  # the loop wakes at least this often (reaping, safety)
EXIT_TEMP = 111
BUSY_REPLY = b"421 4.3.2 Too many connections, try again later\r\n"

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


class Server:
    def __init__(self, root: str, lookup_host: bool = False):
        self.root = root
        self.lookup_host = lookup_host
        self.listeners: list[Listener] = []
        self.children: dict[int, str] = {}
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
        self.maxsmtpd = max(1, control.integer("maxsmtpd"))
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
        while not self.stopping:
            for key, _ in sel.select(TICK):
                if key.data is None:
                    self._drain_wakeup()
                elif not self.stopping:
                    for _ in range(ACCEPT_BATCH):
                        if not self._accept(key.data):
                            break
            self._reap()
            if self.reload_wanted:
                self.reload_wanted = False
                try:
                    self.load()
                    log("%s: control files re-read" % PROGRAM)
                except Exception as e:
                    log("%s: cannot re-read control files: %s" % (PROGRAM, clean(str(e))))
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

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            if self.children.pop(pid, None) is not None:
                log("%s: end %d status %d" % (PROGRAM, pid, os.waitstatus_to_exitcode(status)))
                log("%s: status: %d/%d" % (PROGRAM, len(self.children), self.maxsmtpd))

    def _shutdown(self) -> None:
        deadline = time.monotonic() + SHUTDOWN_GRACE
        if self.children:
            log("%s: stopping; waiting for %d sessions" % (PROGRAM, len(self.children)))
        killed = False
        while self.children:
            self._reap()
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
            time.sleep(0.05)
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
            if len(self.children) >= self.maxsmtpd:
                log("%s: busy %s: 421, %d sessions (maxsmtpd)" % (PROGRAM, ip, len(self.children)))
                try:
                    conn.send(BUSY_REPLY, socket.MSG_DONTWAIT)
                except OSError:
                    pass
                return True
            assert self.cfg is not None
            self.cfg.refresh()
            pid = os.fork()
            if pid == 0:
                self._child(conn, lst, peer, rule)
            self.children[pid] = ip
            log("%s: pid %d from %s (%s)" % (PROGRAM, pid, ip, lst.profile))
            log("%s: status: %d/%d" % (PROGRAM, len(self.children), self.maxsmtpd))
        finally:
            conn.close()
        return True

    def _child(self, conn: socket.socket, lst: Listener, peer: tuple,
               rule: rulesmod.Rule | None) -> None:
        """In the forked child: set up fd 0/1 and the environment, run the session."""
        code = 0
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            for fd in self.wakeup:
                os.close(fd)
            self.sel.close()
            for other in self.listeners:
                other.sock.close()
            set_title("qpy-smtpd %s" % peer[0])
            local = conn.getsockname()
            env = os.environ
            for name in [n for n in env if n.startswith("TCP") or n == "RELAYCLIENT"]:
                del env[name]
            env.update(PROTO="TCP", TCPLOCALIP=local[0], TCPLOCALPORT=str(local[1]),
                       TCPREMOTEIP=peer[0], TCPREMOTEPORT=str(peer[1]),
                       QPY_LISTENER=lst.profile)
            if self.lookup_host:
                try:
                    env["TCPREMOTEHOST"] = socket.gethostbyaddr(peer[0])[0].lower()
                except OSError:
                    pass
            if rule is not None:
                env.update(rule.env)
            conn.setblocking(True)
            # replies go out in one write per batch already; do not let Nagle hold them
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            os.dup2(conn.fileno(), 0)
            os.dup2(conn.fileno(), 1)
            conn.close()
            assert self.cfg is not None
            code = smtpd.serve(self.cfg, env)
        except BaseException as e:  # never let a child return into the parent's loop
            if not isinstance(e, SystemExit):
                log("%s: session error: %s" % (PROGRAM, clean(repr(e))))
        finally:
            os._exit(code)


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
