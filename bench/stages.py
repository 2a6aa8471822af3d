"""bench/stages.py — W1 at one session, reply by reply: where a message's time goes.

SYNOPSIS
    bench/run-stages [--messages N] [--rounds R] [--no-postfix] [--no-qpy]
    (QPY_PREFIX=/opt/qpy /opt/qpy/venv/bin/python3 bench/stages.py ...)

Runs as root. Lays out qpy and a private Postfix exactly as bench/run does (bench/systems,
under QPY_BENCH_BASE, default /var/tmp/qpybench-stages so that it never resets a bench/run
in progress), then for each round and system in turn (qpy, Postfix, qpy, ...) sends N
messages one session each, as `smtp-source -s 1` does in W1 (connect, HELO, MAIL, RCPT,
DATA, the 2 KiB payload and the dot, QUIT, close), and takes the time of every reply on
the client with time.perf_counter_ns(). Prints, per stage, the median and p90 over all
messages of all rounds for each system, and the ratio qpy/Postfix of the medians:

    connect → 220      the listener's accept and hand-over, the greeting
    HELO → 250, MAIL → 250, RCPT → 250, DATA → 354
    dot → 250          the message made durable in the queue
    QUIT → 221, close  the end of the session (close: until the server's FIN)
    between            the client's own time between replies (the same code for both)

The client is Python and the same for both systems; its own cost is in "between", so
the stage figures compare the servers. Deliveries run meanwhile as in W1 (the Maildir
is emptied before each round); the sum of the stages is the W1 one-session time a
message. Each round then also times `smtp-source -s 1 -m N` (W1's client, in C) on the
same system: a row of ms a message until it returns. The last two rows are the whole
machine's CPU time a message (/proc/stat, user and system, from the first session of
the stage pass to the last delivery, the client included: run it on a quiet machine).
On the 2-core machine, one session keeps the machine most of the time busy, so CPU a
message is what the one-session rate follows.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("QPY_BENCH_BASE", "/var/tmp/qpybench-stages")

import systems  # noqa: E402 - after QPY_BENCH_BASE is set
import workloads as wl  # noqa: E402

STAGES = ("connect → 220", "HELO → 250", "MAIL → 250", "RCPT → 250", "DATA → 354",
          "dot → 250", "QUIT → 221", "close", "between", "total")
PAYLOAD = 2048


class Client:
    """One SMTP session on a socket; reply() reads one whole (multi-line) reply."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def reply(self, want: bytes) -> None:
        while True:
            i = self.buf.find(b"\r\n")
            if i < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise RuntimeError("connection closed awaiting %r" % want)
                self.buf += chunk
                continue
            line, self.buf = self.buf[:i], self.buf[i + 2:]
            if line[3:4] != b"-":
                if line[:3] != want:
                    raise RuntimeError("expected %r, got %r" % (want, line))
                return

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def closed(self) -> None:
        while self.sock.recv(65536):
            pass
        self.sock.close()


def message(sender: str, rcpt: str, i: int) -> bytes:
    head = ("From: <%s>\r\nTo: <%s>\r\nSubject: stage %d\r\n\r\n" % (sender, rcpt, i)).encode()
    line = b"X" * 78 + b"\r\n"
    body = line * (PAYLOAD // len(line)) + b"X" * (PAYLOAD % len(line) - 2) + b"\r\n"
    return head + body + b".\r\n"


def one(port: int, sender: str, rcpt: str, i: int) -> list[float]:
    """One session; the time of each stage in ms, in STAGES order."""
    ns = time.perf_counter_ns
    out = []
    between = 0
    t0 = ns()
    c = Client(port)
    c.reply(b"220")
    t = ns()
    out.append(t - t0)
    for cmd, want in ((b"HELO client.example\r\n", b"250"),
                      (b"MAIL FROM:<%s>\r\n" % sender.encode(), b"250"),
                      (b"RCPT TO:<%s>\r\n" % rcpt.encode(), b"250"),
                      (b"DATA\r\n", b"354"),
                      (message(sender, rcpt, i), b"250"),
                      (b"QUIT\r\n", b"221")):
        s = ns()
        between += s - t
        c.send(cmd)
        c.reply(want)
        t = ns()
        out.append(t - s)
    c.closed()
    e = ns()
    out += [e - t, between, e - t0]
    return [v / 1e6 for v in out]


def delivered(pw, n: int) -> None:
    newdir = systems.maildir_new(pw)
    deadline = time.monotonic() + 120
    while systems.count_files(newdir) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def busy_ms() -> tuple[float, float]:
    """CPU time of the whole machine so far (user+nice, system+irq+softirq), ms."""
    with open("/proc/stat", "rb") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    tick = 1000 / os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1]) * tick, (v[2] + v[5] + v[6]) * tick


def run(sysm, pw, n: int) -> tuple[list[list[float]], tuple[float, float]]:
    """n sessions, then until delivered: the stages, and the machine's CPU a message."""
    sender = "bench@src.example"
    rcpt = "%s@%s" % (pw.pw_name, sysm.domain)
    u0, s0 = busy_ms()
    rows = [one(sysm.port, sender, rcpt, i) for i in range(n)]
    delivered(pw, n)
    u1, s1 = busy_ms()
    return rows, ((u1 - u0) / n, (s1 - s0) / n)


def source(sysm, pw, n: int) -> float:
    """smtp-source -s 1 -m n, as W1 runs it: ms a message until it returns."""
    t0 = time.monotonic()
    wl.smtp_source(sysm.port, "%s@%s" % (pw.pw_name, sysm.domain), n, 1)
    ms = 1000 * (time.monotonic() - t0) / n
    delivered(pw, n)
    return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-postfix", action="store_true")
    ap.add_argument("--no-qpy", action="store_true")
    args = ap.parse_args()
    if os.getuid() != 0:
        print("bench/stages.py: needs root", file=sys.stderr)
        return 2
    systems.reset_base(systems.BASE)
    pw = systems.bench_user()
    relay_port = systems.free_port()
    syss = []
    if not args.no_qpy:
        syss.append(systems.Qpy(systems.BASE, relay_port))
    if not args.no_postfix:
        syss.append(systems.Postfix(systems.BASE, relay_port))
    rows: dict[str, list[list[float]]] = {s.name: [] for s in syss}
    src: dict[str, list[float]] = {s.name: [] for s in syss}
    cpu: dict[str, list[tuple[float, float]]] = {s.name: [] for s in syss}
    try:
        for s in syss:
            s.setup()
            s.start()
        for r in range(args.rounds):
            for s in syss:
                wl.settle(s, 60)
                systems.empty_maildir(pw)
                got, (user, sys_) = run(s, pw, args.messages)
                rows[s.name] += got
                cpu[s.name].append((user, sys_))
                wl.settle(s, 60)
                systems.empty_maildir(pw)
                src[s.name].append(source(s, pw, args.messages))
                print("round %d %s: %.3f ms a message (median), smtp-source %.3f ms" %
                      (r + 1, s.name, statistics.median(g[-1] for g in got), src[s.name][-1]),
                      file=sys.stderr)
    finally:
        for s in syss:
            s.stop()
        systems.clear_delivered()
    names = [s.name for s in syss]
    print("| stage | " + " | ".join("%s p50 (p90) ms" % n for n in names)
          + (" | qpy/Postfix |" if len(names) == 2 else " |"))
    print("|---" * (len(names) + 1 + (len(names) == 2)) + "|")
    for k, stage in enumerate(STAGES):
        meds = []
        cells = []
        for n in names:
            v = sorted(row[k] for row in rows[n])
            med = statistics.median(v)
            meds.append(med)
            cells.append("%.3f (%.3f)" % (med, v[int(len(v) * 0.9)]))
        ratio = " | %.2f" % (meds[0] / meds[1]) if len(meds) == 2 and meds[1] else ""
        print("| %s | %s%s |" % (stage, " | ".join(cells), ratio))
    meds = [statistics.median(src[n]) for n in names]
    ratio = " | %.2f" % (meds[0] / meds[1]) if len(meds) == 2 else ""
    print("| smtp-source -s 1, ms a message (median of rounds) | %s%s |"
          % (" | ".join("%.3f" % m for m in meds), ratio))
    for k, label in ((0, "user"), (1, "system")):
        meds = [statistics.median(c[k] for c in cpu[n]) for n in names]
        ratio = " | %.2f" % (meds[0] / meds[1]) if len(meds) == 2 and meds[1] else ""
        print("| machine CPU ms a message, %s (median of rounds) | %s%s |"
              % (label, " | ".join("%.3f" % m for m in meds), ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
