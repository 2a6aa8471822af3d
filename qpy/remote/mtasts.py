"""mtasts — SMTP MTA Strict Transport Security (RFC 8461): a recipient domain's policy,
fetched over HTTPS, cached, and what it asks of a delivery.

Used by qpy.remote.transaction (as `qpyr`, in qpy-rspawn's workers); no program of
its own.

LOOKUP
    For mail routed by MX (not through an smtproutes relay), the TXT record
    `_mta-sts.DOMAIN` (through control/resolvers) is read: exactly one record
    starting `v=STSv1` with an `id=` (1 to 32 letters and digits) announces a
    policy. The cached policy is used while it is within its max_age and the id is
    the one it was fetched under; else the policy is fetched from
    `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`: the address from the same
    resolver, port 443, a certificate valid for `mta-sts.DOMAIN` from the system's
    CAs or control/tlscafile, status 200 (no redirects), Content-Type text/plain,
    at most MAX_POLICY bytes, FETCH_TIMEOUT seconds for each step. A fetch or TXT
    lookup that fails falls back to the cached policy while it is unexpired (RFC
    8461 5.1), else to none: the domain is then treated as having no policy.

CACHE
    ROOT/remote/mta-sts/DOMAIN (qpyr's, mode 0600): a first line `QPYSTS1 FETCHED
    ID`, then the policy as fetched. Written to a temporary name and renamed; not
    fsync'd: a cache lost in a crash is fetched again. No directory: no cache,
    every delivery fetches (and a log line says so once per process).

POLICY (mode, mx, max_age)
    enforce: only MX hosts matching an `mx:` pattern (`mail.example.com`, or
    `*.example.com` for one label more) are used, each with TLS and a
    certificate verified for its MX name (level verify); others are skipped, and
    with none left the delivery is deferred (#4.7.5). testing and none: nothing
    changes. A control/tlspolicy line for the domain or MX host, and DANE (TLSA
    records the resolver vouches for), take precedence (RFC 8461 2).
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass

import dns.exception
import dns.resolver

from qpy.common.log import clean, log

MAX_POLICY = 64 * 1024          # RFC 8461 3.3
MAX_AGE = 31557600              # RFC 8461 3.2: a year at most
FETCH_TIMEOUT = 20.0            # seconds per connect and per read
HTTPS_PORT = 443
CACHE_DIR = os.path.join("remote", "mta-sts")
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class FetchFailed(Exception):
    """No policy came from the HTTPS fetch, for the reason given."""


@dataclass
class Policy:
    id: str
    mode: str
    mx: list[str]
    max_age: int
    fetched: int

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.max_age

    def lists(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pat in self.mx:
            if pat == host:
                return True
            if pat.startswith("*.") and "." in host and host.split(".", 1)[1] == pat[2:]:
                return True
        return False


def parse_policy(body: bytes, policy_id: str, fetched: int) -> Policy:
    """The policy file's fields (RFC 8461 3.2); ValueError when it is not one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8")
    fields: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise ValueError("no version STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise ValueError("bad mode %r" % mode[:20])
    age = (fields.get("max_age") or [""])[0]
    if not age.isdigit() or len(age) > 10:
        raise ValueError("bad max_age")
    mx = [m.lower().rstrip(".") for m in fields.get("mx", []) if m]
    if mode != "none" and not mx:
        raise ValueError("no mx")
    return Policy(policy_id, mode, mx, min(int(age), MAX_AGE), fetched)


def txt_id(res: dns.resolver.Resolver, domain: str) -> str | None:
    """The id of the one `v=STSv1` TXT record of _mta-sts.DOMAIN; None when there is
    none (or more than one); DNSException when the lookup fails."""
    try:
        ans = res.resolve("_mta-sts." + domain, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    found = []
    for r in ans:
        txt = b"".join(r.strings).decode("ascii", "replace")
        if txt.startswith("v=STSv1"):
            found.append(txt)
    if len(found) != 1:
        return None
    for part in found[0].split(";"):
        key, _, value = part.strip().partition("=")
        if key == "id" and _ID.match(value):
            return value
    return None


class _Connection(http.client.HTTPSConnection):
    """HTTPS to a given address, the certificate checked for the policy host's name."""

    def __init__(self, host: str, address: str, ctx: ssl.SSLContext):
        super().__init__(host, HTTPS_PORT, timeout=FETCH_TIMEOUT, context=ctx)
        self.address = address
        self.ctx = ctx

    def connect(self) -> None:
        sock = socket.create_connection((self.address, HTTPS_PORT), FETCH_TIMEOUT)
        self.sock = self.ctx.wrap_socket(sock, server_hostname=self.host)


def fetch(addresses: list[str], domain: str, cafile: str) -> bytes:
    """The policy file of `domain` from the first address that serves it."""
    host = "mta-sts." + domain
    ctx = ssl.create_default_context()
    if cafile:
        ctx.load_verify_locations(cafile=cafile)
    why = "no address for %s" % host
    for address in addresses:
        conn = _Connection(host, address, ctx)
        try:
            conn.request("GET", "/.well-known/mta-sts.txt", headers={"Connection": "close"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise FetchFailed("%s answered %d" % (host, resp.status))
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "text/plain":
                raise FetchFailed("%s sent %r, not text/plain" % (host, clean(ctype, 40)))
            body = resp.read(MAX_POLICY + 1)
            if len(body) > MAX_POLICY:
                raise FetchFailed("%s sent more than %d bytes" % (host, MAX_POLICY))
            return body
        except (OSError, ssl.SSLError, http.client.HTTPException) as e:
            why = "%s (%s): %s" % (host, address, clean(str(e) or type(e).__name__, 200))
        finally:
            conn.close()
    raise FetchFailed(why)


class Cache:
    """The policies under ROOT/remote/mta-sts, one file per domain."""

    warned = False

    def __init__(self, root: str):
        self.dir = os.path.join(root, CACHE_DIR)

    def _path(self, domain: str) -> str | None:
        return os.path.join(self.dir, domain) if _DOMAIN.match(domain) else None

    def get(self, domain: str) -> Policy | None:
        path = self._path(domain)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                data = f.read(MAX_POLICY + 200)
            head, _, body = data.partition(b"\n")
            magic, fetched, policy_id = head.decode("ascii").split(" ")
            if magic != "QPYSTS1" or not fetched.isdigit():
                return None
            return parse_policy(body, policy_id, int(fetched))
        except (OSError, ValueError):
            return None

    def put(self, domain: str, p: Policy, body: bytes) -> None:
        path = self._path(domain)
        if path is None:
            return
        tmp = "%s.tmp%d" % (path, os.getpid())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(b"QPYSTS1 %d %s\n" % (p.fetched, p.id.encode()) + body)
            # no fsync: a cache lost in a crash is simply fetched again
            os.rename(tmp, path)
        except OSError as e:
            if not Cache.warned:
                log("warning: MTA-STS policies are not cached in %s: %s"
                    % (self.dir, e.strerror))
                Cache.warned = True
            try:
                os.unlink(tmp)
            except OSError:
                pass


def policy_for(res: dns.resolver.Resolver, cache: Cache, domain: str, addresses,
               cafile: str) -> Policy | None:
    """The MTA-STS policy in force for `domain` (see LOOKUP), or None.

    addresses(name) gives the addresses of a host name (the delivery's resolver)."""
    domain = domain.lower().rstrip(".")
    now = int(time.time())
    cached = cache.get(domain)
    if cached is not None and cached.expired(now):
        cached = None
    try:
        policy_id = txt_id(res, domain)
    except (dns.exception.DNSException, OSError, ValueError):
        return cached
    if policy_id is None or (cached is not None and cached.id == policy_id):
        return cached
    try:
        body = fetch(addresses("mta-sts." + domain), domain, cafile)
        p = parse_policy(body, policy_id, now)
    except (FetchFailed, ValueError, OSError, ssl.SSLError) as e:
        log("warning: MTA-STS policy of %s not fetched: %s" % (clean(domain, 100),
                                                                clean(str(e), 300)))
        return cached
    cache.put(domain, p, body)
    return p
