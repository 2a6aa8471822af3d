"""systems — the two MTAs under test, side by side on loopback, and the bench user.

Postfix runs as a private instance (`postfix -c DIR start`) with its own config, queue
and data directories under BASE/postfix, its own port and domain, `home_mailbox =
Maildir/` and every durability setting left at Postfix's defaults. qpy runs from a root
under BASE/qpy installed with `qpy-install ROOT --me bench.example --smtp 127.0.0.1:PORT`
and started in the foreground with `qpy-start ROOT`. Both deliver to the same real Unix
user (qbench), whose Maildir the harness empties between runs.

Both expose the same small interface: start/stop, the SMTP port and local domain, the
sendmail command line, the root processes of the system (for RSS and strace) and
whether the queue is empty.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time

import psutil

# Overridable so that two engineers' runs on one machine do not reset each other's
# base (reset_base stops the qpy and Postfix it finds there) or empty each other's Maildir.
BASE = os.environ.get("QPY_BENCH_BASE", "/var/tmp/qpybench")
USER = os.environ.get("QPY_BENCH_USER", "qbench")
PREFIX = os.environ.get("QPY_PREFIX", "/opt/qpy")
PYTHON = os.path.join(PREFIX, "venv", "bin", "python3")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_greeting(port: int, timeout: float) -> None:
    """Until a 220 greeting comes from 127.0.0.1:port (the listener is ready)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                data = s.recv(512)
                if data.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
                last = RuntimeError("greeting %r" % data[:80])
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise RuntimeError("no SMTP greeting on port %d: %s" % (port, last))


def end(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
    """Signal a helper we started and reap it; SIGKILL if it does not go in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench_user() -> pwd.struct_passwd:
    """The real bench user, created on first use, with an empty ~/Maildir."""
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        home = os.path.join("/var/tmp", USER + "-home")
        subprocess.run(["useradd", "-m", "-d", home, "-s", "/usr/sbin/nologin", USER],
                       check=True)
        pw = pwd.getpwnam(USER)
    os.makedirs(pw.pw_dir, exist_ok=True)
    os.chown(pw.pw_dir, pw.pw_uid, pw.pw_gid)
    os.chmod(pw.pw_dir, 0o711)
    try:
        os.unlink(os.path.join(pw.pw_dir, "Mailbox"))  # left by a --quick failure check
    except FileNotFoundError:
        pass
    for sub in ("", "/new", "/cur", "/tmp"):
        d = pw.pw_dir + "/Maildir" + sub
        os.makedirs(d, exist_ok=True)
        os.chown(d, pw.pw_uid, pw.pw_gid)
        os.chmod(d, 0o700)
    return pw


def maildir_new(pw: pwd.struct_passwd) -> str:
    return os.path.join(pw.pw_dir, "Maildir", "new")


DELIVERED = "/var/tmp/qpybench-delivered"   # beside the bench user's home: one filesystem


def empty_maildir(pw: pwd.struct_passwd) -> None:
    """Empty the bench user's Maildir before a run, then sync(2): every run starts from
    a clean filesystem. Without the sync, these changes and whatever the previous run
    left dirty would be written back inside the next run, paid for by a system that
    syncs the whole filesystem (qpy-pickup's syncfs) and not by one that fsyncs only its
    own files (Postfix).

    The delivered files are moved aside (DELIVERED, removed by clear_delivered() when the
    benchmark ends), not unlinked: on an ext4 without a journal the inode allocator steps
    over every recently freed inode, so 2,000 unlinks here made each Maildir creation of
    the next run cost about 0.5 ms for either system (bench/README.md). Maildir names
    are unique, so they keep their own (a leftover of an interrupted run is never
    replaced, which would free its inode in the middle of a run)."""
    os.makedirs(DELIVERED, mode=0o700, exist_ok=True)
    for sub in ("new", "cur", "tmp"):
        d = os.path.join(pw.pw_dir, "Maildir", sub)
        with os.scandir(d) as it:
            for e in it:
                try:
                    os.rename(e.path, os.path.join(DELIVERED, e.name))
                except OSError as err:
                    if err.errno != errno.EXDEV:
                        raise
                    os.unlink(e.path)    # a home on another filesystem: the old way
    os.sync()


def clear_delivered() -> None:
    """Remove the delivered files moved aside (once the measuring is over)."""
    shutil.rmtree(DELIVERED, ignore_errors=True)


def count_files(*dirs: str) -> int:
    """Entries under these directories, recursively (queue files, hashed or not)."""
    n = 0
    for top in dirs:
        for _, _, files in os.walk(top):
            n += len(files)
    return n


def tree(pids: list[int]) -> list[psutil.Process]:
    """These processes and all their descendants that are alive now."""
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs[pid] = p
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.NoSuchProcess:
            pass
    return list(procs.values())


class Postfix:
    name = "Postfix"
    domain = "pfbench.example"

    def __init__(self, base: str, relay_port: int):
        self.dir = os.path.join(base, "postfix")
        self.etc = os.path.join(self.dir, "etc")
        self.spool = os.path.join(self.dir, "spool")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.relay_port = relay_port
        self.log = os.path.join(self.dir, "maillog")

    def setup(self) -> None:
        for d in (self.etc, self.spool, self.data):
            os.makedirs(d, exist_ok=True)
        pf = pwd.getpwnam("postfix")
        os.chown(self.data, pf.pw_uid, pf.pw_gid)
        os.chmod(self.data, 0o700)
        # Durability and concurrency: Postfix's defaults. Only names, paths, the port,
        # no chroot (its chroot would need a copied /etc) and a log file (no syslog here).
        main = f"""compatibility_level = 3.6
queue_directory = {self.spool}
data_directory = {self.data}
myhostname = {self.domain}
mydomain = {self.domain}
myorigin = {self.domain}
mydestination = {self.domain}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps = unix:passwd.byname
home_mailbox = Maildir/
relayhost = [127.0.0.2]:{self.relay_port}
maillog_file = {self.log}
maillog_file_prefixes = {self.dir}
syslog_name = qpybench-postfix
smtputf8_enable = no
biff = no
"""
        services = [
            ("127.0.0.1:%d" % self.port, "inet", "n", "smtpd"),
            ("pickup", "unix", "n", "pickup"), ("cleanup", "unix", "n", "cleanup"),
            ("qmgr", "unix", "n", "qmgr"), ("rewrite", "unix", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "bounce"), ("defer", "unix", "-", "bounce"),
            ("trace", "unix", "-", "bounce"), ("verify", "unix", "-", "verify"),
            ("flush", "unix", "n", "flush"), ("proxymap", "unix", "-", "proxymap"),
            ("smtp", "unix", "-", "smtp"), ("relay", "unix", "-", "smtp"),
            ("showq", "unix", "n", "showq"), ("error", "unix", "-", "error"),
            ("retry", "unix", "-", "error"), ("discard", "unix", "-", "discard"),
            ("local", "unix", "-", "local"), ("anvil", "unix", "-", "anvil"),
            ("scache", "unix", "-", "scache"), ("postlog", "unix-dgram", "n", "postlogd"),
        ]
        # The process limits of Debian's master.cf (wakeup and max process count).
        limits = {"pickup": ("60", "1"), "qmgr": ("300", "1"), "cleanup": ("-", "0"),
                  "bounce": ("-", "0"), "defer": ("-", "0"), "trace": ("-", "0"),
                  "verify": ("-", "1"), "flush": ("1000?", "0"), "anvil": ("-", "1"),
                  "scache": ("-", "1"), "postlog": ("-", "1")}
        lines = []
        for svc, typ, private, cmd in services:
            wake, maxproc = limits.get(svc, ("-", "-"))
            unpriv = "n" if svc == "local" else "-"  # local delivery needs root to setuid
            lines.append(f"{svc} {typ} {private} {unpriv} n {wake} {maxproc} {cmd}")
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(main)
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def _postfix(self, *args: str) -> None:
        r = subprocess.run(["postfix", "-c", self.etc, *args], capture_output=True, text=True)
        if r.returncode != 0:
            tail = _tail(self.log)
            raise RuntimeError("postfix %s failed: %s%s\n%s" % (" ".join(args), r.stdout,
                                                                r.stderr, tail))

    def start(self) -> None:
        self._postfix("start")
        wait_greeting(self.port, START_TIMEOUT)

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.spool, "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        if pid is None or not psutil.pid_exists(pid):
            return
        procs = tree([pid])
        subprocess.run(["postfix", "-c", self.etc, "stop"], capture_output=True)
        _, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT)
        for p in alive:
            p.kill()

    def roots(self) -> list[int]:
        pid = self.master_pid()
        return [pid] if pid else []

    def sendmail(self) -> tuple[list[str], dict[str, str]]:
        return ["/usr/sbin/sendmail"], {"MAIL_CONFIG": self.etc}

    def queued(self) -> int:
        return count_files(*(os.path.join(self.spool, d) for d in
                             ("maildrop", "incoming", "active", "deferred")))

    def flush(self) -> None:
        """Retry deferred mail now (after a run that left some)."""
        subprocess.run(["postqueue", "-c", self.etc, "-f"], capture_output=True)

    def set_milter(self, endpoint: str | None) -> None:
        """smtpd_milters = endpoint (None: none), and a reload."""
        subprocess.run(["postconf", "-c", self.etc, "-e",
                        "smtpd_milters=%s" % (endpoint or ""),
                        "milter_default_action=tempfail"], check=True, capture_output=True)
        self._postfix("reload")
        time.sleep(1.0)                 # its smtpd processes are replaced as they finish


class Qpy:
    name = "qpy"
    domain = "bench.example"

    def __init__(self, base: str, relay_port: int):
        self.root = os.path.join(base, "qpy")
        self.port = free_port()
        self.relay_port = relay_port
        self.log = os.path.join(base, "qpy-start.log")
        self.proc: subprocess.Popen | None = None
        self.extra_control: dict[str, str] = {}

    def bin(self, name: str) -> str:
        return os.path.join(PREFIX, "bin", name)

    def setup(self) -> None:
        r = subprocess.run([self.bin("qpy-install"), self.root, "--me", self.domain,
                            "--smtp", "127.0.0.1:%d" % self.port], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError("qpy-install: exit %d: %s" % (r.returncode, r.stderr[-1000:]))
        control = os.path.join(self.root, "control")
        # W3: every remote domain goes to the sink; loopback clients may relay.
        _write(os.path.join(control, "smtproutes"), ":127.0.0.2:%d\n" % self.relay_port)
        _write(os.path.join(control, "smtprules"), '127.:allow,RELAYCLIENT=""\n:allow\n')
        for name, value in self.extra_control.items():
            _write(os.path.join(control, os.path.basename(name)), value + "\n")

    def start(self) -> None:
        logf = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen([self.bin("qpy-start"), self.root], stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            logf.close()
        with open(os.path.join(os.path.dirname(self.root), "qpy-start.pid"), "w") as f:
            f.write("%d\n" % self.proc.pid)
        try:
            wait_greeting(self.port, START_TIMEOUT)
        except RuntimeError as e:
            raise RuntimeError("%s\n--- qpy-start log:\n%s" % (e, _tail(self.log))) from None

    def stop(self) -> None:
        if self.proc is None:
            return
        procs = tree([self.proc.pid])
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT)
        for p in alive:
            p.kill()
        self.proc.wait()
        self.proc = None

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def sendmail(self) -> tuple[list[str], dict[str, str]]:
        return [self.bin("qpy-sendmail")], {"QPY_ROOT": self.root}

    def idle_root(self) -> str:
        """A second root, installed but never started: W2's front end measured alone."""
        root = os.path.join(os.path.dirname(self.root), "qpy-idle")
        if not os.path.isdir(os.path.join(root, "queue", "drop")):
            r = subprocess.run([self.bin("qpy-install"), root, "--me", self.domain],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError("qpy-install: exit %d: %s" % (r.returncode,
                                                                 r.stderr[-1000:]))
        return root

    def queued(self) -> int:
        q = os.path.join(self.root, "queue")
        return count_files(os.path.join(q, "drop"), os.path.join(q, "mess"))

    def flush(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGALRM)

    def set_milter(self, endpoint: str | None) -> None:
        """control/milters = endpoint (None: none), and a SIGHUP to qpy-start."""
        path = os.path.join(self.root, "control", "milters")
        if endpoint:
            _write(path, endpoint + "\n")
        elif os.path.exists(path):
            os.unlink(path)
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)                 # qpy-tcpserver replaces its workers

    def log_tail(self) -> str:
        return _tail(self.log)


def reset_base(base: str) -> None:
    """Remove what a previous run left (its Postfix is stopped through its own config)."""
    etc = os.path.join(base, "postfix", "etc")
    if os.path.exists(os.path.join(etc, "main.cf")):
        subprocess.run(["postfix", "-c", etc, "stop"], capture_output=True)
        time.sleep(1)
    # A qpy-start that a killed harness left running: ours by its pid file and root path.
    try:
        with open(os.path.join(base, "qpy-start.pid")) as f:
            old = psutil.Process(int(f.read().strip()))
        if any(os.path.join(base, "qpy") == a for a in old.cmdline()):
            procs = tree([old.pid])
            old.terminate()
            _, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT)
            for p in alive:
                p.kill()
    except (OSError, ValueError, psutil.Error):
        pass
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base, mode=0o755, exist_ok=True)
    os.chmod(base, 0o755)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"
