"""local — qpy-lspawn's own rate: N Maildir deliveries through the spawn socket.

SYNOPSIS
    bench/local.py [--messages N] [--concurrency C] [--size BYTES] [--mbox]

Runs as root after ./setup.sh install. Lays out a root under /var/tmp/qpy-bench-local,
a real user `qtbench` with a fresh home (QPY_BENCH_BASE and QPY_BENCH_USER override
both, so that two runs on one machine stay apart), starts bin/qpy-lspawn with a SOCK_SEQPACKET
socketpair on its fd 0 (as qpy-start does) and keeps C requests in flight (as
queue-send does under concurrencylocal) until N deliveries have answered K. Prints
deliveries per second, the CPU of qpy-lspawn and its workers per delivery (user and
system, from wait4), and checks that N files arrived (or N messages in the mbox).
The queue, pickup and queue-send are not involved: bench/delivery.py measures the
whole path.
"""

from __future__ import annotations

import argparse
import os
import pwd
import select
import shutil
import socket
import subprocess
import sys
import time

PREFIX = os.environ.get("QPY_PREFIX", "/opt/qpy")
BASE = os.environ.get("QPY_BENCH_BASE", "/var/tmp/qpy-bench-local")
USER = os.environ.get("QPY_BENCH_USER", "qtbench")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--mbox", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(PREFIX, "venv", "lib", "python%d.%d" % sys.version_info[:2],
                                    "site-packages"))
    from qpy.common import spawn

    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(BASE, mode=0o755)
    root = os.path.join(BASE, "qpy")
    subprocess.run([os.path.join(PREFIX, "bin", "qpy-install"), root, "--me", "bench.example"],
                   check=True, capture_output=True)
    home = os.path.join(BASE, "home")
    try:
        pw = pwd.getpwnam(USER)
        subprocess.run(["usermod", "-d", home, USER], check=True, capture_output=True)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", "-d", home, USER],
                       check=True, capture_output=True)
    pw = pwd.getpwnam(USER)
    os.makedirs(home, mode=0o755)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    if a.mbox:
        with open(os.path.join(home, ".qmail"), "w") as f:
            f.write("./Mailbox\n")
        os.chown(os.path.join(home, ".qmail"), pw.pw_uid, pw.pw_gid)
    q = pwd.getpwnam("qpyq")
    msg = os.path.join(BASE, "msg")
    body = b"Subject: bench\n\n" + (b"x" * 70 + b"\n") * max(1, a.size // 71)
    with open(msg, "wb") as f:
        f.write(body)
    os.chown(msg, q.pw_uid, q.pw_gid)

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([os.path.join(PREFIX, "bin", "qpy-lspawn")], stdin=theirs,
                            env={"PATH": "/usr/bin:/bin", "QPY_ROOT": root})
    theirs.close()
    sent = done = failed = 0
    rcpt = b"%s@bench.example" % USER.encode()
    start = time.monotonic()
    try:
        while done < a.messages:
            while sent < a.messages and sent - done < a.concurrency:
                fd = os.open(msg, os.O_RDONLY)
                spawn.send_request(mine, sent + 1, b"bench@remote.example", [rcpt], fd)
                os.close(fd)
                sent += 1
            ready, _, _ = select.select([mine], [], [], 120)
            if not ready:
                print("no answer for 120 s", file=sys.stderr)
                return 1
            _, results = spawn.recv_result(mine)
            done += 1
            if results[0][0] != b"K":
                failed += 1
                print("failed:", results[0], file=sys.stderr)
        took = time.monotonic() - start
    finally:
        mine.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if a.mbox:
        import mailbox
        got = len(mailbox.mbox(os.path.join(home, "Mailbox")))
    else:
        got = len(os.listdir(os.path.join(home, "Maildir", "new")))
    kind = "mbox" if a.mbox else "Maildir"
    print(f"qpy-lspawn: {a.messages} deliveries of {len(body)} bytes into a {kind}, "
          f"concurrency {a.concurrency}: {took:.2f} s, {a.messages / took:.0f} deliveries/s; "
          f"{got} arrived, {failed} failed")
    print(f"CPU of qpy-lspawn and its workers, ms per delivery: "
          f"{1000 * usage.ru_utime / a.messages:.3f} user + "
          f"{1000 * usage.ru_stime / a.messages:.3f} sys")
    return 0 if got == a.messages and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
