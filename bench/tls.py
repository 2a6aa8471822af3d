"""tls — the cost of TLS: SMTP accept rate plain, with STARTTLS, and on port 465.

SYNOPSIS
    bench/tls.py [--sessions N] [--seconds S] [--rounds R] [--keep]

Runs as root after ./setup.sh install. Lays out a fresh root under /var/tmp/qpy-bench-tls
(qpy-install --me bench.example) with a self-signed RSA-2048 certificate made by openssl,
starts qpy-tcpserver on three loopback ports (smtp, submission, smtps; maxsmtpd raised
above N) and, for each mode, runs N client processes for S seconds. Each client loops over
whole sessions: connect, EHLO, [STARTTLS, EHLO | TLS from the first byte], MAIL, RCPT,
DATA (one 1 KB message), QUIT, and counts the messages answered 250. smtp-source cannot
speak TLS, so the clients are Python (ssl + sockets) processes; they share the two CPUs
with the server, so the figures are a lower bound for the server alone.

Prints messages/s per mode (median over R rounds) and the ratio to plaintext; exit 0 when
every mode accepted mail, 1 otherwise. pickup is not running: messages stay in queue/drop/.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time

BIN = "/opt/qpy/bin"
BASE = "/var/tmp/qpy-bench-tls"
MESSAGE = (b"From: bench@bench.example\r\nTo: postmaster@bench.example\r\n"
           b"Subject: tls bench\r\n\r\n" + b"x" * 72 + b"\r\n") * 12 + b".\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Conn:
    def __init__(self, port: int, implicit: bool, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        if implicit:
            self.sock = ctx.wrap_socket(self.sock)
        self.buf = b""

    def starttls(self) -> None:
        self.sock = self.ctx.wrap_socket(self.sock)
        self.buf = b""

    def reply(self) -> int:
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(4096)
                if not data:
                    raise EOFError()
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return int(line[:3])

    def cmd(self, data: bytes) -> int:
        self.sock.sendall(data)
        return self.reply()


def one_session(port: int, mode: str, ctx: ssl.SSLContext) -> bool:
    c = Conn(port, mode == "smtps", ctx)
    try:
        c.reply()
        c.cmd(b"EHLO bench.example\r\n")
        if mode == "starttls":
            if c.cmd(b"STARTTLS\r\n") != 220:
                return False
            c.starttls()
            c.cmd(b"EHLO bench.example\r\n")
        if c.cmd(b"MAIL FROM:<bench@bench.example>\r\n") != 250:
            return False
        if c.cmd(b"RCPT TO:<postmaster@bench.example>\r\n") != 250:
            return False
        if c.cmd(b"DATA\r\n") != 354:
            return False
        ok = c.cmd(MESSAGE) == 250
        c.sock.sendall(b"QUIT\r\n")
        return ok
    finally:
        c.sock.close()


def client(args: tuple[int, str, float, float]) -> tuple[int, int]:
    port, mode, start, seconds = args
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    while time.time() < start:
        time.sleep(0.001)
    ok = failed = 0
    while time.time() < start + seconds:
        try:
            if one_session(port, mode, ctx):
                ok += 1
            else:
                failed += 1
        except (OSError, EOFError, ValueError):
            failed += 1
    return ok, failed


def setup(sessions: int) -> tuple[str, dict[str, int], subprocess.Popen]:
    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(BASE, mode=0o755)
    root = os.path.join(BASE, "root")
    subprocess.run([BIN + "/qpy-install", root, "--me", "bench.example"], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=bench.example", "-keyout", "key.pem", "-out", "cert.pem"],
                   cwd=BASE, check=True, capture_output=True)
    pem = os.path.join(root, "control", "servercert.pem")
    with open(pem, "wb") as out:
        for name in ("cert.pem", "key.pem"):
            with open(os.path.join(BASE, name), "rb") as f:
                out.write(f.read())
    shutil.chown(pem, "qpyd", "qpyd")
    os.chmod(pem, 0o400)
    ports = {"plain": free_port(), "starttls": free_port(), "smtps": free_port()}
    ctl = os.path.join(root, "control")
    for name, text in (("smtplisten", "127.0.0.1:%d\n" % ports["plain"]),
                       ("submissionlisten", "127.0.0.1:%d\n" % ports["starttls"]),
                       ("smtpslisten", "127.0.0.1:%d\n" % ports["smtps"]),
                       ("maxsmtpd", "%d\n" % (sessions * 4)),
                       ("acceptunknown", "")):
        with open(os.path.join(ctl, name), "w") as f:
            f.write(text)
    log = open(os.path.join(BASE, "tcpserver.log"), "wb")
    proc = subprocess.Popen([BIN + "/qpy-tcpserver", root], stdout=log, stderr=log,
                            env={"PATH": "/usr/bin:/bin", "QPY_ROOT": root})
    deadline = time.time() + 20
    for port in ports.values():
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit("bench: qpy-tcpserver did not start (see %s)" % log.name)
                time.sleep(0.05)
    return root, ports, proc


def measure(port: int, mode: str, sessions: int, seconds: float) -> tuple[float, int]:
    start = time.time() + 0.5
    with multiprocessing.Pool(sessions) as pool:
        results = pool.map(client, [(port, mode, start, seconds)] * sessions)
    ok = sum(r[0] for r in results)
    return ok / seconds, sum(r[1] for r in results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    if os.getuid() != 0:
        print("bench/tls.py: run as root", file=sys.stderr)
        return 2
    root, ports, proc = setup(a.sessions)
    rates: dict[str, list[float]] = {m: [] for m in ports}
    failures = 0
    try:
        for _ in range(a.rounds):
            for mode, port in ports.items():
                rate, failed = measure(port, mode, a.sessions, a.seconds)
                rates[mode].append(rate)
                failures += failed
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print("SMTP accept rate, %d sessions, %.0f s x %d rounds, 1 KB messages (%d CPUs)"
          % (a.sessions, a.seconds, a.rounds, os.cpu_count() or 0))
    base = statistics.median(rates["plain"]) or 1.0
    labels = {"plain": "plaintext (port 25 profile)", "starttls": "STARTTLS (submission)",
              "smtps": "implicit TLS (smtps)"}
    for mode, values in rates.items():
        med = statistics.median(values)
        print("  %-28s %8.1f msg/s  (min %.1f, max %.1f)  %.2fx plaintext"
              % (labels[mode], med, min(values), max(values), med / base))
    print("  failed sessions: %d" % failures)
    if not a.keep:
        shutil.rmtree(BASE, ignore_errors=True)
    return 0 if all(min(v) > 0 for v in rates.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
