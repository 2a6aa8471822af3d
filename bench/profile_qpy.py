"""profile_qpy — where qpy's per-message time goes: py-spy over one W1 run.

`py-spy record --subprocesses` samples qpy-start and every process it forks (smtpd,
queue-inject, pickup, queue-send, lspawn, local) while smtp-source sends; the raw
(collapsed) stacks go to /var/tmp/qpybench/profile-*.txt and a summary is printed: CPU
samples per program, and the functions with the most samples of their own (self) and
below them (total). py-spy counts a thread only while it is on the CPU (no --idle), so
time blocked in fsync or select shows up in the strace figures, not here.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import shutil
import signal
import subprocess
import time

import psutil
import workloads as wl
from systems import BASE, PREFIX, end, tree

TOP = 25
RATE = 250


def pyspy() -> str | None:
    for cand in (os.path.join(PREFIX, "venv", "bin", "py-spy"), shutil.which("py-spy")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def profile(sysm, pw, newdir: str, n: int, sessions: int, run_one, idle: bool = False) -> str:
    """CPU per process over one W1 run, then py-spy over another: the text to report."""
    exe = pyspy()
    if exe is None:
        return "profile: py-spy not installed (pip install the test extra)"
    out = os.path.join(BASE, "profile-%s.txt" % ("wall" if idle else "cpu"))
    args = [exe, "record", "--subprocesses", "--nonblocking", "--format", "raw",
            "--rate", str(RATE), "-o", out, "-p", str(sysm.roots()[0])]
    # --gil: only samples holding the GIL, i.e. Python running on a CPU (py-spy's own idle
    # detection counts threads blocked in select/fsync here)
    args.append("--idle" if idle else "--gil")
    text = cpu_profile(sysm, pw, newdir, n, sessions, run_one)
    spy = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    try:
        run_one("profile (py-spy) W1 s=%d" % sessions, sysm,
                lambda: wl.w1(sysm, pw, newdir, n, sessions), {})
    finally:
        end(spy, signal.SIGINT)
    if not os.path.exists(out):
        return text + "\nprofile: py-spy wrote nothing: %s" % (
            spy.stderr.read().decode()[-500:])
    return text + "\n" + summarize(out, n)


def cpu_profile(sysm, pw, newdir: str, n: int, sessions: int, run_one) -> str:
    """CPU per program from the kernel's own accounting over one W1 run (any system),
    and page faults per message (`perf stat`, where perf works): a forked Python worker
    copies every page whose objects it touches (reference counts are writes)."""
    pids = [p.pid for p in tree(sysm.roots())]
    out = os.path.join(BASE, "perf-%s.stat" % sysm.name)
    perf = None
    if shutil.which("perf") and pids:
        perf = subprocess.Popen(["perf", "stat", "-e", "task-clock,page-faults,context-switches",
                                 "-o", out, "-p", ",".join(map(str, pids))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    before = cpu_by_program(sysm.roots())
    try:
        run_one("profile (CPU) W1 s=%d" % sessions, sysm,
                lambda: wl.w1(sysm, pw, newdir, n, sessions), {})
    finally:
        if perf:
            end(perf, signal.SIGINT)
    after = cpu_by_program(sysm.roots())
    text = "%s: %s" % (sysm.name, cpu_table(before, after, n).lstrip())
    if perf and os.path.exists(out):
        with open(out) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[1] in ("page-faults", "context-switches"):
                    text += "\n  %s per message (perf stat, all processes): %.0f" % (
                        parts[1], float(parts[0].replace(",", "")) / n)
    return text


def cpu_by_program(roots: list[int]) -> dict[str, list[float]]:
    """user+system seconds of each resident process and of the children it reaped.

    Forked workers (qpy-smtpd, qpy-queue-inject, qpy-local) are counted in the parent
    that waits for them (tcpserver, lspawn) as children time.
    """
    out: dict[str, list[float]] = {}
    for p in tree(roots):
        try:
            t = p.cpu_times()
            name = p.name()
        except psutil.Error:
            continue
        # by name: Postfix runs several smtpd, qpy one of each resident program
        cur = out.setdefault(name, [0.0] * 4)
        for i, v in enumerate((t.user, t.system, t.children_user, t.children_system)):
            cur[i] += v
    return out


def cpu_table(before: dict, after: dict, n: int) -> str:
    lines = ["", "CPU per message by process, ms: total = own user+sys + reaped children "
             "user+sys (W1, %d messages)" % n]
    rows = []
    for key, a in after.items():
        b = before.get(key, [0.0] * 4)
        d = [1000 * (x - y) / n for x, y in zip(a, b, strict=True)]
        rows.append((sum(d), d, key))
    rows.sort(reverse=True)
    tot = [sum(r[1][i] for r in rows) for i in range(4)]
    for t, d, key in rows:
        if abs(t) >= 0.005:  # below 0: it exited in the run; its CPU moved to its parent
            lines.append("  %7.2f = %5.2f+%5.2f  + %5.2f+%5.2f  %s" % (t, *d, key))
    lines.append("  %7.2f = %5.2f+%5.2f  + %5.2f+%5.2f  total" % (sum(tot), *tot))
    return "\n".join(lines)


_PROC = re.compile(r"^process \d+:\"(?:\S*/)?(?:python3?\S* (?:-\S+ )*)?(?:\S*/)?([^\s\"]+)")


def summarize(path: str, messages: int) -> str:
    per_prog: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            c = int(count)
            frames = stack.split(";")
            # --subprocesses nests each child's stack under its parents' "process" frames
            prog = "?"
            for i in range(len(frames) - 1, -1, -1):
                if frames[i].startswith("process "):
                    m = _PROC.match(frames[i])
                    prog = m.group(1) if m else frames[i][:40]
                    frames = frames[i + 1:]
                    break
            if frames and frames[0].startswith("thread "):
                frames = frames[1:]
            samples += c
            per_prog[prog] += c
            if frames:
                own[_short(frames[-1])] += c
            for fr in set(map(_short, frames)):
                total[fr] += c
    ms = 1000.0 / RATE
    lines = ["", "py-spy over one W1 run of %d messages: %d CPU samples at %d Hz "
             "holding the GIL (%.2f ms per message)" % (messages, samples, RATE,
                                            samples * ms / max(1, messages)),
             "", "CPU per program (ms per message):"]
    for prog, c in per_prog.most_common(12):
        lines.append("  %7.2f  %s" % (c * ms / messages, prog))
    lines += ["", "self (ms per message):"]
    for fr, c in own.most_common(TOP):
        lines.append("  %7.2f  %s" % (c * ms / messages, fr))
    lines += ["", "total, including callees (ms per message):"]
    for fr, c in total.most_common(TOP):
        lines.append("  %7.2f  %s" % (c * ms / messages, fr))
    return "\n".join(lines)


def _short(frame: str) -> str:
    """`func (path/to/site-packages/qpy/x.py:12)` -> `func (qpy/x.py)`."""
    frame = re.sub(r":\d+\)$", ")", frame)
    return re.sub(r"\(\S*?/((?:qpy|python3\.\d+|site-packages)/)", r"(\1", frame)


_NAME = re.compile(r'prctl\(PR_SET_NAME, "([^"]*)"')
_EXEC = re.compile(r'execve\("([^"]*)"')
_FORK = re.compile(r"(?:clone3?|fork|vfork)(?:\(.*\)| resumed>.*\)) += (\d+)$")
_SYNC = re.compile(r"(fsync|fdatasync|syncfs)\(\d+<([^>]*)>")  # also "<unfinished ...>" lines


def fsync_profile(sysm, pw, newdir: str, n: int, sessions: int, run_one) -> str:
    """fsyncs per message by program and by file, from `strace -f -y` over one W1 run."""
    procs = tree(sysm.roots())
    names = {}
    for p in procs:
        try:
            names[str(p.pid)] = p.name().split()[0]
        except psutil.Error:
            pass
    out = os.path.join(BASE, "fsyncs-%s.trace" % sysm.name)
    args = ["strace", "-f", "-y", "-o", out,
            "-e", "trace=fsync,fdatasync,syncfs,prctl,execve,clone,clone3,fork,vfork"]
    for p in procs:
        args += ["-p", str(p.pid)]
    st = wl.strace(args, len(procs))
    try:
        run_one("profile (fsyncs) W1 s=%d" % sessions, sysm,
                lambda: wl.w1(sysm, pw, newdir, n, sessions), {})
        wl.settle(sysm, 30)
    finally:
        end(st, signal.SIGINT)
    counts: collections.Counter = collections.Counter()
    with open(out, errors="replace") as f:
        for line in f:
            pid, _, rest = line.partition(" ")
            rest = rest.strip()
            m = _FORK.search(rest)
            if m:
                names[m.group(1)] = names.get(pid, "?")
                continue
            m = _NAME.search(rest) or _EXEC.search(rest)
            if m:
                names[pid] = os.path.basename(m.group(1).split()[0]) if m.group(1) else "?"
                continue
            m = _SYNC.search(rest)
            if m:
                counts[(names.get(pid, "?"), _file_kind(m.group(2)))] += 1
    total = sum(counts.values())
    lines = ["%s: fsync+fdatasync+syncfs per message by program and file (strace -f -y, W1 %d "
             "messages): %.2f" % (sysm.name, n, total / n)]
    for (prog, kind), c in counts.most_common(20):
        lines.append("  %5.2f  %-16s %s" % (c / n, prog, kind))
    return "\n".join(lines)


def _file_kind(path: str) -> str:
    """A path with the message ids and names taken out: queue/mess/ID, Maildir/new."""
    path = re.sub(r"^%s/(qpy|postfix/spool)/" % re.escape(BASE), "", path)
    path = re.sub(r"^.*/(Maildir/)", r"\1", path)
    return re.sub(r"[0-9A-F]{6,}[^/]*|\d{6,}[^/]*", "ID", path)


STAGES = (
    ("pickup msg ID", r"pickup msg (\d+):"),
    ("new msg ID (queue-send)", r"new msg (\d+)$"),
    ("starting delivery", r"starting delivery \d+: msg (\d+) to"),
)


PACE = 0.05     # seconds between the stage pass's messages: about 200 log lines a second


def latency_stages(sysm, pw, newdir: str, n: int) -> str:
    """W4 one message at a time, timed stage by stage: the client's end of data and its
    250, the qpy-start log's stamps for pickup, queue-send and the start of the delivery
    (stamped as qpy-start reads each line: within a pipe read of the event), and the
    file in Maildir/new. Medians in ms, each from the previous stage. The messages are
    paced PACE seconds apart: while over LOG_BUSY lines a second flow, qpy-start reads
    its log pipes in LOG_ROUND rounds (qpy.admin.start), which would stamp lines up to
    20 ms late; paced, each line is read, so stamped, as it is written."""
    import smtplib
    rcpt = "%s@%s" % (pw.pw_name, sysm.domain)
    body = b"Subject: W4 stages\r\n\r\n" + b"y" * 70 + b"\r\n"
    marks: list[dict[str, float]] = []
    watch = wl.NewFiles(newdir)
    start = os.path.getsize(sysm.log)
    try:
        with smtplib.SMTP("127.0.0.1", sysm.port, local_hostname="client.example",
                          timeout=60) as s:
            s.ehlo()
            for i in range(n):
                if s.mail(wl.SENDER)[0] != 250 or s.rcpt(rcpt)[0] != 250:
                    raise wl.RunFailed("stages: MAIL or RCPT refused")
                s.putcmd("data")
                if s.getreply()[0] != 354:
                    raise wl.RunFailed("stages: DATA refused")
                s.send(body + b".\r\n")
                t_dot = time.time()
                code, text = s.getreply()
                t_250 = time.time()
                if code != 250:
                    raise wl.RunFailed("stages: %d %s" % (code, text))
                mono = time.monotonic()
                got = watch.wait(i + 1, mono + 60)
                if got is None:
                    raise wl.RunFailed("stages: message %d not delivered" % (i + 1))
                qid = text.split()[-1].decode()
                marks.append({"id": qid, "dot": t_dot, "250": t_250,
                              "new/": t_250 + (got - mono)})
                time.sleep(PACE)
    finally:
        watch.close()
    time.sleep(0.5)
    with open(sysm.log, "rb") as f:
        f.seek(start)
        lines = f.read().decode("utf-8", "replace").splitlines()
    seen: dict[tuple[str, str], float] = {}
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) < 3:
            continue
        try:
            when = time.mktime(time.strptime(parts[0] + " " + parts[1].split(".")[0],
                                             "%Y-%m-%d %H:%M:%S"))
            when += float("0." + parts[1].split(".")[1])
        except (ValueError, IndexError):
            continue
        for name, rx in STAGES:
            m = re.search(rx, parts[2])
            if m:
                seen.setdefault((name, m.group(1)), when)
    order = ["dot", "250"] + [name for name, _ in STAGES] + ["new/"]
    gaps: dict[str, list[float]] = collections.defaultdict(list)
    for mk in marks:
        for name, _ in STAGES:
            if (name, mk["id"]) in seen:
                mk[name] = seen[(name, mk["id"])]
        for a, b in itertools.pairwise(order):
            if a in mk and b in mk:
                gaps["%s -> %s" % (a, b)].append(1000 * (mk[b] - mk[a]))
    rows = ["### W4 stage by stage (%d messages, medians, ms)" % n, "",
            "| stage | median ms | p90 ms |", "|---|---|---|"]
    for a, b in itertools.pairwise(order):
        v = sorted(gaps.get("%s -> %s" % (a, b), []))
        if v:
            rows.append("| %s → %s | %.2f | %.2f |" % (a, b, v[len(v) // 2],
                                                     v[int(len(v) * 0.9)]))
    total = sorted(1000 * (mk["new/"] - mk["250"]) for mk in marks)
    rows.append("| 250 → new/ in all | %.2f | %.2f |" % (total[len(total) // 2],
                                                        total[int(len(total) * 0.9)]))
    return "\n".join(rows)
