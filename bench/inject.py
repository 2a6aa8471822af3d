#!/opt/qpy/venv/bin/python3
"""bench/inject.py — injection rates: qpy-queue-inject, qpy-sendmail, and pickup.

    bench/inject.py [-n N] [--prefix /opt/qpy]

Lays out a scratch root, then measures, one process per message as shell loops
do: qpy-queue-inject (message on fd 0, envelope on fd 1), qpy-sendmail, and the
rate at which qpy-pickup admits N waiting drop files into the queue. Prints
messages per second; asserts nothing (tests do that).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

MESSAGE = b"Subject: bench\n\n" + b"x" * 2000 + b"\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--prefix", default=os.environ.get("QPY_PREFIX", "/opt/qpy"))
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from qpy.common import envelope

    bindir = os.path.join(args.prefix, "bin")
    base = tempfile.mkdtemp(prefix="qpy-bench-", dir="/var/tmp")
    os.chmod(base, 0o755)
    root = os.path.join(base, "qpy")
    subprocess.run([os.path.join(bindir, "qpy-install"), root, "--me", "bench.example"],
                   check=True, stdout=subprocess.DEVNULL)
    env = {"PATH": "/usr/bin:/bin", "QPY_ROOT": root}
    env_bytes = envelope.encode(b"a@bench.example", [b"b@bench.example"])
    drop = os.path.join(root, "queue", "drop")
    try:
        t0 = time.monotonic()
        for _ in range(args.n):
            r, w = os.pipe()
            os.write(w, env_bytes)
            os.close(w)
            subprocess.run([os.path.join(bindir, "qpy-queue-inject")], input=MESSAGE, stdout=r,
                           env=env, check=True)
            os.close(r)
        qi = args.n / (time.monotonic() - t0)
        t0 = time.monotonic()
        for _ in range(args.n):
            subprocess.run([os.path.join(bindir, "qpy-sendmail"), "-i", "b@bench.example"],
                           input=MESSAGE, env=env, check=True)
        sm = args.n / (time.monotonic() - t0)
        waiting = len(os.listdir(drop))
        t0 = time.monotonic()
        p = subprocess.Popen([os.path.join(bindir, "qpy-pickup")], env=env,
                             stderr=subprocess.DEVNULL)
        while os.listdir(drop):
            time.sleep(0.01)
        pk = waiting / (time.monotonic() - t0)
        p.terminate()
        p.wait()
        print("qpy-queue-inject  %8.1f msg/s  (%d messages, one process each)" % (qi, args.n))
        print("qpy-sendmail      %8.1f msg/s  (%d messages, one process each)" % (sm, args.n))
        print("qpy-pickup        %8.1f msg/s  (%d drop files admitted, start included)"
              % (pk, waiting))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
