"""bench/connect.py — CPU and page faults of qpy-tcpserver per bare SMTP connection (issue 7).

SYNOPSIS
    /opt/qpy/venv/bin/python3 bench/connect.py [--connections N]

Runs as root. Lays out a fresh qpy root under /var/tmp/qpybench-connect, starts
QPY_PREFIX/bin/qpy-tcpserver (default prefix /opt/qpy) on a free 127.0.0.1 port and
makes N connections one after another, each: read the greeting, QUIT, read to the
close. Prints the CPU time (user+system) and the minor page faults of the server and
all its children (live, and reaped ones through the parent's totals) per connection,
and the connections per second. QPY_PREFIX pointing at another build compares two.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time

PREFIX = os.environ.get("QPY_PREFIX", "/opt/qpy")
BASE = "/var/tmp/qpybench-connect"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_counters(pid: int) -> tuple[int, int]:
    """(minor faults, CPU clock ticks) of pid and its children, reaped ones included."""
    pids = [pid]
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    faults = ticks = 0
    for p in pids:
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # from field 3 (state): minflt 10, cminflt 11, utime 14 .. cstime 17
        faults += int(fields[7]) + int(fields[8])
        ticks += sum(int(x) for x in fields[11:15])
    return faults, ticks


def one(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        buf = b""
        while b"\n" not in buf:
            data = s.recv(4096)
            if not data:
                raise RuntimeError("closed before the greeting")
            buf += data
        if not buf.startswith(b"220 "):
            raise RuntimeError("greeting %r" % buf[:100])
        s.sendall(b"QUIT\r\n")
        while s.recv(4096):
            pass


def start_server(root: str, port: int) -> subprocess.Popen:
    """A fresh root listening on 127.0.0.1:port (qpy-install --smtp) and its tcpserver."""
    bindir = os.path.join(PREFIX, "bin")
    subprocess.run([os.path.join(bindir, "qpy-install"), root, "--me", "bench.example",
                    "--smtp", "127.0.0.1:%d" % port], check=True, capture_output=True)
    with open(os.path.join(BASE, "tcpserver.log"), "wb") as log:
        return subprocess.Popen([os.path.join(bindir, "qpy-tcpserver"), root], stdout=log,
                                stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"})


def main() -> int:
    parser = argparse.ArgumentParser(description="qpy-tcpserver cost per connection")
    parser.add_argument("--connections", type=int, default=500)
    n = parser.parse_args().connections
    if os.geteuid():
        sys.exit("bench/connect.py: run it as root")
    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(BASE, mode=0o755)
    port = free_port()
    server = start_server(os.path.join(BASE, "qpy"), port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                one(port)          # also warms the server up
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("qpy-tcpserver does not answer on %d" % port)
                time.sleep(0.05)
        time.sleep(0.5)
        faults0, ticks0 = tree_counters(server.pid)
        t0 = time.monotonic()
        for _ in range(n):
            one(port)
        elapsed = time.monotonic() - t0
        time.sleep(0.5)            # the last session's end reaped or reported
        faults1, ticks1 = tree_counters(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print("qpy-tcpserver (%s), %d connections (greeting, QUIT) one after another: "
          "%.2f ms CPU and %.0f minor page faults per connection, %.0f connections/s; "
          "load %.1f" % (PREFIX, n, 1000.0 * (ticks1 - ticks0) / os.sysconf("SC_CLK_TCK") / n,
                         (faults1 - faults0) / n, n / elapsed, os.getloadavg()[0]))
    shutil.rmtree(BASE, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
