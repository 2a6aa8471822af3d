"""bench/smtp.py — SMTP accept rate of qpy-tcpserver + qpy-smtpd (issue 4).

SYNOPSIS
    /opt/qpy/venv/bin/python3 bench/smtp.py [--messages N] [--rounds R] [--size BYTES] [--milter]
                                            [--control NAME=VALUE]...

Runs as root (qpy-install with the system users). Lays out a fresh qpy root under
/var/tmp/qpybench-smtp, starts qpy-tcpserver on a free 127.0.0.1 port with maxsmtpd 100
and no pickup, and drives it with Postfix's smtp-source at 1 and 16 concurrent sessions,
both keeping connections open (smtp-source -d: many messages per connection) and
with a new connection (so a new forked session) per message. A message is counted only when its
complete, fsync'd drop file is in queue/drop/: the rate is the rate of 250 replies
after DATA, each durable. Prints a Markdown table of medians over the rounds (min-max),
with the CPU time per message of qpy-tcpserver and its workers (user + system, live
and reaped: the figure to compare on a loaded machine, where the rate mostly says how
busy the neighbours are).
With --milter, control/milters names one pass-through filter (bench/passmilter.py, in
a process of its own): the difference to a run without is what one milter costs.
--control writes a control file before the server starts (e.g. smtpdsessions=1, to see
what a fresh process per connection costs); QPY_BENCH_BASE moves the directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

import psutil

PREFIX = os.environ.get("QPY_PREFIX", "/opt/qpy")
BASE = os.environ.get("QPY_BENCH_BASE", "/var/tmp/qpybench-smtp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("qpy-tcpserver does not listen on %d" % port)


def final_drops(drop: str) -> int:
    return sum(1 for n in os.listdir(drop) if n[:1].isdigit())


def tree_cpu(pid: int) -> float:
    """CPU seconds of the server and its workers: its own, its reaped children's and
    its live children's (a worker's CPU moves from the last to the second when reaped)."""
    server = psutil.Process(pid)
    t = server.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in server.children():
        try:
            c = child.cpu_times()
        except psutil.Error:
            continue            # exited just now: its time is in children_* next time
        total += c.user + c.system
    return total


def run_once(root: str, port: int, sessions: int, messages: int, size: int,
             disconnect: bool, pid: int) -> tuple[float, float]:
    """(messages a second, CPU milliseconds a message of the server and its workers)"""
    drop = os.path.join(root, "queue", "drop")
    for n in os.listdir(drop):
        os.unlink(os.path.join(drop, n))
    args = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", "bench@client.example", "-t", "postmaster@bench.example",
            "-M", "client.example"]
    if not disconnect:
        args.append("-d")     # smtp-source -d: keep the connection for the next message
    cpu = tree_cpu(pid)
    start = time.monotonic()
    r = subprocess.run(args + ["127.0.0.1:%d" % port], capture_output=True, timeout=600)
    elapsed = time.monotonic() - start
    if r.returncode != 0:
        raise RuntimeError("smtp-source: %s" % r.stderr.decode(errors="replace")[-500:])
    got = final_drops(drop)
    if got != messages:
        raise RuntimeError("%d messages sent, %d in queue/drop" % (messages, got))
    return messages / elapsed, (tree_cpu(pid) - cpu) * 1000 / messages


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--milter", action="store_true", help="through one pass-through milter")
    ap.add_argument("--control", action="append", default=[], metavar="NAME=VALUE")
    opts = ap.parse_args()
    if os.getuid() != 0:
        sys.stderr.write("bench/smtp.py: needs root\n")
        return 2
    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(BASE, mode=0o755)
    root = os.path.join(BASE, "qpy")
    subprocess.run([os.path.join(PREFIX, "bin", "qpy-install"), root, "--me", "bench.example"],
                   check=True, capture_output=True)
    port = free_port()
    with open(os.path.join(root, "control", "smtplisten"), "w") as f:
        f.write("127.0.0.1:%d\n" % port)
    with open(os.path.join(root, "control", "maxsmtpd"), "w") as f:
        f.write("100\n")
    filt = None
    if opts.milter:
        mport = free_port()
        filt = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(
            os.path.abspath(__file__)), "passmilter.py"), str(mport)])
        wait_port(mport)
        with open(os.path.join(root, "control", "milters"), "w") as f:
            f.write("inet:127.0.0.1:%d\n" % mport)
    for setting in opts.control:
        name, _, value = setting.partition("=")
        with open(os.path.join(root, "control", os.path.basename(name)), "w") as f:
            f.write(value + "\n")
    log = open(os.path.join(BASE, "tcpserver.log"), "wb")
    server = subprocess.Popen([os.path.join(PREFIX, "bin", "qpy-tcpserver"), root],
                              env={"PATH": "/usr/bin:/bin", "QPY_ROOT": root},
                              stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        wait_port(port)
        for disconnect in (False, True):
            for sessions in (1, 16):
                got = [run_once(root, port, sessions, opts.messages, opts.size, disconnect,
                                server.pid) for _ in range(opts.rounds)]
                rates, cpus = [g[0] for g in got], [g[1] for g in got]
                rows.append((sessions, "one per message" if disconnect else "kept open",
                             statistics.median(rates), min(rates), max(rates),
                             statistics.median(cpus), min(cpus), max(cpus)))
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
        if filt is not None:
            filt.terminate()
            filt.wait(timeout=10)
    print("SMTP accept rate, qpy-tcpserver + qpy-smtpd%s, %d messages of %d bytes, "
          "median of %d rounds (min-max); %d CPUs, load %.1f%s"
          % (" + one pass-through milter" if opts.milter else "", opts.messages, opts.size,
             opts.rounds, os.cpu_count() or 0, os.getloadavg()[0],
             "".join("; " + c for c in opts.control)))
    print()
    print("| sessions | connections | messages/s | CPU ms/message |")
    print("|---:|---|---:|---:|")
    for sessions, conn, med, lo, hi, cmed, clo, chi in rows:
        print("| %d | %s | %.0f (%.0f-%.0f) | %.2f (%.2f-%.2f) |"
              % (sessions, conn, med, lo, hi, cmed, clo, chi))
    shutil.rmtree(BASE, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
