"""delivery — end-to-end rate: N messages from qpy-sendmail into a Maildir.

SYNOPSIS
    bench/delivery.py [--messages N] [--parallel P] [--keep]

Runs as root after ./setup.sh install. Lays out a fresh root under /var/tmp/qpy-bench-delivery
(qpy-install --me bench.example), a real user `qtbench` with ~/Maildir/, starts qpy-start,
then runs qpy-sendmail N times (P at a time) to qtbench@bench.example and waits until all
N messages are in Maildir/new. Prints injection time, total time and messages per second
(from the first qpy-sendmail to the last message in the Maildir), and the same for
queue-send's own share (first `new msg` to last `end msg` in its log). Exit 0 when every
message arrived, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

PREFIX = os.environ.get("QPY_PREFIX", "/opt/qpy")
BIN = os.path.join(PREFIX, "bin")
BASE = "/var/tmp/qpy-bench-delivery"
USER = "qtbench"
DOMAIN = "bench.example"
TIMEOUT = 600


def setup_user(home: str) -> pwd.struct_passwd:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", "-d", home, USER],
                       check=True)
    subprocess.run(["usermod", "-d", home, USER], check=True, capture_output=True)
    pw = pwd.getpwnam(USER)
    for sub in ("", "/Maildir", "/Maildir/new", "/Maildir/cur", "/Maildir/tmp"):
        os.makedirs(home + sub, exist_ok=True)
        os.chown(home + sub, pw.pw_uid, pw.pw_gid)
        os.chmod(home + sub, 0o755 if not sub else 0o700)
    return pw


def stamp_of(line: str) -> float:
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + float(line[19:26])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="leave the root in place")
    args = ap.parse_args()
    if os.getuid() != 0:
        print("bench/delivery.py: run as root")
        return 2
    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(BASE, mode=0o755)
    root = os.path.join(BASE, "root")
    subprocess.run([os.path.join(BIN, "qpy-install"), root, "--me", DOMAIN], check=True,
                   capture_output=True)
    pw = setup_user(os.path.join(BASE, "home"))
    new = os.path.join(pw.pw_dir, "Maildir", "new")
    env = {"QPY_ROOT": root, "PATH": "/usr/bin:/bin"}
    logpath = os.path.join(BASE, "start.log")
    with open(logpath, "wb") as log:
        start = subprocess.Popen([os.path.join(BIN, "qpy-start"), root], stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
    try:
        time.sleep(1.5)
        msg = b"Subject: bench\n\n" + b"x" * 1000 + b"\n"
        sendmail = os.path.join(BIN, "qpy-sendmail")

        def one(i: int) -> int:
            return subprocess.run([sendmail, "-f", "bench@%s" % DOMAIN,
                                   "%s@%s" % (USER, DOMAIN)], input=msg, env=env,
                                  capture_output=True).returncode

        t0 = time.time()
        with ThreadPoolExecutor(args.parallel) as ex:
            codes = list(ex.map(one, range(args.messages)))
        t_inject = time.time() - t0
        while len(os.listdir(new)) < args.messages and time.time() - t0 < TIMEOUT:
            time.sleep(0.05)
        t_all = time.time() - t0
        got = len(os.listdir(new))
    finally:
        start.send_signal(signal.SIGTERM)
        start.wait(timeout=120)
    with open(logpath) as f:
        lines = f.read().splitlines()
    news = [stamp_of(ln) for ln in lines if re.search(r"queue-send: new msg ", ln)]
    ends = [stamp_of(ln) for ln in lines if re.search(r"queue-send: end msg ", ln)]
    print("messages: %d sent (%d sendmail failures), %d delivered" % (
        args.messages, sum(1 for c in codes if c), got))
    print("injection: %.1f s (%.1f msg/s with %d qpy-sendmail at a time)" % (
        t_inject, args.messages / t_inject, args.parallel))
    print("end to end: %.1f s, %.1f msg/s (first qpy-sendmail to last message in Maildir)"
          % (t_all, got / t_all))
    if news and ends:
        span = max(ends) - min(news)
        print("queue-send: %.1f s from first 'new msg' to last 'end msg' (%.1f msg/s)"
              % (span, len(ends) / span if span else 0.0))
    if not args.keep:
        shutil.rmtree(BASE, ignore_errors=True)
    return 0 if got == args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
