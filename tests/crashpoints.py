"""crashpoints — every durable step of qpy crashed on purpose (issue 17).

For a fixed workload (SMTP in, qpy-sendmail and qpy-queue-inject in, local
delivery, remote delivery to Postfix's smtp-sink on loopback, a bounce, a double
bounce, qpy-qrm), each program is killed with SIGKILL at its Nth call of one
state-changing system call, for every N a clean run showed, by strace alone
(`--inject=SYSCALL:signal=KILL:when=N`, counted per process; no hooks in qpy):

    openat (those with O_CREAT), write, pwrite64, rename, renameat, renameat2,
    link, linkat, unlink, unlinkat, mkdir, ftruncate, fsync, fdatasync, syncfs

One-shot programs (qpy-sendmail, qpy-queue-inject, qpy-smtpd on a pipe, qpy-qrm)
run under strace; a resident one (qpy-pickup, qpy-queue-send, qpy-clean, qpy-lspawn
with its qpy-local workers, qpy-rspawn with its qpy-remote workers) has strace
attached while it is idle, then the workload arrives. After each crash qpy-start
restarts what died; SIGALRM makes queue-send retry at once; once the queue is
empty the invariant is checked:

    lost       a message acknowledged (exit 0, 250) delivered nowhere: must be 0
    half       a delivered copy without its last line: must be 0
    leftover   a file under queue/ once the queue is empty: must be 0
    check      `qpy-install --check` finds a difference: must be 0
    dups       copies beyond the first (counted, published)

Maildir tmp/ files left by a killed delivery are counted apart (qmail's rule:
a reader removes them after 36 h; they are never delivered).

USAGE (as root, qpy installed in QPY_PREFIX):
    QPY_PREFIX=/opt/qpy /opt/qpy/venv/bin/python3 tests/crashpoints.py [--every K]
        [--programs sendmail,queue-send,...] [--json FILE]
    --every K runs every Kth point only (CI: tests/test_crashpoints.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qpytest  # noqa: E402
from remote_peers import SmtpSink  # noqa: E402

CALLS = ("openat", "write", "pwrite64", "rename", "renameat", "renameat2", "link",
         "linkat", "unlink", "unlinkat", "mkdir", "ftruncate", "fsync", "fdatasync",
         "syncfs")
# qpy-rspawn and qpy-remote keep no state on disk: theirs is what they tell the peer
# and queue-send, so their points are their writes and sends on sockets
NET_CALLS = ("write", "sendto", "sendmsg")
ONESHOT = ("sendmail", "queue-inject", "smtpd", "qrm")
RESIDENT = ("pickup", "queue-send", "clean", "lspawn", "rspawn")
ME = "test.example"
USER = "qtcrash"
VERBOSE = bool(os.environ.get("QPY_CRASH_VERBOSE"))
STABLE = 2.5                    # qpy.admin.start.STABLE_RUN, and a little
SETTLE = 60.0                   # seconds a point may take to finish after its crash
_CALL = re.compile(r"^(\d+) +(\w+)\((.*?)(?:\) += |<unfinished)")


@dataclass
class Msg:
    tok: str
    kind: str                   # local, smtp, remote, bounce, double, qrm
    acked: bool = False
    msgid: str = ""


@dataclass
class Tally:
    points: int = 0
    fired: int = 0
    lost: int = 0
    dups: int = 0
    half: int = 0
    leftover: int = 0
    check: int = 0
    stuck: int = 0
    maildir_tmp: int = 0
    notes: list[str] = field(default_factory=list)


class Rig:
    """One installed root, a recipient with extensions, smtp-sink, qpy-start."""

    def __init__(self, user: str = USER) -> None:
        self.user = user
        self.qroot = qpytest.install_root(ME)
        top = os.path.dirname(self.qroot.path)
        self.home = os.path.join(top, "home")
        self.pw = qpytest.make_user(user, self.home)
        for ext, text in (("fail", "|echo no such mailbox here; exit 100\n"),
                          ("bad", "|exit 100\n"), ("later", "|exit 111\n")):
            p = os.path.join(self.home, ".qmail-" + ext)
            with open(p, "w") as f:
                f.write(text)
            os.chown(p, self.pw.pw_uid, self.pw.pw_gid)
        port = qpytest.free_port("127.0.0.2")
        self.sink = SmtpSink("127.0.0.2", port)
        self.qroot.control("smtproutes", "far.example:[127.0.0.2]:%d" % port)
        self.qroot.control("concurrencyremote", "4")
        self.log = open(os.path.join(top, "start.log"), "ab")
        self.start = self.qroot.start("qpy-start", self.qroot.path, stdout=self.log,
                                      stderr=subprocess.STDOUT)
        assert qpytest.wait_for(lambda: all(self.pid(p) for p in RESIDENT), 60), \
            "qpy-start did not start everything"
        self.n = 0
        self.msgs: list[Msg] = []

    # --- processes ----------------------------------------------------------------
    def pid(self, prog: str) -> int | None:
        try:
            with open(os.path.join(self.qroot.paths.run, prog + ".pid")) as f:
                pid = int(f.read())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        self.qroot.stop_all()
        self.sink.stop()
        self.log.close()
        qpytest.remove_tree(os.path.dirname(self.qroot.path))

    # --- the workload -------------------------------------------------------------
    def new(self, kind: str) -> Msg:
        self.n += 1
        m = Msg("t%d-%s" % (self.n, kind), kind)
        self.msgs.append(m)
        return m

    def text(self, m: Msg) -> bytes:
        return ("Subject: tok %s\n\nfirst line\n%s\nEND %s\n"
                % (m.tok, "filler line\n" * 40, m.tok)).encode()

    def rcpt(self, m: Msg) -> tuple[str, list[str]]:
        u = self.user
        local = "%s@%s" % (u, ME)
        return {"local": (local, [local]), "smtp": (local, [local]),
                "remote": (local, ["someone@far.example"]),
                "bounce": (local, ["%s-fail@%s" % (u, ME)]),
                "double": ("%s-bad@%s" % (u, ME), ["%s-fail@%s" % (u, ME)]),
                "qrm": (local, ["%s-later@%s" % (u, ME)])}[m.kind]

    def cmd(self, prog: str, m: Msg) -> tuple[list[str], bytes, dict]:
        """The command line, standard input and extra Popen arguments of one injection."""
        sender, rcpts = self.rcpt(m)
        if prog == "sendmail":
            return [qpytest.bin_path("qpy-sendmail"), "-f", sender, *rcpts], self.text(m), {}
        if prog == "queue-inject":
            r, w = os.pipe()
            os.write(w, b"F" + sender.encode() + b"\0" +
                     b"".join(b"T" + x.encode() + b"\0" for x in rcpts) + b"\0")
            os.close(w)
            return [qpytest.bin_path("qpy-queue-inject")], self.text(m), {"stdout": r}
        assert prog == "smtpd"
        return [qpytest.bin_path("qpy-smtpd")], self.text(m), {}

    def inject(self, m: Msg, prog: str, strace: list[str] | None = None) -> None:
        argv, data, kw = self.cmd(prog, m)
        if prog == "smtpd":
            m.acked = self.smtp(m, (strace or []) + argv, data)
            return
        out = kw.pop("stdout", subprocess.PIPE)
        try:
            r = subprocess.run((strace or []) + argv, input=data, env=self.qroot.env(),
                               stdout=out, stderr=subprocess.PIPE, timeout=60)
        finally:
            if out != subprocess.PIPE:
                os.close(out)
        m.acked = r.returncode == 0

    def smtp(self, m: Msg, argv: list[str], data: bytes) -> bool:
        """One SMTP session with qpy-smtpd on pipes; True: the 250 after DATA came."""
        sender, rcpts = self.rcpt(m)
        env = self.qroot.env({"TCPREMOTEIP": "127.0.0.1", "TCPLOCALIP": "127.0.0.1",
                              "TCPLOCALPORT": "25", "PROTO": "TCP", "RELAYCLIENT": ""})
        p = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        assert p.stdin is not None and p.stdout is not None

        def reply() -> bytes:
            while True:
                line = p.stdout.readline()
                if not line or line[3:4] != b"-":
                    return line

        acked = False
        try:
            steps = [b"EHLO client.example", b"MAIL FROM:<%s>" % sender.encode()] + \
                [b"RCPT TO:<%s>" % x.encode() for x in rcpts] + [b"DATA"]
            if reply().startswith(b"220"):
                for cmd in steps:
                    p.stdin.write(cmd + b"\r\n")
                    p.stdin.flush()
                    if reply()[:1] not in (b"2", b"3"):
                        break
                else:
                    p.stdin.write(data.replace(b"\n", b"\r\n") + b".\r\n")
                    p.stdin.flush()
                    acked = reply().startswith(b"250 ")
                    p.stdin.write(b"QUIT\r\n")
                    p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        finally:
            try:
                p.stdin.close()
            except OSError:
                pass
            p.wait(60)
            p.stdout.close()
        return acked

    def workload(self) -> list[Msg]:
        """One round: every kind once, injected cleanly; qrm's message is removed."""
        round_ = []
        for kind, prog in (("local", "sendmail"), ("smtp", "smtpd"), ("remote", "sendmail"),
                           ("bounce", "sendmail"), ("double", "queue-inject"),
                           ("qrm", "sendmail")):
            m = self.new(kind)
            self.inject(m, prog)
            round_.append(m)
        return round_

    def qrm(self, m: Msg, strace: list[str] | None = None) -> bool:
        """Remove m with qpy-qrm once it is queued; True when qpy-qrm said yes."""
        if not m.msgid:
            m.msgid = qpytest.wait_for(lambda: self.find_id(m), 30) or ""
        if not m.msgid:
            return False
        r = subprocess.run((strace or []) + [qpytest.bin_path("qpy-qrm"), self.qroot.path,
                                             m.msgid], env=self.qroot.env(),
                           capture_output=True, timeout=60)
        if r.returncode != 0:
            m.msgid = ""    # perhaps a mess/ID a killed pickup left, admitted again later
        return r.returncode == 0

    def find_id(self, m: Msg) -> str | None:
        for name in os.listdir(self.qroot.paths.mess):
            try:
                with open(os.path.join(self.qroot.paths.mess, name), "rb") as f:
                    if b"Subject: tok %s\n" % m.tok.encode() in f.read():
                        return name
            except OSError:
                pass
        return None

    # --- settling -----------------------------------------------------------------
    def queue_busy(self) -> list[str]:
        q = self.qroot.paths.queue
        return [os.path.join(d, n) for d in ("drop", "mess", "todo", "state", "rm")
                for n in os.listdir(os.path.join(q, d))]

    def settle(self, pending_qrm: list[Msg]) -> list[Msg]:
        """Wait until the queue is empty, retrying deferrals (SIGALRM) and re-running an
        unfinished qpy-qrm; returns the messages it injected itself (a nudge: the
        scan a new drop file starts removes a killed injector's tmp.* file; pickup
        lists drop/ only then, or every 60 s). None when the queue stays busy."""
        deadline = time.monotonic() + SETTLE
        nudged: list[Msg] = []
        while time.monotonic() < deadline:
            busy = self.queue_busy()
            if busy and all(os.path.basename(p).startswith("tmp.") for p in busy) and \
                    len(nudged) < 3 and time.monotonic() + 1.5 < deadline:
                time.sleep(1.2)
                m = self.new("local")
                self.inject(m, "sendmail")
                nudged.append(m)
            for m in list(pending_qrm):
                m.msgid = self.find_id(m) or ""
                if not m.msgid:
                    # gone: an earlier request (qpy-qrm's 111 leaves it in rm/ for
                    # queue-send's next start) was acted on; or not admitted yet
                    if not os.listdir(self.qroot.paths.drop):
                        pending_qrm.remove(m)
                elif self.qrm(m):
                    pending_qrm.remove(m)
            if not pending_qrm and not self.queue_busy() and \
                    all(self.pid(p) for p in RESIDENT):
                return nudged
            if self.start.poll() is None:
                self.start.send_signal(signal.SIGALRM)
            time.sleep(0.5)
        return None

    # --- the invariant ------------------------------------------------------------
    def deliveries(self) -> dict[str, list[tuple[str, bytes]]]:
        """tok -> [(where, file bytes)] over every place mail can end."""
        found: dict[str, list[tuple[str, bytes]]] = {}
        places = [("user", p) for p in glob.glob(self.home + "/Maildir/new/*")] + \
            [("alias", p) for p in glob.glob(self.qroot.path + "/alias/Maildir/new/*")] + \
            [("sink", os.path.join(self.sink.dir, n)) for n in os.listdir(self.sink.dir)]
        for where, p in places:
            with open(p, "rb") as f:
                data = f.read()
            for tok in set(re.findall(rb"Subject: tok (t\d+-\w+)", data)):
                found.setdefault(tok.decode(), []).append((where, data))
        return found

    def check(self, msgs: list[Msg], tally: Tally) -> None:
        found = self.deliveries()
        for m in msgs:
            copies = found.get(m.tok, [])
            if m.kind in ("local", "smtp"):
                got = [d for w, d in copies if w == "user" and b"Return-Path: <>" not in d]
            elif m.kind == "remote":
                got = [d for w, d in copies if w == "sink"]
            elif m.kind == "bounce":
                got = [d for w, d in copies if w == "user" and b"Return-Path: <>" in d]
            elif m.kind == "double":
                got = [d for w, d in copies if w == "alias"]
            else:   # qrm: removed before any delivery could succeed, and no bounce
                got = []
                if copies and m.acked:
                    tally.notes.append("%s removed by qpy-qrm yet delivered" % m.tok)
                    tally.lost += 1
            if m.acked and m.kind != "qrm" and not got:
                tally.lost += 1
                tally.notes.append("lost %s (%s)" % (m.tok, m.kind))
            tally.dups += max(0, len(got) - 1)
            for d in got:
                if m.kind in ("local", "smtp", "remote") and \
                        b"END %s" % m.tok.encode() not in d:
                    tally.half += 1
                    tally.notes.append("half %s" % m.tok)
        left = self.queue_busy() + [os.path.join("queue/quarantine", n) for n in
                                    os.listdir(os.path.join(self.qroot.paths.queue,
                                                            "quarantine"))]
        if left:
            tally.leftover += len(left)
            tally.notes.append("left: %s" % left[:5])
            self.clear(left)
        r = subprocess.run([qpytest.bin_path("qpy-install"), "--check", self.qroot.path],
                           capture_output=True, timeout=60)
        if r.returncode != 0:
            tally.check += 1
            tally.notes.append("install --check: %s" % r.stdout[-300:])
        tmp = glob.glob(self.home + "/Maildir/tmp/*") + \
            glob.glob(self.qroot.path + "/alias/Maildir/tmp/*")
        tally.maildir_tmp += len(tmp)
        for p in tmp:
            os.unlink(p)

    def clear(self, paths: list[str]) -> None:
        """Reset what a failed point left, so that the next point starts clean."""
        for p in paths:
            try:
                os.unlink(os.path.join(self.qroot.paths.queue, p))
            except OSError:
                pass


# --- strace -------------------------------------------------------------------------
def trace_args(call: str, out: str, when: int | None) -> list[str]:
    """strace's arguments: trace `call` (a comma list for counting) into out, and
    with `when`, kill the process at its when-th call of it."""
    a = ["strace", "-f", "-q", "-o", out, "-e", "trace=" + call]
    if when is not None:
        a += ["-e", "inject=%s:signal=KILL:when=%d" % (call, when)]
    return a


def positions(tracefile: str) -> dict[str, list[int]]:
    """call -> the N (per process) of every state-changing call in a clean trace."""
    seen: dict[tuple[str, str], int] = {}
    out: dict[str, set[int]] = {}
    with open(tracefile, errors="replace") as f:
        for line in f:
            m = _CALL.match(line)
            if not m or m.group(2) not in CALLS + NET_CALLS:
                continue
            pid, call, args = m.groups()
            seen[(pid, call)] = n = seen.get((pid, call), 0) + 1
            if call == "openat" and "O_CREAT" not in args:
                continue
            out.setdefault(call, set()).add(n)
    return {c: sorted(v) for c, v in out.items()}


def fired(tracefile: str) -> bool:
    try:
        with open(tracefile, errors="replace") as f:
            return "killed by SIGKILL" in f.read()
    except OSError:
        return False


def attach(pids: list[int], call: str, out: str, when: int | None,
           fault: str = "") -> subprocess.Popen:
    """strace attached to pids (and what they fork): counting `call`, killing at its
    when-th call, or with fault (strace's inject=SET:error=E...) injecting that."""
    argv = trace_args(call, out, when) + (["-e", "inject=" + fault] if fault else [])
    for p in pids:
        argv += ["-p", str(p)]
    t = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def traced() -> bool:
        for p in pids:
            try:
                with open("/proc/%d/status" % p) as f:
                    if re.search(r"^TracerPid:\s+0$", f.read(), re.M):
                        return False
            except OSError:
                pass
        return True
    qpytest.wait_for(traced, 10, 0.01)
    if when is not None:
        # one crash per point: a forked worker counts from 1 again, and would be
        # killed at its own Nth call at every retry (a delivery loop, not a crash)
        threading.Thread(target=_detach_after_kill, args=(t, out), daemon=True).start()
    return t


def _detach_after_kill(t: subprocess.Popen, out: str) -> None:
    while t.poll() is None:
        if fired(out):
            detach(t)
            return
        time.sleep(0.005)


def detach(t: subprocess.Popen) -> None:
    if t.poll() is None:
        t.send_signal(signal.SIGINT)      # strace -p detaches on INT
        try:
            t.wait(10)
        except subprocess.TimeoutExpired:
            t.kill()
            t.wait()


def family(rig: Rig, prog: str) -> list[int]:
    """prog's pid and its children's, once it has run STABLE s: qpy-start doubles the
    back-off of a service that dies sooner (a crash loop), up to a minute."""
    import psutil
    pid = rig.pid(prog)
    if pid is None:
        return []
    try:
        born = os.stat(os.path.join(rig.qroot.paths.run, prog + ".pid")).st_mtime
        time.sleep(max(0.0, STABLE - (time.time() - born)))
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except (psutil.Error, OSError):
        return [pid]


# --- the sweep ----------------------------------------------------------------------
def oneshot(rig: Rig, prog: str, every: int, tmp: str, tally: Tally) -> None:
    """Each point: one message through prog killed at that point, then settle."""
    clean = os.path.join(tmp, "clean-%s" % prog)
    msgs: list[Msg] = []
    pending: list[Msg] = []
    kind = "qrm" if prog == "qrm" else ("smtp" if prog == "smtpd" else "local")
    m = rig.new(kind)
    everything = ",".join(CALLS)
    if prog == "qrm":
        rig.inject(m, "sendmail")
        assert rig.qrm(m, trace_args(everything, clean, None)), "qpy-qrm failed"
    else:
        rig.inject(m, prog, trace_args(everything, clean, None))
        assert m.acked, "clean run of %s did not succeed" % prog
    msgs.append(m)
    points = [(c, n) for c, ns in positions(clean).items() for n in ns]
    for call, n in points[::every]:
        out = os.path.join(tmp, "t-%s-%s-%d" % (prog, call, n))
        m = rig.new(kind)
        if prog == "qrm":
            rig.inject(m, "sendmail")
            m.acked = rig.qrm(m, trace_args(call, out, n))
            if not m.acked:
                pending.append(m)       # a restart: the admin runs qpy-qrm again
        else:
            rig.inject(m, prog, trace_args(call, out, n))
        tally.points += 1
        tally.fired += fired(out)
        msgs.append(m)
        os.unlink(out)
    nudged = rig.settle(pending)
    if nudged is None:
        tally.stuck += 1
        tally.notes.append("%s: queue not empty: %s" % (prog, rig.queue_busy()[:5]))
    rig.check(msgs + (nudged or []), tally)


def resident(rig: Rig, prog: str, every: int, tmp: str, tally: Tally) -> None:
    """Count with a clean round, then one round per point with prog killed at it."""
    clean = os.path.join(tmp, "clean-%s" % prog)
    rig.settle([])
    calls = NET_CALLS if prog == "rspawn" else CALLS
    t = attach(family(rig, prog), ",".join(calls), clean, None)
    msgs = rig.workload()
    msgs += rig.settle([m for m in msgs if m.kind == "qrm"]) or []
    detach(t)
    rig.check(msgs, Tally())
    points = [(c, n) for c, ns in positions(clean).items() for n in ns]
    for call, n in points[::every]:
        t0 = time.monotonic()
        out = os.path.join(tmp, "t-%s-%s-%d" % (prog, call, n))
        if rig.settle([]) is None:
            tally.notes.append("%s: not idle before %s:%d" % (prog, call, n))
        t = attach(family(rig, prog), call, out, n)
        msgs = rig.workload()
        nudged = rig.settle([m for m in msgs if m.kind == "qrm"])
        ok = nudged is not None
        msgs += nudged or []
        detach(t)
        tally.points += 1
        tally.fired += fired(out)
        if not ok:
            tally.stuck += 1
            tally.notes.append("%s %s:%d: queue not empty: %s"
                               % (prog, call, n, rig.queue_busy()[:5]))
        before = (tally.lost, tally.half, tally.leftover)
        rig.check(msgs, tally)
        if (tally.lost, tally.half, tally.leftover) != before:
            tally.notes.append("^ at %s %s:%d" % (prog, call, n))
        if VERBOSE:
            print("%s %s:%d fired=%s ok=%s %.1f s" % (prog, call, n, fired(out), ok,
                                                      time.monotonic() - t0), flush=True)
        os.unlink(out)


def sweep(programs: list[str], every: int = 1, user: str = USER) -> dict[str, Tally]:
    rig = Rig(user)
    tmp = qpytest.scratch_dir("crashtrace")
    result: dict[str, Tally] = {}
    try:
        for prog in programs:
            t0 = time.monotonic()
            tally = result[prog] = Tally()
            (oneshot if prog in ONESHOT else resident)(rig, prog, every, tmp, tally)
            tally.notes.append("%.0f s" % (time.monotonic() - t0))
    finally:
        rig.stop()
        qpytest.remove_tree(tmp)
    return result


def table(result: dict[str, Tally]) -> str:
    rows = ["| program | points | fired | lost | dups | half | leftover | check | stuck "
            "| Maildir tmp |", "|---|---|---|---|---|---|---|---|---|---|"]
    for prog, t in result.items():
        rows.append("| %s | %d | %d | %d | %d | %d | %d | %d | %d | %d |" % (
            prog, t.points, t.fired, t.lost, t.dups, t.half, t.leftover, t.check, t.stuck,
            t.maildir_tmp))
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--programs", default=",".join(ONESHOT + RESIDENT))
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--user", default=USER, help="the test recipient (one per parallel run)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(1))    # stop the rig on TERM too
    result = sweep(a.programs.split(","), a.every, a.user)
    print(table(result))
    for prog, t in result.items():
        for note in t.notes:
            print("%s: %s" % (prog, note))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({p: t.__dict__ for p, t in result.items()}, f, indent=1)
    bad = sum(t.lost + t.half + t.leftover + t.check + t.stuck for t in result.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
