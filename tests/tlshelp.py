"""tlshelp — what the TLS and AUTH tests share: certificates made with openssl, a
running qpy-tcpserver with its three listeners, qpy-authd, and a raw SMTP client."""

from __future__ import annotations

import os
import pwd
import socket
import ssl
import subprocess
import time

import qpytest
import smtphelp
from smtphelp import wait_port

CN = "test.example"


def openssl(*args: str, cwd: str) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr


def make_cert(directory: str, expired: bool = False) -> bytes:
    """A self-signed certificate and its key in one PEM (chain + key, as servercert.pem)."""
    if not expired:
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj",
                "/CN=" + CN, "-keyout", "key.pem", "-out", "cert.pem", cwd=directory)
    else:  # openssl req cannot back-date; a one-entry CA database can
        with open(os.path.join(directory, "index.txt"), "w"):
            pass
        with open(os.path.join(directory, "serial"), "w") as f:
            f.write("01\n")
        with open(os.path.join(directory, "ca.cnf"), "w") as f:
            f.write("[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nserial = serial\n"
                    "new_certs_dir = .\ndefault_md = sha256\npolicy = p\n"
                    "[p]\ncommonName = supplied\n")
        openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=" + CN,
                "-keyout", "key.pem", "-out", "req.csr", cwd=directory)
        openssl("ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", "key.pem",
                "-in", "req.csr", "-out", "cert.pem", "-startdate", "20200101000000Z",
                "-enddate", "20200201000000Z", cwd=directory)
    data = b""
    for name in ("cert.pem", "key.pem"):
        with open(os.path.join(directory, name), "rb") as f:
            data += f.read()
    return data


def install_cert(qroot, data: bytes, owner: str = "qpyd", mode: int = 0o400) -> str:
    path = os.path.join(qroot.paths.control, "servercert.pem")
    with open(path, "wb") as f:
        f.write(data)
    if qpytest.IS_ROOT:
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)
    return path


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE      # self-signed: we test encryption, not the PKI
    return ctx


class Server(smtphelp.Listener):
    """qpy-tcpserver on three fresh loopback ports; its log in a file."""

    def __init__(self, qroot, smtps: bool = True):
        self.qroot = qroot
        self.smtp = qpytest.free_port()
        self.submission = qpytest.free_port()
        self.smtps = qpytest.free_port()
        qroot.control("smtplisten", "127.0.0.1:%d" % self.smtp)
        qroot.control("submissionlisten", "127.0.0.1:%d" % self.submission)
        if smtps:
            qroot.control("smtpslisten", "127.0.0.1:%d" % self.smtps)
        self.logpath = os.path.join(os.path.dirname(qroot.path), "tcpserver.log")
        self.logfile = open(self.logpath, "ab")
        self.proc = qroot.start("qpy-tcpserver", qroot.path, stdout=self.logfile,
                                stderr=subprocess.STDOUT)
        for port in (self.smtp, self.submission) + ((self.smtps,) if smtps else ()):
            wait_port(port, self.proc)


def start_authd(qroot) -> subprocess.Popen:
    p = qroot.start("qpy-authd", qroot.path)
    sock = os.path.join(qroot.paths.run, "auth", "socket")
    assert qpytest.wait_for(lambda: os.path.exists(sock) or p.poll() is not None, 20)
    assert p.poll() is None, p.stdout.read()
    return p


def set_password(qroot, user: str, password: str) -> None:
    r = qroot.run("qpy-passwd", qroot.path, user,
                  input=("%s\n%s\n" % (password, password)).encode())
    assert r.returncode == 0, r.stderr


class Raw:
    """A line-level SMTP client on a real socket, able to switch to TLS mid-stream."""

    def __init__(self, port: int, implicit_tls: bool = False):
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=30)
        if implicit_tls:
            self.tls()
        self.buf = b""

    def tls(self) -> None:
        self.sock = client_context().wrap_socket(self.sock, server_hostname=CN)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """One whole (multi-line) reply: (code, all its text)."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise EOFError("connection closed; got %r" % lines)
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, line: str) -> tuple[int, str]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


def drops(qroot) -> list[bytes]:
    """The messages qpy-smtpd has put into queue/drop/ (pickup is not running)."""
    out = []
    for name in qroot.queue_files("drop"):
        if name.startswith("."):
            continue
        with open(os.path.join(qroot.paths.drop, name), "rb") as f:
            out.append(f.read())
    return out


def wait_drops(qroot, n: int) -> list[bytes]:
    got = qpytest.wait_for(lambda: len(drops(qroot)) >= n and drops(qroot), 10)
    return got or drops(qroot)


def elapsed(fn) -> tuple[object, float]:
    t = time.monotonic()
    v = fn()
    return v, time.monotonic() - t


class TestCA:
    """A certificate authority of the test's own, made with openssl (EC keys: fast).

    issue() gives a certificate for names (subjectAltName DNS entries, or IP ones for
    addresses) signed by this CA; cafile is the CA's certificate, to be trusted.
    """

    __test__ = False        # not a pytest class

    def __init__(self, directory: str, name: str = "qpy test CA"):
        self.dir = directory
        self.n = 0
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-days", "30", "-subj", "/CN=" + name, "-keyout", "ca.key",
                "-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
        self.cafile = os.path.join(directory, "ca.pem")

    def issue(self, *names: str) -> tuple[str, str]:
        """(certfile, keyfile) for `names`; the first is also the CN."""
        self.n += 1
        stem = "leaf%d" % self.n
        sans = ",".join(("IP:" if n.replace(".", "").isdigit() or ":" in n else "DNS:") + n
                        for n in names)
        with open(os.path.join(self.dir, stem + ".ext"), "w") as f:
            f.write("subjectAltName=%s\nbasicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyAgreement\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n"
                    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" % sans)
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-subj", "/CN=" + names[0], "-keyout", stem + ".key",
                "-out", stem + ".csr", cwd=self.dir)
        openssl("x509", "-req", "-in", stem + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-set_serial", str(1000 + self.n), "-days", "30", "-extfile", stem + ".ext",
                "-out", stem + ".pem", cwd=self.dir)
        return os.path.join(self.dir, stem + ".pem"), os.path.join(self.dir, stem + ".key")

    def chain(self, *names: str) -> str:
        """One PEM file with the key then the certificate (Postfix's chain files)."""
        cert, key = self.issue(*names)
        path = cert[:-4] + ".chain.pem"
        with open(path, "wb") as out:
            for p in (key, cert):
                with open(p, "rb") as f:
                    out.write(f.read())
        return path
