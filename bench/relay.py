"""relay — relay rate: SMTP in to qpy, out through qpy-rspawn/qpy-remote to smtp-sink.

SYNOPSIS
    bench/relay.py [--messages N] [--sessions S] [--size BYTES] [--keep] [--cpu]
                   [--spy FILE]

Runs as root after ./setup.sh install. Lays out a fresh root under /var/tmp/qpy-bench-relay
(qpy-install --me bench.example) listening on 127.0.0.1 (relaying for 127.), with
`control/smtproutes` sending everything to Postfix's smtp-sink on 127.0.0.2, starts
qpy-start, then runs smtp-source with S sessions and N messages and waits until
smtp-sink has received all N (it exits after N with -M). Prints the accept time (until
smtp-source returns), the total time and messages per second from the first SMTP
connection to the last message at the sink. Exit 0 when all N arrived, 1 otherwise.
Defaults: 2,000 messages, 16 sessions, 1 KB each (issue 5).

--cpu adds the CPU each qpy program used per message (user+sys of every process
under qpy-start, and of the children each reaped: bench/profile_qpy.py's table):
on a shared machine that is the figure to compare, not msg/s. --spy FILE runs
`py-spy record --subprocesses --gil` over the run into FILE (raw stacks) and
prints bench/profile_qpy.py's summary of it. QPY_BENCH_BASE=DIR puts the root
under DIR/relay, so that two runs on one machine stay apart.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_qpy  # noqa: E402  (bench/'s own modules)

PREFIX = os.environ.get("QPY_PREFIX", "/opt/qpy")
BIN = os.path.join(PREFIX, "bin")
BASE = os.path.join(os.environ["QPY_BENCH_BASE"], "relay") \
    if os.environ.get("QPY_BENCH_BASE") else "/var/tmp/qpy-bench-relay"
TIMEOUT = 900


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, proc: subprocess.Popen, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("relay: nothing listens on %s:%d" % (host, port))


def control(root: str, name: str, text: str) -> None:
    with open(os.path.join(root, "control", name), "w") as f:
        f.write(text)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--keep", action="store_true", help="keep the root afterwards")
    ap.add_argument("--cpu", action="store_true", help="CPU per message by program")
    ap.add_argument("--spy", metavar="FILE", help="py-spy record over the run into FILE")
    a = ap.parse_args()
    if os.getuid() != 0:
        print("relay: run as root", file=sys.stderr)
        return 1
    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(BASE, mode=0o755)
    root = os.path.join(BASE, "qpy")
    subprocess.run([os.path.join(BIN, "qpy-install"), root, "--me", "bench.example"],
                   check=True, capture_output=True)
    inport, sinkport = free_port("127.0.0.1"), free_port("127.0.0.2")
    control(root, "smtplisten", "127.0.0.1:%d\n" % inport)
    control(root, "smtprules", '127.:allow,RELAYCLIENT=""\n:allow\n')
    control(root, "smtproutes", ":[127.0.0.2]:%d\n" % sinkport)
    control(root, "concurrencyremote", "%d\n" % max(20, a.sessions))
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "QPY_ROOT": root}
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-M", str(a.messages),
                             "127.0.0.2:%d" % sinkport, "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = open(os.path.join(BASE, "start.log"), "wb")
    qpy = subprocess.Popen([os.path.join(BIN, "qpy-start"), root], env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    ok = False
    try:
        wait_port("127.0.0.2", sinkport, sink)
        wait_port("127.0.0.1", inport, qpy)
        spy = cpu = None
        if a.cpu or a.spy:
            time.sleep(1.0)     # the start's own CPU is not the run's
            cpu = profile_qpy.cpu_by_program([qpy.pid])
        if a.spy:
            spy = subprocess.Popen([profile_qpy.pyspy() or "py-spy", "record", "--subprocesses",
                                    "--nonblocking", "--gil", "--format", "raw", "--rate",
                                    str(profile_qpy.RATE), "-o", a.spy, "-p", str(qpy.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        t0 = time.monotonic()
        r = subprocess.run(["smtp-source", "-s", str(a.sessions), "-m", str(a.messages),
                            "-l", str(a.size), "-f", "bench@bench.example",
                            "-t", "sink@relay.example", "127.0.0.1:%d" % inport],
                           capture_output=True, text=True, timeout=TIMEOUT)
        t1 = time.monotonic()
        if r.returncode != 0:
            print("relay: smtp-source failed: %s" % r.stderr.strip()[-300:], file=sys.stderr)
            return 1
        try:
            sink.wait(TIMEOUT)
            ok = True
        except subprocess.TimeoutExpired:
            print("relay: smtp-sink did not get all %d messages" % a.messages, file=sys.stderr)
            return 1
        t2 = time.monotonic()
        if cpu is not None:
            time.sleep(0.5)     # the last results reach queue-send
            print(profile_qpy.cpu_table(cpu, profile_qpy.cpu_by_program([qpy.pid]),
                                        a.messages).replace("(W1,", "(W3 relay,"))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            print(profile_qpy.summarize(a.spy, a.messages).replace("W1 run", "relay run"))
        print("relay: %d messages, %d sessions, %d bytes each" % (a.messages, a.sessions, a.size))
        print("relay: accepted in %.2f s (%.1f msg/s)" % (t1 - t0, a.messages / (t1 - t0)))
        print("relay: at smtp-sink in %.2f s: %.1f msg/s relayed" % (t2 - t0,
                                                                     a.messages / (t2 - t0)))
        return 0
    finally:
        qpy.send_signal(signal.SIGTERM)
        try:
            qpy.wait(120)
        except subprocess.TimeoutExpired:
            qpy.kill()
            qpy.wait()
        if sink.poll() is None:
            sink.terminate()
            sink.wait(10)
        log.close()
        if not a.keep and ok:
            shutil.rmtree(BASE, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
