"""realfilters — Debian's filters started by the tests, each with its own config dir:
OpenDKIM, OpenDMARC, rspamd (its proxy worker in milter mode, scanning itself, no
redis) and clamav-milter with clamd on a signature file written here; DNS for them
from a loopback server on port 53 (OpenDKIM's and OpenDMARC's `Nameservers` take
addresses only)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading

import qpytest
from remote_peers import DNSServer

BASE = "/var/lib/qpy-milter-test"   # OpenDKIM refuses files below a world-writable dir
EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def workdir(prefix: str) -> str:
    os.makedirs(BASE, mode=0o755, exist_ok=True)
    d = tempfile.mkdtemp(prefix=prefix + "-", dir=BASE)
    os.chmod(d, 0o755)
    return d


class Dns53(DNSServer):
    """DNSServer on port 53 of an address of its own in 127.0.0.0/8."""

    def __init__(self):
        self.zone, self.servfail, self.stopped, self.ad = {}, set(), False, False
        for n in range(2, 250):
            host = "127.53.%d.%d" % (os.getpid() % 250, n)
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.udp.bind((host, 53))
                self.tcp.bind((host, 53))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.host, self.port = host, 53
        self.tcp.listen(16)
        self.threads = [threading.Thread(target=self._serve_udp, daemon=True),
                        threading.Thread(target=self._serve_tcp, daemon=True)]
        for t in self.threads:
            t.start()


def wait_listening(port: int, proc: subprocess.Popen, timeout: float, log: str) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError("filter exited %s: %s" % (proc.returncode, _tail(log)))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    assert qpytest.wait_for(up, timeout, 0.2), "filter not listening: %s" % _tail(log)


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-2000:].decode("utf-8", "replace")
    except OSError:
        return ""


class Daemon:
    proc: subprocess.Popen
    dir: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, argv: list[str], port: int, timeout: float = 30) -> None:
        self.log = os.path.join(self.dir, "out.log")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.port = port
        self.endpoint = "inet:127.0.0.1:%d" % port
        wait_listening(port, self.proc, timeout, self.log)


class OpenDKIM(Daemon):
    """Signs for `domain` (selector sel) mail from 127.0.0.1; verifies the rest."""

    def __init__(self, dns: Dns53, domain: str = "test.example", authserv: str = "test.example"):
        self.dir = workdir("opendkim")
        subprocess.run(["opendkim-genkey", "-b", "1024", "-D", self.dir, "-d", domain,
                        "-s", "sel"], check=True, capture_output=True)
        key = os.path.join(self.dir, "sel.private")
        pw = pwd.getpwnam("opendkim")
        os.chown(key, pw.pw_uid, pw.pw_gid)
        os.chmod(key, 0o600)
        with open(os.path.join(self.dir, "sel.txt")) as f:
            txt = f.read()
        self.public = "".join(part for part in txt.split('"')[1::2])
        dns.add("sel._domainkey." + domain, "TXT",
                " ".join('"%s"' % self.public[i:i + 200] for i in range(0, len(self.public), 200)))
        port = qpytest.free_port()
        conf = os.path.join(self.dir, "opendkim.conf")
        with open(conf, "w") as f:
            f.write("Mode sv\nDomain %s\nSelector sel\nKeyFile %s\n"
                    "Socket inet:%d@127.0.0.1\nUserID opendkim\nSyslog no\n"
                    "Nameservers %s\nAuthservID %s\nAlwaysAddARHeader yes\n"
                    "Canonicalization relaxed/simple\nBackground no\n"
                    % (domain, key, port, dns.host, authserv))
        self.start(["opendkim", "-f", "-x", conf], port)


class OpenDMARC(Daemon):
    def __init__(self, dns: Dns53, authserv: str = "test.example"):
        self.dir = workdir("opendmarc")
        port = qpytest.free_port()
        conf = os.path.join(self.dir, "opendmarc.conf")
        with open(conf, "w") as f:
            f.write("Socket inet:%d@127.0.0.1\nUserID opendmarc\nSyslog false\n"
                    "AuthservID %s\nTrustedAuthservIDs %s\nSPFSelfValidate false\n"
                    "SPFIgnoreResults true\nIgnoreHosts %s/ignore\nRejectFailures true\n"
                    "Background false\nPidFile %s/pid\n"
                    % (port, authserv, authserv, self.dir, self.dir))
        with open(os.path.join(self.dir, "ignore"), "w") as f:
            f.write("192.0.2.1\n")      # not the test clients: their mail is checked
        os.chown(self.dir, pwd.getpwnam("opendmarc").pw_uid, -1)
        # OpenDMARC has no Nameservers setting: its resolver is pointed at the test
        # DNS server by a resolv.conf of its own, in a mount namespace of its own
        resolv = os.path.join(self.dir, "resolv.conf")
        with open(resolv, "w") as f:
            f.write("nameserver %s\n" % dns.host)
        self.start(["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && '
                    'exec opendmarc -f -c "$1"', resolv, conf], port)


class Rspamd(Daemon):
    """rspamd's proxy worker in milter mode, scanning by itself; no redis."""

    def __init__(self, dns: Dns53):
        self.dir = workdir("rspamd")
        local = os.path.join(self.dir, "local")
        port, normal, ctl = (qpytest.free_port() for _ in range(3))
        for sub in ("override.d", "local.d", "db", "run", "log"):
            os.makedirs(os.path.join(self.dir if sub in ("db", "run", "log") else local, sub))
        files = {
            "override.d/worker-proxy.inc":
                'bind_socket = "127.0.0.1:%d";\nmilter = yes;\ntimeout = 60s;\ncount = 1;\n'
                'upstream "local" { default = yes; self_scan = yes; }\n' % port,
            "override.d/worker-normal.inc": 'bind_socket = "127.0.0.1:%d";\ncount = 1;\n' % normal,
            "override.d/worker-controller.inc":
                'bind_socket = "127.0.0.1:%d";\ncount = 1;\n' % ctl,
            "override.d/logging.inc": 'type = "console";\nlevel = "notice";\n',
            "local.d/milter_headers.conf":
                'use = ["x-spamd-result", "x-rspamd-server"];\n'
                'skip_local = false;\nskip_authenticated = false;\n',
            "local.d/options.inc":
                'dns { nameserver = ["%s:53"]; timeout = 1s; }\n' % dns.host,
        }
        for name, text in files.items():
            with open(os.path.join(local, name), "w") as f:
                f.write(text)
        subprocess.run(["chown", "-R", "_rspamd:_rspamd", self.dir], check=True)
        var = ["--var", "LOCAL_CONFDIR=" + local]
        for v, sub in (("DBDIR", "db"), ("RUNDIR", "run"), ("LOGDIR", "log")):
            var += ["--var", "%s=%s" % (v, os.path.join(self.dir, sub))]
        self.start(["rspamd", "-f", "-u", "_rspamd", "-g", "_rspamd", "-c",
                    "/etc/rspamd/rspamd.conf", *var], port, timeout=120)


class ClamavMilter(Daemon):
    """clamd with one signature written here (EICAR by its body pattern, no download),
    and clamav-milter in front of it; raises RuntimeError when either will not start."""

    def __init__(self):
        self.dir = workdir("clamav")
        db = os.path.join(self.dir, "db")
        os.makedirs(db)
        with open(os.path.join(db, "qpytest.ndb"), "w") as f:
            f.write("Qpy-Test-EICAR:0:*:%s\n" % EICAR.hex())
        clamd_sock = os.path.join(self.dir, "clamd.sock")
        with open(os.path.join(self.dir, "clamd.conf"), "w") as f:
            f.write("LocalSocket %s\nDatabaseDirectory %s\nForeground yes\nUser clamav\n"
                    "LogFile %s/clamd.log\n" % (clamd_sock, db, self.dir))
        subprocess.run(["chown", "-R", "clamav:clamav", self.dir], check=True)
        self.clamd = subprocess.Popen(["clamd", "-c", os.path.join(self.dir, "clamd.conf")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not qpytest.wait_for(lambda: os.path.exists(clamd_sock)
                                or self.clamd.poll() is not None, 60) \
                or self.clamd.poll() is not None:
            raise RuntimeError("clamd did not start: %s" % _tail(self.dir + "/clamd.log"))
        port = qpytest.free_port()
        conf = os.path.join(self.dir, "clamav-milter.conf")
        with open(conf, "w") as f:
            f.write("MilterSocket inet:%d@127.0.0.1\nClamdSocket unix:%s\nForeground yes\n"
                    "User clamav\nOnInfected Reject\nAddHeader Replace\n"
                    "LogFile %s/milter.log\n" % (port, clamd_sock, self.dir))
        self.start(["clamav-milter", "-c", conf], port)

    def stop(self) -> None:
        if self.clamd.poll() is None:
            self.clamd.terminate()
            self.clamd.wait(20)
        super().stop()
