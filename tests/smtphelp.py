"""smtphelp — what the SMTP tests share: qpy-tcpserver (or ucspi-tcp's tcpserver)
running on a fresh port with its log in a file, a raw SMTP client on a real
socket, and readers for what landed in queue/drop/."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess

import psutil
import qpytest

from qpy.common import dropfile


class Listener:
    """qpy-tcpserver on 127.0.0.1 and ::1 (same free port); stopped by stop()."""

    def __init__(self, qroot, ipv6: bool = True):
        self.qroot = qroot
        self.port = qpytest.free_port()
        addrs = ["127.0.0.1:%d" % self.port] + (["[::1]:%d" % self.port] if ipv6 else [])
        qroot.control("smtplisten", "\n".join(addrs))
        self.logpath = os.path.join(os.path.dirname(qroot.path), "tcpserver-%d.log" % self.port)
        self.logfile = open(self.logpath, "ab")
        self.proc = qroot.start("qpy-tcpserver", qroot.path, stdout=self.logfile,
                                stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)
        # wait_port's probe was a session: tests count sessions from here on
        assert self.wait_log("status: 0/"), self.log()

    def log(self) -> str:
        with open(self.logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_log(self, text: str, timeout: float = 20) -> bool:
        return bool(qpytest.wait_for(lambda: text in self.log(), timeout))

    def sessions(self) -> list[psutil.Process]:
        """Children serving a session: any child but an idle qpy-tcpserver worker
        (`qpy-smtpd idle`); an exited, unreaped one counts too."""
        return [p for p in psutil.Process(self.proc.pid).children() if not _idle(p)]

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def wait_idle(self, timeout: float = 30) -> bool:
        """True once no session is left (reaped, so no zombie either)."""
        return bool(qpytest.wait_for(lambda: not self.sessions(), timeout))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        self.logfile.close()


def _idle(p: psutil.Process) -> bool:
    try:
        return " ".join(p.cmdline()).split() == ["qpy-smtpd", "idle"]
    except psutil.Error:
        return False


class UcspiListener(Listener):
    """Debian's ucspi-tcp tcpserver running qpy-smtpd, with a tcprules cdb."""

    def __init__(self, qroot, rules: str = "127.:allow,RELAYCLIENT=\"\"\n:allow\n",
                 limit: int = 40):
        self.qroot = qroot
        self.port = qpytest.free_port()
        top = os.path.dirname(qroot.path)
        cdb = os.path.join(top, "rules-%d.cdb" % self.port)
        r = subprocess.run(["tcprules", cdb, cdb + ".tmp"], input=rules.encode(),
                           capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        os.chmod(cdb, 0o644)
        ids = []
        if qpytest.IS_ROOT:
            pw = pwd.getpwnam("qpyd")
            ids = ["-u", str(pw.pw_uid), "-g", str(pw.pw_gid)]
        self.logpath = os.path.join(top, "ucspi-%d.log" % self.port)
        self.logfile = open(self.logpath, "ab")
        self.proc = subprocess.Popen(
            ["tcpserver", "-v", "-H", "-R", "-c", str(limit), "-x", cdb, *ids,
             "127.0.0.1", str(self.port), qroot.bin("qpy-smtpd")],
            env=qroot.env(), stdout=self.logfile, stderr=subprocess.STDOUT)
        qroot.procs.append(self.proc)
        wait_port(self.port, self.proc)


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError("server exited with %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    assert qpytest.wait_for(up, timeout), "port %d not listening" % port


class Client:
    """A raw SMTP client: send exact bytes, read whole replies."""

    def __init__(self, port: int, host: str = "127.0.0.1", source: str | None = None,
                 timeout: float = 30):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed; have %r" % self.buf[:200])
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self) -> bytes:
        """One whole reply (all its lines), as received."""
        out = b""
        while True:
            ln = self.line()
            out += ln
            if ln[3:4] != b"-":
                return out

    def code(self) -> int:
        return int(self.reply()[:3])

    def cmd(self, data: bytes) -> bytes:
        self.send(data if data.endswith(b"\n") else data + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True when the server has closed the connection (after any buffered bytes)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except OSError:
            return True

    def hello(self, name: bytes = b"client.example") -> None:
        assert self.reply().startswith(b"220 ")
        assert self.cmd(b"EHLO " + name).startswith(b"250")

    def close(self) -> None:
        self.sock.close()


def drops(qroot) -> list[tuple[bytes, bytes, list[bytes]]]:
    """(message, sender, recipients) of every final drop file; temp files excluded."""
    out = []
    for name in sorted(os.listdir(qroot.paths.drop)):
        if not dropfile.is_final_name(name):
            continue
        with open(os.path.join(qroot.paths.drop, name), "rb") as f:
            data = f.read()
        out.append(qpytest.split_drop(data))
    return out


def drop_names(qroot) -> list[str]:
    """Every name in queue/drop/, temporary ones included."""
    return sorted(os.listdir(qroot.paths.drop))
