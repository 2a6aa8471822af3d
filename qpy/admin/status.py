"""qpy-status — is this root's qpy running as it should? For admins and monitoring.

SYNOPSIS
    qpy-status [ROOT] [--svdir DIR]...

DESCRIPTION
    Finds this root's qpy processes (psutil) by their title, whose first word is the
    program name (design §8): those named in pid files under `queue/run/`, those whose
    title, working directory, an open file or a Unix socket names ROOT, and all their
    descendants. For each it prints the pid, the uid it runs under against the uid
    the design gives that program, its resident memory and its open file count.
    Then, per service:

        send    qpy-queue-send, qpy-clean, qpy-lspawn, qpy-rspawn
        pickup  qpy-pickup
        smtpd   qpy-tcpserver (or ucspi-tcp's tcpserver running qpy-smtpd), expected
                when control/smtplisten exists (as qpy-start starts it)
        authd   qpy-authd, expected only when AUTH is configured (ROOT/auth/passwd
                holds a user)

    `up` or `DOWN`. A service under daemontools (a directory `qpy-NAME` in a --svdir
    DIR, or in /etc/service or /service with a run script naming ROOT) that supervise
    reports down (`svstat`: stopped on purpose with `svc -d`) is DOWN whatever runs.
    Then the queue: messages, not yet preprocessed, the oldest message's age. Last
    the remote hosts qpy-remote skips because they timed out repeatedly
    (qpy.common.tcpto; ROOT/remote/tcpto), with their count and the time left.

RUNS AS
    root (psutil needs it to see other users' processes and their open files);
    keeps its uid, writes nothing.

EXIT CODES
    0 every expected service up under the right uids; 2 a service down or a
    process under a wrong uid (a monitoring "critical"); 111 cannot look.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time

import psutil

from qpy.admin import queueinfo
from qpy.common import tcpto
from qpy.common.exits import EXIT_TEMP
from qpy.common.privilege import preamble
from qpy.common.queue import Paths, root_from

EXIT_PROBLEM = 2
SVSTAT = "svstat"
SVSTAT_TIMEOUT = 10
DEFAULT_SVDIRS = ("/etc/service", "/service")
MAX_RUN_SCRIPT = 64 * 1024
MAX_FDS_LOOKED_AT = 4096

SERVICES: dict[str, tuple[str, ...]] = {
    "send": ("qpy-queue-send", "qpy-clean", "qpy-lspawn", "qpy-rspawn"),
    "pickup": ("qpy-pickup",),
    "smtpd": ("qpy-tcpserver",),
    "authd": ("qpy-authd",),
}
# the design's uid for each program (§1); None: the recipient's, not checked
EXPECTED_USER: dict[str, str | None] = {
    "qpy-start": "root", "qpy-queue-send": "qpys", "qpy-clean": "qpyq", "qpy-lspawn": "root",
    "qpy-rspawn": "qpyr", "qpy-remote": "qpyr", "qpy-pickup": "qpyq", "qpy-tcpserver": "qpyd",
    "qpy-smtpd": "qpyd", "qpy-authd": "qpyauth", "qpy-local": None, "qpy-queue-inject": None,
    "qpy-newrcpt": None,
}


def title(p: psutil.Process) -> tuple[str, str]:
    """(program name, whole title) of a process; ('', '') when it is gone."""
    try:
        argv = p.cmdline()
    except (psutil.Error, OSError):
        return "", ""
    text = " ".join(argv)
    first = text.split(" ", 1)[0] if text else ""
    return os.path.basename(first), text


def _names_root(p: psutil.Process, text: str, root: str) -> bool:
    """Does this process belong to root: its title, its cwd or an open file under it?

    (Not its environment: setproctitle reuses that memory for the title.)"""
    if root + " " in text + " " or root + "/" in text:
        return True
    try:
        cwd = p.cwd()
    except (psutil.Error, OSError):
        return False
    if cwd == root or cwd.startswith(root + "/"):
        return True
    fddir = "/proc/%d/fd" % p.pid
    try:
        fds = os.listdir(fddir)[:MAX_FDS_LOOKED_AT]
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(os.path.join(fddir, fd))
        except OSError:
            continue
        if target == root or target.startswith(root + "/"):
            return True
    try:   # a listener such as qpy-authd holds only its socket under root
        socks = p.net_connections(kind="unix")
    except (psutil.Error, OSError):
        return False
    return any(isinstance(c.laddr, str) and c.laddr.startswith(root + "/") for c in socks)


def processes(root: str) -> list[tuple[psutil.Process, str]]:
    """This root's qpy processes (and ucspi-tcp tcpservers running qpy-smtpd)."""
    paths = Paths(root)
    seeds: set[int] = set()
    try:
        for name in os.listdir(paths.run):
            if name.endswith(".pid"):
                pid = queueinfo.read_pid(os.path.join(paths.run, name))
                if pid:
                    seeds.add(pid)
    except OSError:
        pass
    everything = {}
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        prog, text = title(p)
        if prog.startswith("qpy-") or (prog == "tcpserver" and "qpy-smtpd" in text):
            everything[p.pid] = (p, prog)
            if _names_root(p, text, root):
                seeds.add(p.pid)
    mine = {}
    for pid, (p, prog) in everything.items():
        try:
            chain = [p.pid] + [a.pid for a in p.parents()]
        except (psutil.Error, OSError):
            continue
        if seeds.intersection(chain):
            mine[pid] = (p, prog)
    return [mine[pid] for pid in sorted(mine)]


def expected_uid(root: str, prog: str) -> int | None:
    oneuser = Paths(root).oneuser()
    user = oneuser or EXPECTED_USER.get(prog)
    if prog == "tcpserver":
        user = oneuser or "qpyd"
    if user is None:
        return None
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return -1


def auth_configured(root: str) -> bool:
    if any(os.path.exists(os.path.join(root, "control", n))
           for n in ("checkpassword", "dovecotauth")):
        return True
    try:
        return os.path.getsize(os.path.join(root, "auth", "passwd")) > 0
    except OSError:
        return False


def service_dirs(root: str, svdirs: list[str]) -> dict[str, str]:
    """service name -> its daemontools directory, where one runs this root."""
    found = {}
    for base in svdirs or list(DEFAULT_SVDIRS):
        for name in SERVICES:
            d = os.path.join(base, "qpy-" + name)
            try:
                with open(os.path.join(d, "run"), "rb") as f:
                    script = f.read(MAX_RUN_SCRIPT)
            except OSError:
                continue
            if svdirs or os.fsencode(root) in script:
                found.setdefault(name, d)
    return found


def svstat(d: str) -> str:
    """svstat's verdict on a service directory: 'up', 'down', or what went wrong."""
    try:
        r = subprocess.run([SVSTAT, d], capture_output=True, timeout=SVSTAT_TIMEOUT,
                           env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return "unknown (%s)" % e
    out = r.stdout.decode("ascii", "replace").strip()
    _, _, verdict = out.partition(": ")
    return verdict.split(" ", 1)[0] if verdict else "unknown (%s)" % out


def report(root: str, svdirs: list[str]) -> tuple[list[str], int]:
    out = ["root: %s%s" % (root, " (one-user mode)" if Paths(root).oneuser() else "")]
    problems = 0
    running: dict[str, list[psutil.Process]] = {}
    for p, prog in processes(root):
        try:
            uid = p.uids().real
            rss = p.memory_info().rss
            nfds = p.num_fds()
        except (psutil.Error, OSError):
            continue
        running.setdefault(prog, []).append(p)
        want = expected_uid(root, prog)
        verdict = "ok" if want is None or want == uid else "WRONG UID, want %d" % want
        problems += verdict != "ok"
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        out.append("  %-15s pid %-7d uid %-6d %-9s %-20s rss %.1f MB, %d open files"
                   % (prog, p.pid, uid, user, verdict, rss / 1e6, nfds))
    dirs = service_dirs(root, svdirs)
    for name, progs in SERVICES.items():
        if (name == "authd" and not auth_configured(root)) or \
                (name == "smtpd" and not os.path.exists(os.path.join(root, "control",
                                                                     "smtplisten"))):
            out.append("service %s: not configured" % name)
            continue
        if name == "smtpd":
            progs = progs + ("tcpserver",)
            missing = [] if any(p in running for p in progs) else [progs[0]]
        else:
            missing = [p for p in progs if p not in running]
        why = ""
        if name in dirs:
            state = svstat(dirs[name])
            if state != "up":
                why = "supervise says %s (%s)" % (state, dirs[name])
        if not why and missing:
            why = "not running: " + ", ".join(missing)
        problems += bool(why)
        out.append("service %s: %s" % (name, "DOWN, " + why if why else "up"))
    paths = Paths(root)
    total, todo = queueinfo.counts(paths)
    oldest = queueinfo.oldest(paths)
    age = "%d s" % max(0, time.time() - oldest) if oldest is not None else "-"
    out.append("queue: %d messages, %d not yet preprocessed, oldest %s" % (total, todo, age))
    now = time.time()
    for addr, (count, last) in sorted(tcpto.read(root).items()):
        if tcpto.dead({addr: (count, last)}, addr, now):
            out.append("tcpto: %s skipped, %d timeouts in a row, %d s left"
                       % (addr, count, last + tcpto.SKIP - now))
    out.append("status: %s" % ("ok" if not problems else "%d problem%s" %
                               (problems, "s" * (problems > 1))))
    return out, problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    svdirs: list[str] = []
    rest: list[str] = []
    while args:
        a = args.pop(0)
        if a == "--svdir" and args:
            svdirs.append(os.path.abspath(args.pop(0)))
        else:
            rest.append(a)
    root = root_from(rest[:1])
    preamble("qpy-status", root, None)
    try:
        lines, problems = report(root, svdirs)
    except OSError as e:
        sys.stderr.write("qpy-status: %s\n" % e)
        return EXIT_TEMP
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_PROBLEM if problems else 0
