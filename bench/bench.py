"""bench — qpy against Postfix on this machine, side by side (issue 7). Run it as bench/run.

SYNOPSIS
    bench/run [--quick] [--rounds N] [--big-rounds N] [--only W1,W4,...] [--scale F]
              [--no-postfix] [--no-qpy] [--no-strace] [--profile] [--out FILE]

Runs as root. Lays out a private Postfix instance and a qpy root under /var/tmp/qpybench,
both on 127.0.0.1 (own ports, own domains), delivering to the real user qbench's
~/Maildir/. Each workload runs against both systems in turn (qpy, Postfix, qpy, Postfix,
... for --rounds rounds); the table gives medians over rounds with min-max and the ratio
qpy/Postfix, and is written as Markdown to bench/results/YYYY-MM-DD.md.

--quick: qpy only, 50 messages over SMTP, a few through sendmail and one at a time: checks
that the harness works and that qpy delivers; exit 1 when it does not (CI runs this).

Workloads (issue 7): W1 smtp-source to Maildir at 1 and 16 sessions; W2 sendmail in a shell
loop; W3 relay to smtp-sink on 127.0.0.2; W4 one message at a time, 250-after-DATA to file
in Maildir/new; W5 peak RSS of all the system's processes during W1 at 16 sessions; W6 W1 at
500, 2,000 and 8,000 messages; W7 the disk's durable-rename rate; W1M W1 at 16 sessions
through one pass-through milter (bench/passmilter.py, the same filter for both systems:
smtpd_milters for Postfix, control/milters for qpy). Plus fsyncs per message, counted with
`strace -f -c` over one W1 run per system.

EXIT: 0 when every run delivered, 1 when one failed, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import profile_qpy
import systems
import workloads as wl

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SESSIONS = 16

# key, workload, figure, better ("high"/"low"/None), target as (op, ratio) or None
ROWS = [
    ("w1s1.accept", "W1 SMTP to Maildir, 1 session", "accepted msg/s", "high", None),
    ("w1s1.deliver", "", "delivered msg/s", "high", None),
    ("w1s16.accept", "W1 SMTP to Maildir, 16 sessions", "accepted msg/s", "high", None),
    ("w1s16.deliver", "", "delivered msg/s", "high", (">=", 1.0)),
    ("w1s16.cpu", "", "CPU ms/msg, all processes", "low", None),
    ("w1m.deliver", "W1 + one pass-through milter, 16 sessions", "delivered msg/s", "high",
     None),
    ("w1m.cpu", "", "CPU ms/msg, all processes", "low", None),
    ("w2.inject", "W2 sendmail in a shell loop", "injected msg/s", "high", None),
    ("w2.deliver", "", "delivered msg/s", "high", (">=", 0.8)),
    ("w2.ms", "", "ms per sendmail call", "low", None),
    ("w2.alone", "", "ms per sendmail call, nothing delivering", "low", ("floor+", 2.0)),
    ("w2.floor", "", "ms per bare `python3 -IS -c pass` (qpy's floor)", "low", None),
    ("w3.deliver", "W3 relay to smtp-sink, 16 sessions", "queue empty, msg/s", "high",
     (">=", 1.0)),
    ("w4.p50", "W4 latency, 250 to Maildir/new", "p50 ms", "low", None),
    ("w4.p99", "", "p99 ms", "low", ("<=", 1.0)),
    ("w5.rss", "W5 memory during W1 16 sessions", "peak RSS MiB", "low", ("<=", 2.0)),
    ("w6.small", "W6 growth (W1, 16 sessions)", "ms/msg at {small}", "low", None),
    ("w1s16.ms_per_msg", "", "ms/msg at {w1}", "low", None),
    ("w6.big", "", "ms/msg at {big}", "low", None),
    ("w6.growth", "", "ms/msg {big} / {small}", "low", ("flat", 1.2)),
    ("idle", "idle CPU (no mail flowing)", "% of one core", "low", None),
    ("fsync", "fsyncs per message (strace -f, W1)", "fsync+fdatasync+syncfs", "low", None),
    ("w7.ops", "W7 disk: create+4KiB+fsync+rename+fsync dir", "ops/s, 1 writer", None, None),
    ("w7.ops16", "", "ops/s, 16 writers", None, None),
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="50 messages, qpy only (CI smoke)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per workload (default 3)")
    ap.add_argument("--big-rounds", type=int, default=1,
                    help="rounds of W6's largest run (default 1)")
    ap.add_argument("--only", default="",
                    help="comma list of W1..W7, W1M (W1 through a milter), idle, fsync")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    ap.add_argument("--no-postfix", action="store_true")
    ap.add_argument("--no-qpy", action="store_true")
    ap.add_argument("--no-strace", action="store_true", help="skip the fsync count")
    ap.add_argument("--profile", action="store_true",
                    help="add CPU per program, py-spy (qpy) and fsyncs by file to the results")
    ap.add_argument("--out", help="results file (default bench/results/DATE.md)")
    ap.add_argument("--deadline", type=float,
                    help="seconds a run may take before it fails (default 30 + 0.1/message)")
    ap.add_argument("--qpy-control", action="append", default=[], metavar="NAME=VALUE",
                    help="write control/NAME in the qpy root before it starts (repeatable)")
    return ap.parse_args(argv)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        s = args.scale
        if args.quick:
            self.n = {"w1": 50, "w2": 10, "w3": 0, "w4": 10, "small": 0, "big": 0,
                      "fsync": 20}
            self.w7_seconds = 0.5
            self.idle_seconds = 3.0
        else:
            self.n = {"w1": int(2000 * s), "w2": int(500 * s), "w3": int(2000 * s),
                      "w4": int(200 * s), "small": int(500 * s), "big": int(8000 * s),
                      "fsync": int(500 * s)}
            self.w7_seconds = 3.0
            self.idle_seconds = 10.0
        self.values: dict[str, dict[str, list[float]]] = {}
        self.failures: list[str] = []
        self.only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
        self.pw = None
        self.systems: list = []
        self.profile = ""

    def wanted(self, w: str) -> bool:
        return not self.only or w in self.only

    def setup(self) -> None:
        systems.reset_base(systems.BASE)
        self.pw = systems.bench_user()
        self.newdir = systems.maildir_new(self.pw)
        relay_port = systems.free_port()
        if not self.args.no_qpy:
            q = systems.Qpy(systems.BASE, relay_port)
            q.extra_control = dict(c.split("=", 1) for c in self.args.qpy_control)
            self.systems.append(q)
        if not self.args.no_postfix and not self.args.quick:
            self.systems.append(systems.Postfix(systems.BASE, relay_port))
        for s in self.systems:
            s.setup()
            s.start()
            log("%s: up on 127.0.0.1:%d (domain %s)" % (s.name, s.port, s.domain))

    def teardown(self) -> None:
        for s in self.systems:
            try:
                s.stop()
            except Exception as e:  # noqa: BLE001 - report and go on stopping the others
                log("%s: stop: %s" % (s.name, e))
        systems.clear_delivered()

    def record(self, key: str, system: str, value: float) -> None:
        self.values.setdefault(key, {}).setdefault(system, []).append(value)

    def run_one(self, label: str, sysm, fn, keys: dict[str, str]) -> dict | None:
        """One run on one system: clean Maildir and empty queue before, figures after."""
        if not wl.settle(sysm, 60):
            sysm.flush()
            wl.settle(sysm, 60)
        systems.empty_maildir(self.pw)
        if isinstance(sysm, systems.Qpy) and not sysm.roots():
            log("qpy: qpy-start is gone; restarting it\n" + sysm.log_tail())
            sysm.start()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - one failed run must not end the benchmark
            msg = "%s %s: %s" % (label, sysm.name, e)
            if not isinstance(e, wl.RunFailed):
                msg += "\n" + traceback.format_exc()
            if isinstance(sysm, systems.Qpy):
                msg += "\n--- qpy-start log (tail):\n" + sysm.log_tail()
            log("FAILED " + msg)
            self.failures.append(msg)
            return None
        for figure, key in keys.items():
            if figure in res:
                self.record(key, sysm.name, res[figure])
        log("%s %s: %s" % (label, sysm.name,
                           ", ".join("%s=%s" % (k, fmt(v)) for k, v in res.items())))
        return res

    def ab(self, label: str, rounds: int, make, keys: dict[str, str]) -> None:
        """A B A B: each round runs every system once, in the same order."""
        for r in range(rounds):
            for sysm in self.systems:
                self.run_one("%s round %d" % (label, r + 1), sysm, make(sysm), keys)

    def run(self) -> None:
        n, pw, nd, rounds = self.n, self.pw, self.newdir, self.args.rounds
        if self.args.quick:
            rounds = 1
        if self.wanted("W1") and not self.args.quick:
            self.ab("W1 s=1", rounds, lambda s: lambda: wl.w1(s, pw, nd, n["w1"], 1),
                    {"accept": "w1s1.accept", "deliver": "w1s1.deliver"})
        if self.wanted("W1") or self.wanted("W5") or self.wanted("W6"):
            self.ab("W1 s=16", rounds,
                    lambda s: lambda: wl.w1(s, pw, nd, n["w1"], SESSIONS, rss=True),
                    {"accept": "w1s16.accept", "deliver": "w1s16.deliver",
                     "ms_per_msg": "w1s16.ms_per_msg", "rss": "w5.rss",
                     "cpu_ms": "w1s16.cpu"})
        if self.wanted("W1M"):
            self.with_milter(rounds)
        if self.wanted("W2"):
            self.ab("W2", rounds, lambda s: lambda: wl.w2(s, pw, nd, n["w2"]),
                    {"inject": "w2.inject", "deliver": "w2.deliver", "ms_per_call": "w2.ms"})
            for q in (s for s in self.systems if isinstance(s, systems.Qpy)):
                root = q.idle_root()
                rcpt = "%s@%s" % (pw.pw_name, q.domain)
                for r in range(rounds):
                    res = wl.front_end_alone(systems.PYTHON, q.bin("qpy-sendmail"), root,
                                             rcpt, n["w2"])
                    self.record("w2.alone", "qpy", res["alone"])
                    self.record("w2.floor", "qpy", res["floor"])
                    log("W2 alone round %d: %s ms per qpy-sendmail call, %s ms per bare "
                        "interpreter start, in alternating blocks"
                        % (r + 1, fmt(res["alone"]), fmt(res["floor"])))
        if self.wanted("W3") and n["w3"]:
            self.ab("W3", rounds, lambda s: lambda: wl.w3(s, n["w3"], SESSIONS),
                    {"deliver": "w3.deliver"})
        if self.wanted("W4"):
            self.ab("W4", rounds, lambda s: lambda: wl.w4(s, pw, nd, n["w4"]),
                    {"p50": "w4.p50", "p99": "w4.p99"})
        if self.wanted("W6") and n["small"]:
            self.ab("W6 %d" % n["small"], rounds,
                    lambda s: lambda: wl.w1(s, pw, nd, n["small"], SESSIONS),
                    {"ms_per_msg": "w6.small"})
            self.ab("W6 %d" % n["big"], self.args.big_rounds,
                    lambda s: lambda: wl.w1(s, pw, nd, n["big"], SESSIONS),
                    {"ms_per_msg": "w6.big"})
            for s in self.systems:
                small = self.values.get("w6.small", {}).get(s.name)
                big = self.values.get("w6.big", {}).get(s.name)
                if small and big:
                    self.record("w6.growth", s.name,
                                statistics.median(big) / statistics.median(small))
        if self.wanted("IDLE"):
            self.ab("idle", 1, lambda s: lambda: wl.idle_cpu(s, self.idle_seconds),
                    {"idle": "idle"})
        if self.wanted("FSYNC") and not self.args.no_strace:
            self.ab("fsync count", 1,
                    lambda s: lambda: wl.fsyncs(s, pw, nd, n["fsync"], SESSIONS),
                    {"fsync": "fsync"})
        if self.wanted("W7"):
            for r in range(1 if self.args.quick else rounds):
                for writers, key in ((1, "w7.ops"), (SESSIONS, "w7.ops16")):
                    res = wl.w7(self.w7_seconds, writers)
                    self.record(key, "disk", res["ops"])
                    log("W7 round %d, %d writers: %s ops/s" % (r + 1, writers, fmt(res["ops"])))
        if self.args.profile and not self.args.quick:
            parts = []
            for s in self.systems:
                if isinstance(s, systems.Qpy):
                    parts.append(profile_qpy.profile(s, pw, nd, n["w1"], SESSIONS,
                                                     self.run_one))
                else:
                    parts.append(profile_qpy.cpu_profile(s, pw, nd, n["w1"], SESSIONS,
                                                         self.run_one))
            for s in self.systems:
                parts.append(profile_qpy.fsync_profile(s, pw, nd, n["fsync"], SESSIONS,
                                                       self.run_one))
                if isinstance(s, systems.Qpy):
                    parts.append(profile_qpy.latency_stages(s, pw, nd, n["w4"]))
            self.profile = "\n\n".join(parts)

    def with_milter(self, rounds: int) -> None:
        """W1 at 16 sessions through one pass-through filter (bench/passmilter.py, which
        asks for every stage and answers continue), the same filter for both systems:
        what one milter costs per message (issue 16)."""
        port = systems.free_port()
        filt = subprocess.Popen([sys.executable, os.path.join(HERE, "passmilter.py"),
                                 str(port)])
        try:
            wl._wait_port("127.0.0.1", port)
            for s in self.systems:
                s.set_milter("inet:127.0.0.1:%d" % port)
            self.ab("W1 + milter s=16", rounds,
                    lambda s: lambda: wl.w1(s, self.pw, self.newdir, self.n["w1"], SESSIONS),
                    {"deliver": "w1m.deliver", "cpu_ms": "w1m.cpu"})
        finally:
            for s in self.systems:
                s.set_milter(None)
            filt.terminate()
            filt.wait(timeout=10)

    def table(self) -> str:
        names = [s.name for s in self.systems]
        both = "qpy" in names and "Postfix" in names
        head = ["workload", "figure"] + names + (["qpy/Postfix", "target"] if both else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        subst = {"small": self.n["small"], "big": self.n["big"], "w1": self.n["w1"]}
        group = printed = None
        for key, work, figure, _better, target in ROWS:
            group = work or group
            vals = self.values.get(key, {})
            if not vals:
                continue
            # a group's name only on its first printed row
            label = "" if group == printed else group
            printed = group
            if key.startswith("w7."):
                cells = [summary(vals.get("disk", []))] + [""] * (len(names) - 1)
                lines.append("| %s | %s | %s |%s" % (label, figure, " | ".join(cells),
                                                    " | |" if both else ""))
                continue
            cells = [summary(vals.get(nm, [])) for nm in names]
            row = [label, figure.format(**subst)] + cells
            if both:
                q, p = vals.get("qpy"), vals.get("Postfix")
                ratio = statistics.median(q) / statistics.median(p) if q and p and \
                    statistics.median(p) else None
                row.append(fmt(ratio) if ratio is not None else "—")
                row.append(judge(target, ratio, q, self.values.get("w2.floor", {}).get("qpy")))
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def header(self) -> str:
        rev = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip() or "?"
        pfv = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                             text=True).stdout.strip() or "?"
        cpu = "?"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        n = self.n
        return "\n".join([
            "# qpy against Postfix, %s" % datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "",
            "- machine: %d CPUs (%s), Linux %s, Python %s" % (
                os.cpu_count() or 0, cpu, platform.release(), platform.python_version()),
            "- qpy commit %s; Postfix %s (private instance, default durability, "
            "home_mailbox = Maildir/)" % (rev, pfv),
            "- rounds: %d per workload, A B A B (W6 at %d: %d); medians, min–max in "
            "brackets; ratio = qpy median / Postfix median" % (
                self.args.rounds, n["big"], self.args.big_rounds),
            "- W1: smtp-source -s S -m %d -l %d; W2: %d x sendmail -f; W3: %d messages, "
            "16 sessions, to smtp-sink on 127.0.0.2; W4: %d messages one at a time; "
            "fsyncs: one W1 run of %d messages under strace -f -c" % (
                n["w1"], wl.MSG_SIZE, n["w2"], n["w3"], n["w4"], n["fsync"]),
        ])


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    a = abs(v)
    if a >= 100:
        return "%.0f" % v
    if a >= 10:
        return "%.1f" % v
    return "%.2f" % v


def summary(vals: list[float]) -> str:
    if not vals:
        return "—"
    m = statistics.median(vals)
    if len(vals) == 1:
        return fmt(m)
    return "%s (%s–%s)" % (fmt(m), fmt(min(vals)), fmt(max(vals)))


def judge(target, ratio: float | None, qvals: list[float] | None,
          floor: list[float] | None = None) -> str:
    if target is None:
        return ""
    op, t = target
    if op == "floor+":      # issue 18: qpy-sendmail's call at most t ms over a bare start
        if not qvals or not floor:
            return "qpy ≤ bare + %.0f ms" % t
        over = statistics.median(qvals) - statistics.median(floor)
        return "qpy ≤ bare + %.0f ms: %s" % (t, "met (%+.1f ms)" % over if over <= t else
                                             "not met (%+.1f ms)" % over)
    if op == "flat":
        if not qvals:
            return "qpy ≤ %.2f" % t
        g = statistics.median(qvals)
        return "qpy ≤ %.2f: %s" % (t, "met" if g <= t else "not met (%.2f)" % g)
    if ratio is None:
        return "%s %.1f" % ("≥" if op == ">=" else "≤", t)
    if op == ">=":
        return "≥ %.1f: %s" % (t, "met" if ratio >= t else
                               "short by %d %%" % round(100 * (1 - ratio / t)))
    return "≤ %.1f: %s" % (t, "met" if ratio <= t else
                           "over by %d %%" % round(100 * (ratio / t - 1)))


def log(msg: str) -> None:
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def results_path() -> str:
    day = datetime.date.today().isoformat()
    path = os.path.join(RESULTS, day + ".md")
    i = 2
    while os.path.exists(path):
        path = os.path.join(RESULTS, "%s-%d.md" % (day, i))
        i += 1
    return path


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run: needs root", file=sys.stderr)
        return 2
    wl.DEADLINE = args.deadline
    b = Bench(args)
    try:
        b.setup()
    except Exception as e:  # noqa: BLE001 - say what failed, clean up, exit 2
        log("setup failed: %s" % e)
        b.teardown()
        return 2
    try:
        b.run()
    finally:
        b.teardown()
    text = b.header() + "\n\n" + b.table() + "\n"
    if b.failures:
        text += "\nFailed runs:\n\n" + "\n".join(
            "- " + f.splitlines()[0] for f in b.failures) + "\n"
    if b.profile:
        text += "\n## Profile (bench/run --profile)\n\n```\n%s\n```\n" % b.profile.strip()
    print(text)
    if not args.quick:
        path = args.out or results_path()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        log("written: %s" % path)
    return 1 if b.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
