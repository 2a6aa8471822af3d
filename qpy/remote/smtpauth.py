"""smtpauth — SMTP AUTH as a client (RFC 4954): the credentials for a next hop from
control/smtpauth, and the AUTH PLAIN (RFC 4616) or LOGIN exchange.

Used by qpy.remote.session (as `qpyr`); no program of its own.

CONTROL FILE
    control/smtpauth, one entry a line (`#` starts a comment line):

        HOST[:PORT] USER PASSWORD [cleartext-ok]

    HOST is the next hop as control/smtproutes names it (`smtp.example.net`,
    `[192.0.2.7]`) or, for mail routed by MX, the MX host's name; `HOST:PORT`
    is preferred to `HOST` for a connection to that port. USER and PASSWORD
    are UTF-8 without white space. The credentials are sent only inside TLS
    (the delivery needs TLS; no TLS, no delivery: it is deferred) unless the
    line ends with `cleartext-ok`, meant for a relay on loopback. No file: no
    AUTH.

    The file must belong to the user qpy-remote runs as (qpyr) and be readable
    by nobody else (mode 0400; `qpy-install --check` reports any other). A
    file that others may read is not used: each delivery through one of its
    hosts is deferred (#4.7.0) with a log line saying why, so that a leaked
    password is noticed rather than used. qpy-showctl never prints it.

AUTH
    PLAIN when the server offers it (one command, the initial response), else
    LOGIN; a server offering neither defers the delivery. Any answer but 235
    defers it (a temporary failure, also for 535: a password fixed in
    control/smtpauth must not have bounced the mail meanwhile) with the
    server's reply, which qpy-queue-send logs and qpy-qread shows. Neither the
    password nor its encoding is ever in a log line or a result.
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass

from qpy.common.log import clean, log
from qpy.remote.wire import Conn

MAX_FILE = 64 * 1024
CLEARTEXT_OK = "cleartext-ok"
NAME = "smtpauth"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str
    cleartext_ok: bool


class AuthFailed(Exception):
    """No AUTH on this connection: the reason (always a temporary failure)."""


def hop_keys(hop: str, port: int) -> list[str]:
    """The keys a next hop is looked up by, best first: HOST:PORT, then HOST."""
    hop = hop.lower()
    return ["%s:%d" % (hop, port), hop]


def parse(data: bytes) -> tuple[dict[str, Credentials], list[int]]:
    """The entries by key, and the numbers of the lines that do not parse."""
    table: dict[str, Credentials] = {}
    bad = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        line = raw.decode("utf-8", "replace").strip()
        if not line or line.startswith("#"):
            continue
        f = line.split()
        if len(f) not in (3, 4) or (len(f) == 4 and f[3] != CLEARTEXT_OK):
            bad.append(n)
            continue
        table.setdefault(f[0].lower(), Credentials(f[1], f[2], len(f) == 4))
    return table, bad


class Table:
    """control/smtpauth as read once for a delivery."""

    def __init__(self, control_dir: str):
        self.path = os.path.join(control_dir, NAME)
        self.table: dict[str, Credentials] = {}
        self.loose = ""         # why the file may not be used ("" when it may)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return
        except OSError as e:    # a link, or unreadable: nothing can be used
            self.loose = "cannot open it: %s" % (e.strerror or type(e).__name__)
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.loose = "not a plain file"
                return
            data = f.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            self.loose = "larger than %d bytes" % MAX_FILE
            return
        self.table, bad = parse(data)
        if bad:
            log("warning: control/%s: lines %s do not parse (HOST[:PORT] USER PASSWORD"
                " [cleartext-ok]); ignored" % (NAME, ",".join(map(str, bad[:10]))))
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            self.loose = "mode %04o owner uid %d; it must be mode 0400 and belong to uid %d" \
                % (stat.S_IMODE(st.st_mode), st.st_uid, os.geteuid())

    def lookup(self, hop: str, port: int) -> Credentials | None:
        """The credentials for the next hop, None when it has none; AuthFailed when
        it has some in a file that may not be used."""
        for key in hop_keys(hop, port):
            creds = self.table.get(key)
            if creds is None:
                continue
            if self.loose:
                log("alert: control/%s not used: %s" % (NAME, self.loose))
                raise AuthFailed("control/%s is not used: %s. (#4.7.0)" % (NAME, self.loose))
            return creds
        if self.loose and not self.table:
            log("alert: control/%s not used: %s" % (NAME, self.loose))
        return None


def mechanisms(ext: dict[str, str]) -> list[str]:
    """The SASL mechanisms in EHLO's AUTH keyword (or the old `AUTH=` form)."""
    out = []
    for kw, param in ext.items():
        if kw == "AUTH":
            out += param.upper().split()
        elif kw.startswith("AUTH="):
            out += [kw[5:]] + param.upper().split()
    return out


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode("utf-8"))


def authenticate(conn: Conn, ext: dict[str, str], creds: Credentials, ip: str) -> None:
    """AUTH PLAIN or LOGIN with `creds`; AuthFailed with the reason when it fails."""
    mechs = mechanisms(ext)
    if "PLAIN" in mechs:
        mech = "PLAIN"
        token = base64.b64encode(b"\0" + creds.user.encode() + b"\0" + creds.password.encode())
        r = conn.command(b"AUTH PLAIN " + token)
    elif "LOGIN" in mechs:
        mech = "LOGIN"
        r = conn.command(b"AUTH LOGIN")
        if r.code == 334:
            r = conn.command(_b64(creds.user))
        if r.code == 334:
            r = conn.command(_b64(creds.password))
    else:
        raise AuthFailed("%s offers no AUTH PLAIN or LOGIN (it offers %r); control/smtpauth"
                         " has credentials for it. (#4.7.0)" % (ip, clean(" ".join(mechs), 80)))
    if r.code == 334:           # it wants more than the mechanism has: cancel (RFC 4954)
        conn.command(b"*")
        raise AuthFailed("%s asked for more in AUTH %s; cancelled. (#4.7.0)" % (ip, mech))
    if r.code != 235:
        raise AuthFailed("%s rejected AUTH %s as %s (#4.7.0). %s"
                         % (ip, mech, clean(creds.user, 100), conn.said(r)))
