"""bench/session_cpu.py — CPU and Python steps of qpy-smtpd's session code per message.

SYNOPSIS
    /opt/qpy/venv/bin/python3 bench/session_cpu.py [--sessions N] [--rounds R] [--steps]
                                                    [--prefix DIR]...

Runs as root. Starts a qpy system under QPY_BENCH_BASE/session (bench/systems.Qpy,
with pickup, so that messages go through its door as in production), then for each
prefix and round: a child process drops to qpyd and serves N sessions with
qpy.smtp.smtpd.serve() on a UNIX socket, while this process is the client: one
session per 2 KiB message (EHLO, MAIL, RCPT, DATA, QUIT, each answer awaited), as
smtp-source sends in W1. What is measured is the child's own CPU (getrusage) per
session after 20 sessions of warm-up: qpy-smtpd's session alone, without
qpy-tcpserver's accept and hand-over and without the rest of the system. Rounds
alternate between the prefixes (A B A B ...): on a shared machine compare the
medians, or the paired differences printed at the end.

--steps counts instead, with sys.settrace, the Python byte codes and Python calls a
session executes (deterministic, whatever the machine's load), per function.
Several --prefix (installs made with QPY_PREFIX=DIR ./setup.sh install) compare
versions; the default is QPY_PREFIX (or /opt/qpy).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import statistics
import sys

import systems

WARMUP = 20
RCPT = "%s@bench.example" % systems.USER
HEADER = (b"From: <a@b.example>\r\nTo: <%s>\r\nSubject: test\r\n"
          b"Date: Sun, 6 Dec 2026 21:00:00 +0000\r\nMessage-Id: <1@b.example>\r\n\r\n"
          % RCPT.encode())
BODY = b"".join(b"La de da de da %d.\r\n" % i + b"x" * 50 + b"\r\n" for i in range(24))
COMMANDS = [b"EHLO client.example\r\n", b"MAIL FROM:<a@b.example>\r\n",
            b"RCPT TO:<%s>\r\n" % RCPT.encode(), b"DATA\r\n",
            HEADER + BODY + b"..dot\r\n.\r\n", b"QUIT\r\n"]


def server(prefix: str, root: str, lst: socket.socket, n: int, steps: bool) -> None:
    """In the child: serve n + WARMUP sessions as qpyd; print user and sys ms a session
    (or byte codes and calls a session, by function)."""
    sys.path[:0] = [os.path.join(prefix, "venv/lib/python3.11/site-packages")]
    from qpy.common.privilege import preamble
    from qpy.smtp.config import Config
    from qpy.smtp.smtpd import serve
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    preamble("qpy-smtpd", root, "qpyd")
    cfg = Config(root)
    env = {"PROTO": "TCP", "TCPREMOTEIP": "127.0.0.1", "TCPLOCALIP": "127.0.0.1",
           "QPY_LISTENER": "smtp", "RELAYCLIENT": ""}
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    counts = [0, 0]
    byfn: dict[str, int] = {}

    def tracer(frame, event, arg):
        if event == "call":
            counts[1] += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            counts[0] += 1
            code = frame.f_code
            key = "%s:%s" % (code.co_filename.split("site-packages/")[-1], code.co_name)
            byfn[key] = byfn.get(key, 0) + 1
        return tracer

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(n + WARMUP):
        if i == WARMUP:
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            if steps:
                sys.settrace(tracer)
        c, _ = lst.accept()
        cfg.refresh()
        serve(cfg, env, c.fileno(), c.fileno())
        c.close()
    sys.settrace(None)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if steps:
        out = ["%d %d" % (counts[0] / n, counts[1] / n)]
        out += ["%8.1f %s" % (v / n, k) for k, v in
                sorted(byfn.items(), key=lambda kv: -kv[1])[:25]]
    else:
        out = ["%.4f %.4f" % (1000 * (r1.ru_utime - r0.ru_utime) / n,
                              1000 * (r1.ru_stime - r0.ru_stime) / n)]
    os.write(1, ("\n".join(out) + "\n").encode())


def reply(s: socket.socket, buf: bytearray) -> bytes:
    """The last line of the next reply (multi-line replies read to their end)."""
    while True:
        i = buf.find(b"\r\n")
        while i != -1:
            line = bytes(buf[:i])
            del buf[:i + 2]
            if line[3:4] == b" ":
                return line
            i = buf.find(b"\r\n")
        data = s.recv(65536)
        if not data:
            raise RuntimeError("the session closed early")
        buf += data


def one_run(prefix: str, root: str, n: int, steps: bool) -> str:
    path = os.path.join(systems.BASE, "session-%d.sock" % os.getpid())
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    os.chmod(path, 0o777)
    lst.listen(5)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(wfd, 1)
        try:
            server(prefix, root, lst, n, steps)
        finally:
            os._exit(0)
    os.close(wfd)
    try:
        for _ in range(n + WARMUP):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                buf = bytearray()
                reply(s, buf)
                for cmd in COMMANDS:
                    s.sendall(cmd)
                    last = reply(s, buf)
                    if cmd is COMMANDS[4] and not last.startswith(b"250"):
                        raise RuntimeError("message refused: %r" % last)
    finally:
        lst.close()
        os.waitpid(pid, 0)
        os.unlink(path)
    with os.fdopen(rfd, "rb") as f:
        return f.read().decode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", action="store_true")
    ap.add_argument("--prefix", action="append")
    a = ap.parse_args()
    prefixes = a.prefix or [systems.PREFIX]
    systems.bench_user()
    base = os.path.join(systems.BASE, "session")
    systems.reset_base(base)
    qpy = systems.Qpy(base, 1)
    qpy.setup()
    qpy.start()
    got: dict[str, list[tuple[float, float]]] = {p: [] for p in prefixes}
    try:
        for r in range(1 if a.steps else a.rounds):
            for p in prefixes:
                out = one_run(p, qpy.root, a.sessions if not a.steps else 200, a.steps)
                if a.steps:
                    print("%s: byte codes, Python calls a session:\n%s" % (p, out))
                    continue
                user, sys_ = (float(x) for x in out.split())
                got[p].append((user, sys_))
                print("round %d %s: user %.3f sys %.3f ms a session" % (r, p, user, sys_),
                      flush=True)
            systems.empty_maildir(systems.bench_user())
    finally:
        qpy.stop()
        systems.clear_delivered()
    if not a.steps:
        first = [u + s for u, s in got[prefixes[0]]]
        for p in prefixes:
            total = [u + s for u, s in got[p]]
            diff = statistics.median(t - f for t, f in zip(total, first, strict=True))
            print("%s: median %.3f ms a session (user %.3f, sys %.3f); paired against %s %+.3f"
                  % (p, statistics.median(total), statistics.median(u for u, _ in got[p]),
                     statistics.median(s for _, s in got[p]), prefixes[0], diff))
    return 0


if __name__ == "__main__":
    sys.exit(main())
