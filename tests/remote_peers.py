"""Real peers for the remote-delivery tests: a DNS server, scripted SMTP servers,
aiosmtpd, smtp-sink and a private Postfix, all on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import psutil
import qpytest


class DNSServer:
    """A tiny authoritative server (UDP and TCP) answering from a dict that tests change.

    zone: name -> {rdtype: [rdata text]}; a CNAME is followed inside the answer;
    names in `servfail` answer SERVFAIL; unknown names NXDOMAIN. With `ad` set, every
    answer carries the AD bit, as a validating resolver's do for signed zones.
    """

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.zone: dict[str, dict[str, list[str]]] = {}
        self.servfail: set[str] = set()
        self.ad = False
        for _ in range(50):         # the UDP port's TCP twin may be taken: try another
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind((host, 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind((host, self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen(16)
        self.stopped = False
        self.threads = [threading.Thread(target=self._serve_udp, daemon=True),
                        threading.Thread(target=self._serve_tcp, daemon=True)]
        for t in self.threads:
            t.start()

    def add(self, name: str, rdtype: str, *values: str) -> None:
        self.zone.setdefault(name.lower().rstrip(".") + ".", {}).setdefault(rdtype, []) \
            .extend(values)

    def answer(self, wire: bytes) -> bytes:
        q = dns.message.from_wire(wire)
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        if self.ad:
            r.flags |= dns.flags.AD
        question = q.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        if name.rstrip(".") in self.servfail:
            r.set_rcode(dns.rcode.SERVFAIL)
            return r.to_wire()
        for hop in range(8):
            recs = self.zone.get(name)
            if recs is None:
                if hop == 0:
                    r.set_rcode(dns.rcode.NXDOMAIN)
                break
            if "CNAME" in recs and rdtype != "CNAME":
                r.answer.append(dns.rrset.from_text(name, 60, "IN", "CNAME", recs["CNAME"][0]))
                name = recs["CNAME"][0].lower()
                continue
            if rdtype in recs:
                r.answer.append(dns.rrset.from_text_list(name, 60, "IN", rdtype, recs[rdtype]))
            break
        return r.to_wire()

    def _serve_udp(self) -> None:
        while not self.stopped:
            try:
                data, peer = self.udp.recvfrom(4096)
                self.udp.sendto(self.answer(data), peer)
            except Exception:
                if self.stopped:
                    return

    def _serve_tcp(self) -> None:
        while not self.stopped:
            try:
                c, _ = self.tcp.accept()
            except OSError:
                return
            with c:
                try:
                    c.settimeout(5)
                    n = struct.unpack("!H", _recv_exact(c, 2))[0]
                    out = self.answer(_recv_exact(c, n))
                    c.sendall(struct.pack("!H", len(out)) + out)
                except Exception:
                    pass

    def stop(self) -> None:
        self.stopped = True
        self.udp.close()
        self.tcp.close()


def _recv_exact(c: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = c.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data


class RawPeer:
    """A scripted SMTP server: script(conn) runs for each connection in a thread."""

    def __init__(self, host: str, port: int, script):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.script = script
        self.release = threading.Event()
        self.connections = 0
        self.conns: list[PeerConn] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    @property
    def transcripts(self) -> list[bytes]:
        """What each connection sent so far (a QUIT is in it before its reply goes out)."""
        return [c.got for c in self.conns]

    def _one(self, c: socket.socket) -> None:
        conn = PeerConn(c, self)
        self.conns.append(conn)
        try:
            self.script(conn)
        except (OSError, EOFError):
            pass
        finally:
            conn.f.close()      # the makefile holds the socket open otherwise
            c.close()

    def stop(self) -> None:
        self.release.set()
        self.sock.close()


class PeerConn:
    def __init__(self, c: socket.socket, peer: RawPeer):
        self.c = c
        self.peer = peer
        self.f = c.makefile("rb")
        self.got = b""
        c.settimeout(30)

    def send(self, data: bytes) -> None:
        self.c.sendall(data)

    def line(self) -> bytes:
        ln = self.f.readline(100000)
        if not ln:
            raise EOFError
        self.got += ln
        return ln

    def expect(self, verb: bytes, reply: bytes) -> bytes:
        ln = self.line()
        assert ln.upper().startswith(verb.upper()), ln
        self.send(reply)
        return ln

    def data(self) -> bytes:
        body = b""
        while True:
            ln = self.line()
            if ln == b".\r\n":
                return body
            body += ln


def basic_session(conn: PeerConn, ehlo: bytes = b"250-peer\r\n250 PIPELINING\r\n",
                  rcpt: bytes = b"250 ok\r\n", final: bytes = b"250 queued\r\n",
                  greet: bytes = b"220 peer ESMTP\r\n") -> None:
    """Greeting, EHLO, then commands one by one until QUIT."""
    conn.send(greet)
    commands(conn, ehlo, rcpt, final)


def commands(conn: PeerConn, ehlo: bytes = b"250-peer\r\n250 PIPELINING\r\n",
             rcpt: bytes = b"250 ok\r\n", final: bytes = b"250 queued\r\n") -> None:
    """basic_session without its greeting: commands one by one until QUIT (also the
    rest of a connection a script has begun)."""
    while True:
        ln = conn.line().upper()
        if ln.startswith(b"EHLO"):
            conn.send(ehlo)
        elif ln.startswith(b"MAIL"):
            conn.send(b"250 ok\r\n")
        elif ln.startswith(b"RCPT"):
            conn.send(rcpt)
        elif ln.startswith(b"DATA"):
            conn.send(b"354 go\r\n")
            conn.data()
            conn.send(final)
        elif ln.startswith(b"QUIT"):
            conn.send(b"221 bye\r\n")
            return
        else:
            conn.send(b"250 ok\r\n")


class SmtpSink:
    """Postfix's smtp-sink, dumping each message into a directory."""

    def __init__(self, host: str, port: int, *opts: str):
        self.dir = qpytest.scratch_dir("sink")
        shutil.chown(self.dir, "nobody")
        cmd = ["smtp-sink", "-u", "nobody", "-d", os.path.join(self.dir, "%H%M%S."),
               *opts, "%s:%d" % (host, port), "64"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_port(host, port, self.proc)

    def messages(self) -> list[bytes]:
        out = []
        for name in sorted(os.listdir(self.dir)):
            with open(os.path.join(self.dir, name), "rb") as f:
                out.append(f.read())
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        qpytest.remove_tree(self.dir)


def _wait_port(host: str, port: int, proc: subprocess.Popen | None = None) -> None:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("peer exited: %r" % (proc.stderr.read() if proc.stderr else ""))
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            try:
                s.connect((host, port))
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError("nothing listens on %s:%d" % (host, port))


class PrivatePostfix:
    """A Postfix instance of its own (config, queue, mailboxes) on host:port.

    Mail for `domain` goes to one Maildir (virtual delivery, static maps) owned by
    `nobody`; `postfix -c DIR stop` in stop().
    """

    def __init__(self, host: str, port: int, domain: str, chain: str | None = None,
                 submission: int | None = None, smtps: int | None = None,
                 plainauth: int | None = None, users: dict[str, str] | None = None,
                 ccert_ca: str | None = None, login_only: tuple[int, ...] = ()):
        """chain: key and certificate (one PEM) for TLS on every port. submission
        (STARTTLS required), smtps (TLS from the start) and plainauth (AUTH without
        TLS): ports where only clients that AUTH as one of `users` (Dovecot as the
        SASL server) may send. ccert_ca: ask clients for a certificate, trusted
        when from this CA (Postfix then names it in its Received line). login_only:
        ports that offer AUTH LOGIN and no other mechanism."""
        self.top = qpytest.scratch_dir("postfix")
        self.conf = os.path.join(self.top, "etc")
        self.queue = os.path.join(self.top, "spool")
        self.data = os.path.join(self.top, "data")
        self.mail = os.path.join(self.top, "mail")
        for d in (self.conf, self.queue, self.data, self.mail):
            os.makedirs(d, exist_ok=True)
        shutil.chown(self.data, "postfix")
        shutil.chown(self.mail, "nobody", "nogroup")
        import pwd
        nobody = pwd.getpwnam("nobody")
        name = "qpytest" + os.path.basename(self.top).replace("-", "").replace("_", "")[-10:]
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": self.data,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix." + domain,
            "mydestination": "",
            "inet_interfaces": "loopback-only",   # 127.0.0.2 is not an interface address
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "virtual_mailbox_domains": domain,
            "virtual_mailbox_base": self.mail,
            "virtual_mailbox_maps": "static:inbox/",
            "virtual_uid_maps": "static:%d" % nobody.pw_uid,
            "virtual_gid_maps": "static:%d" % nobody.pw_gid,
            "virtual_minimum_uid": "1",
            "smtpd_relay_restrictions": "permit_mynetworks,reject",
            "maillog_file": os.path.join(self.top, "maillog"),
            "syslog_name": name,
            "multi_instance_name": name,
            "smtputf8_enable": "yes",
            "alias_maps": "",
            "alias_database": "",
            "local_header_rewrite_clients": "",     # no header changes: byte-exact check
        }
        if chain:
            main.update({"smtpd_tls_chain_files": chain, "smtpd_tls_security_level": "may",
                         "smtpd_tls_received_header": "yes", "smtpd_tls_loglevel": "1"})
        if ccert_ca:
            main.update({"smtpd_tls_CAfile": ccert_ca, "smtpd_tls_ask_ccert": "yes"})
        if users is not None:
            main.update({"smtpd_sasl_type": "dovecot", "smtpd_sasl_path": "private/auth",
                         "smtpd_sasl_authenticated_header": "yes", "smtpd_tls_auth_only": "yes"})
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.writelines("%s = %s\n" % kv for kv in main.items())
        master = open("/usr/share/postfix/master.cf.dist").read() \
            if os.path.exists("/usr/share/postfix/master.cf.dist") \
            else open("/etc/postfix/master.cf").read()
        lines = [ln for ln in master.splitlines() if not ln.startswith("smtp      inet")]
        lines.insert(0, "%s:%d inet n - n - - smtpd" % (host, port))
        sasl = " -o smtpd_sasl_auth_enable=yes -o smtpd_relay_restrictions=" \
               "permit_sasl_authenticated,reject"
        for p, opts in ((submission, " -o smtpd_tls_security_level=encrypt"),
                        (smtps, " -o smtpd_tls_wrappermode=yes"),
                        (plainauth, " -o smtpd_tls_security_level=none"
                                    " -o smtpd_tls_auth_only=no")):
            if p:
                if p in login_only:
                    opts += " -o smtpd_sasl_mechanism_filter=login"
                lines.insert(0, "%s:%d inet n - n - - smtpd%s%s" % (host, p, sasl, opts))
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write("\n".join(lines) + "\n")
        self.host, self.port = host, port
        # postfix writes its errors to stderr only when that is a terminal: give it one
        r = subprocess.run(["script", "-qec", "postfix -c %s start" % self.conf, "/dev/null"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError("postfix start: %s %s" % (r.stdout, r.stderr))
        self.dovecot = None
        if users is not None:
            self.dovecot = Dovecot(self.top, os.path.join(self.queue, "private", "auth"), users)
        for p in (port, submission, smtps, plainauth):
            if p:
                _wait_port(host, p)

    def log(self) -> str:
        try:
            with open(os.path.join(self.top, "maillog"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def messages(self) -> list[bytes]:
        new = os.path.join(self.mail, "inbox", "new")
        if not os.path.isdir(new):
            return []
        out = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def stop(self) -> None:
        if self.dovecot is not None:
            self.dovecot.stop()
        subprocess.run(["postfix", "-c", self.conf, "stop"], capture_output=True, timeout=60)
        pidfile = os.path.join(self.queue, "pid", "master.pid")
        try:

            p = psutil.Process(int(open(pidfile).read().strip()))
            if p.name() == "master" and p.is_running():   # stop did not work: it is ours
                p.send_signal(signal.SIGKILL)
        except (OSError, ValueError, psutil.Error):
            pass
        qpytest.remove_tree(self.top)


class Dovecot:
    """Dovecot as a SASL server only (no mail protocols), for a PrivatePostfix: its auth
    socket at `socket_path` (postfix may connect), passwords from a passwd-file. No
    delay after a failed AUTH and no penalty for the address it came from: a test of
    a wrong password must not slow the next test down."""

    def __init__(self, top: str, socket_path: str, users: dict[str, str]):
        self.dir = os.path.join(top, "dovecot")
        for sub in ("run", "state"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        passwd = os.path.join(self.dir, "passwd")
        with open(passwd, "w") as f:
            f.writelines("%s:{PLAIN}%s\n" % kv for kv in users.items())
        self.conf = os.path.join(self.dir, "dovecot.conf")
        name = "qpytest" + os.path.basename(top).replace("-", "").replace("_", "")[-10:]
        with open(self.conf, "w") as f:
            f.write(DOVECOT_CONF.format(dir=self.dir, name=name, passwd=passwd,
                                        socket=socket_path))
        errors = os.path.join(self.dir, "start.err")
        with open(errors, "w") as err:      # its daemon keeps what it was given: no pipe
            r = subprocess.run(["dovecot", "-c", self.conf], stdout=subprocess.DEVNULL,
                               stderr=err, timeout=60)
        if r.returncode != 0:
            with open(errors) as err:
                raise RuntimeError("dovecot: %s" % err.read())
        qpytest.wait_for(lambda: os.path.exists(socket_path), 20)

    def stop(self) -> None:
        try:
            with open(os.path.join(self.dir, "run", "master.pid")) as f:
                pid = int(f.read().strip())

            p = psutil.Process(pid)
            if p.name() == "dovecot":       # ours: started from our own config
                p.terminate()
                p.wait(10)
        except (OSError, ValueError, psutil.Error):
            pass


DOVECOT_CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
instance_name = {name}
protocols = none
listen = 127.0.0.1
log_path = {dir}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {passwd}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener {socket} {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""
