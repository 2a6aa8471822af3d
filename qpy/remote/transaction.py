"""transaction — one message to the recipients of one domain: targets, sessions,
MAIL/RCPT/DATA, results.

Used by qpy-remote and qpy-rspawn's workers (as `qpyr`); no program of its own.
The rules (8-bit data, PIPELINING, 421, connection reuse) are in qpy-remote's
man page; deliver() is the entry point.
"""

from __future__ import annotations

import time
from dataclasses import replace

from qpy.common import address, dsnparam, spawn
from qpy.common.control import Control
from qpy.remote import dane, mtasts, session, smtpauth, tlspolicy
from qpy.remote.conncache import Cached, ConnCache
from qpy.remote.encode import CannotConvert, chunks, downgrade, scan, smtp_data
from qpy.remote.route import RouteError, Router, Target
from qpy.remote.session import Refused, tls_note
from qpy.remote.smtpauth import AuthFailed
from qpy.remote.tlspolicy import Plan, PolicyError
from qpy.remote.wire import Conn, PeerError, Reply, TLSHandshakeFailed, end, literal_free, why

RSET_WAIT = 20.0            # seconds for the RSET that proves a cached connection alive

K, Z, D = b"K", b"Z", b"D"
RELAYED = b"R"      # K to a peer without DSN, for a recipient whose NOTIFY has SUCCESS


class Closed(Exception):
    """The peer said 421: what is left has been deferred; drop the connection."""


class Stale(Exception):
    """A cached connection that does not serve (421, a refused RSET): go on afresh."""


class Job:
    """One message to the recipients of one domain; results fill in as we go."""

    def __init__(self, ctl: Control, sender: bytes, rcpts: list[bytes], fd: int, domain: str,
                 cache: ConnCache | None = None, dsn: spawn.Dsn | None = None):
        self.ctl = ctl
        self.cache = cache
        self.reusing = False        # a transaction on a cached connection is running
        self.sender = sender
        self.rcpts = rcpts
        self.dsn = dsn          # RET/ENVID and NOTIFY/ORCPT, for a peer that offers DSN
        self.fd = fd
        self.domain = domain
        self.results: list[tuple[bytes, bytes] | None] = [None] * len(rcpts)
        self.size, head8, body8, self.whole = scan(fd)
        self.utf8 = head8 or address.is_utf8(sender) or any(address.is_utf8(r) for r in rcpts)
        self.eight = body8 or head8
        self._auth: smtpauth.Table | None = None
        self.router = Router(ctl)
        self._sts: tuple[mtasts.Policy | None] | None = None     # looked up once
        self.deadline = time.monotonic() + max(1, ctl.integer("timeoutremotetotal"))

    def open(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if r is None]

    def settle(self, status: bytes, text: str, which: list[int] | None = None) -> None:
        for i in self.open() if which is None else which:
            if self.results[i] is None:
                self.results[i] = (status, text.encode())

    def plan(self, t: Target) -> Plan:
        """What a connection to `t` must do (qpy.remote.tlspolicy), or Refused."""
        if self._auth is None:
            self._auth = smtpauth.Table(self.ctl.dir)
        try:
            creds = self._auth.lookup(t.hop or t.host, t.port)
            p = tlspolicy.plan(self.ctl, self.domain, t, creds)
            if tlspolicy.wants_tlsa(p, t) and literal_free(t.host):
                p = tlspolicy.with_tlsa(p, t, dane.lookup(self.router.res, t.host, t.port))
            if p.why == "default" and t.mx:
                p = self.sts_plan(p, t)
            return p
        except dane.LookupFailed as e:
            raise Refused(Z, "%s; %s is skipped (RFC 7672). (#4.7.5)" % (e, t.host))
        except (AuthFailed, PolicyError) as e:
            raise Refused(Z, str(e))

    def sts_plan(self, p: Plan, t: Target) -> Plan:
        """The plan under the domain's MTA-STS policy (qpy.remote.mtasts), or Refused
        for an MX host an enforced policy does not list."""
        if self._sts is None:
            cafile = (self.ctl.lines("tlscafile") or [""])[0]
            self._sts = (mtasts.policy_for(self.router.res, mtasts.Cache(self.ctl.root),
                                           self.domain, self._addresses, cafile),)
        sts = self._sts[0]
        if sts is None or sts.mode != "enforce":
            return p
        if not sts.lists(t.host):
            raise Refused(Z, "The MTA-STS policy of %s (enforce) does not list MX %s."
                          " (#4.7.5)" % (self.domain, t.host))
        return replace(p, level="verify", why="the MTA-STS policy of %s (enforce)"
                       % self.domain)

    def _addresses(self, name: str) -> list[str]:
        try:
            return self.router.addresses(name)
        except RouteError:
            return []

    def _fits(self, c: Cached) -> bool:
        """A cached connection serves this job only under the same plan."""
        try:
            return self.plan(c.target) == c.plan
        except Refused:
            return False

    def run(self) -> None:
        if self.cache is not None:
            cached = self.cache.take(self.domain, self._fits)
            if cached is not None and self.reuse(cached):
                return
        try:
            targets = self.router.targets(self.domain)
        except RouteError as e:
            self.settle(e.status, e.text)
            return
        last, temp = "", False
        for t in targets:
            outcome = self.session(t, tls=True)
            if outcome is None:
                return
            if outcome == "plain":
                outcome = self.session(t, tls=False)
                if outcome is None:
                    return
            status, last = outcome
            temp = temp or status == Z
        if not temp and last:
            self.settle(D, last)
        self.settle(Z, last or "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)")

    def reuse(self, c: Cached) -> bool:
        """The transaction on a cached connection; False when it is stale: go on afresh.

        RSET first (pipelined with MAIL, RCPT and DATA when the peer offers
        PIPELINING), answered within RSET_WAIT seconds with 250, or the connection
        is stale. A broken connection or a 421 before the answer to the message's
        final dot leaves the recipients still open for a fresh connection; only a
        connection that breaks after the dot settles them (Possible duplicate!).
        """
        conn = c.conn
        self.reusing = True
        try:
            conn.deadline = self.deadline
            c.uses += 1
            clean = self.transaction(conn, c.target.address, c.ext)
        except (PeerError, Stale):
            conn.close()
            return not self.open()
        except BaseException:       # e.g. the message cannot be read: deliver() reports it
            conn.close()
            raise
        finally:
            self.reusing = False
        self.release(c, clean)
        return True

    @staticmethod
    def _rset_answered(conn: Conn) -> None:
        """The answer to the RSET sent on a cached connection: 250 within RSET_WAIT
        seconds, or Stale (a PeerError when it does not come)."""
        per_read, conn.timeout = conn.timeout, min(RSET_WAIT, conn.timeout)
        try:
            r = conn.reply()
        finally:
            conn.timeout = per_read
        if r.code != 250:
            raise Stale("RSET answered %d" % r.code)

    def release(self, c: Cached, clean: bool) -> None:
        """After a transaction: keep the connection for the next job, or end it."""
        if clean and self.cache is not None and c.conn.between_commands():
            self.cache.keep(c)
            return
        if clean:
            end(c.conn)
        else:
            c.conn.close()

    def session(self, t: Target, tls: bool) -> tuple[bytes, str] | str | None:
        """Deliver through one target. None: the job is settled; else why we move on
        ("plain": try this target again without TLS)."""
        opened = time.monotonic()
        try:
            p = self.plan(t)
            conn = session.connect(self.ctl, t, self.deadline)
        except Refused as e:
            return e.status, e.text
        ours = True             # until release() takes the connection over
        try:
            ext = session.start(self.ctl, conn, t, p, tls, self.domain)
            clean = self.transaction(conn, t.address, ext)
            ours = False
            self.release(Cached(conn, self.domain, t, ext, p, opened), clean)
            return None
        except Refused as e:
            if not e.final:
                return e.status, e.text
            self.settle(e.status, e.text)
            return None
        except Closed:
            return None
        except TLSHandshakeFailed as e:     # start() lets only `may` ones through
            if tls and p.level == "may":
                return "plain"
            self.settle(Z, "Connected to %s but connection died: %s. (#4.4.2)" % (t.address, e))
            return None
        except PeerError as e:
            self.settle(Z, "Connected to %s but connection died: %s.%s (#4.4.2)"
                        % (t.address, e, tls_note(conn)))
            return None
        finally:
            if ours:
                conn.close()

    def _check_421(self, r: Reply, ip: str, conn: Conn) -> None:
        """421 at any point: defer every recipient still open, and stop.

        On a cached connection: stop, and leave the recipients to a fresh one.
        """
        if r.code == 421:
            if self.reusing:
                raise Stale("421")
            self.settle(Z, "%s closes the session (421).%s %s"
                        % (ip, tls_note(conn), conn.said(r)))
            raise Closed()

    def transaction(self, conn: Conn, ip: str, ext: dict[str, str]) -> bool:
        """MAIL, RCPT, DATA. True: the connection is clean (between commands) after it."""
        tls = tls_note(conn)
        size, converted = self.size, None
        if self.eight and not self.utf8 and "8BITMIME" not in ext and "SMTPUTF8" not in ext:
            try:                            # a 7-bit peer: quoted-printable (encode.py)
                converted = downgrade(self.fd, self.size)
            except CannotConvert as e:
                self.settle(D, "This message has 8-bit data that cannot be converted to 7"
                            " bits (%s), and %s does not offer 8BITMIME. (#5.6.3)" % (e, ip))
                return True
            size = len(converted) + converted.count(b"\n")     # with CRLF line ends
        limit = ext.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < size:
            self.settle(D, "%s takes messages up to %s bytes; this one has %d. (#5.3.4)"
                        % (ip, limit, size))
            return True
        params = b""
        if "SIZE" in ext:
            params += b" SIZE=%d" % size
        if self.utf8:
            if "SMTPUTF8" not in ext:
                self.settle(D, "This message needs SMTPUTF8 (a UTF-8 address or header), which"
                            " %s does not offer; qpy does not downgrade. (#5.6.7)" % ip)
                return True
            params += b" SMTPUTF8"
        if self.eight and converted is None:
            params += b" BODY=8BITMIME"
        todo = self.open()
        dsn = self.dsn if "DSN" in ext else None    # per connection: a cached one has its own
        if dsn is not None and dsn.mail:
            params += b" " + dsn.mail
        mail = b"MAIL FROM:<%s>%s\r\n" % (self.sender, params)
        rcpts = [b"RCPT TO:<%s>%s\r\n" % (self.rcpts[i], b" " + dsn.rcpt[i]
                                           if dsn is not None and dsn.rcpt[i] else b"")
                 for i in todo]
        piped = "PIPELINING" in ext
        rset = b"RSET\r\n" if self.reusing else b""    # a cached connection: prove it
        if piped:                           # one round trip (RFC 2920: DATA ends the group)
            conn.send(rset + mail + b"".join(rcpts) + b"DATA\r\n")
            if rset:
                self._rset_answered(conn)
            r = conn.reply()
        else:
            if rset:
                conn.send(rset)
                self._rset_answered(conn)
            r = conn.command(mail[:-2])
        if r.code // 100 != 2:
            self._check_421(r, ip, conn)
            self.settle(D if r.code // 100 == 5 else Z,
                        "Connected to %s but sender was rejected.%s %s"
                        % (ip, tls, conn.said(r)))
            if piped:                       # the RCPT and DATA replies are still coming
                for _ in rcpts:
                    conn.reply()
                return conn.reply().code != 354     # 354: it waits for data; not clean
            return True
        accepted = []
        for i, cmd in zip(todo, rcpts, strict=True):
            r = conn.reply() if piped else conn.command(cmd[:-2])
            if r.code // 100 == 2:
                accepted.append(i)
                continue
            self._check_421(r, ip, conn)
            self.settle(D if r.code // 100 == 5 else Z,
                        "%s does not like recipient.%s %s"
                        % (ip, tls, conn.said(r)), [i])
        if not accepted and not piped:
            return True
        r = conn.reply() if piped else conn.command(b"DATA")
        if not accepted:
            if r.code == 354:               # a server that wants data for nobody: give it none
                conn.send(b".\r\n")
                conn.reply()
            return True
        if r.code != 354:
            self._check_421(r, ip, conn)
            self.settle(D if r.code // 100 == 5 else Z, "%s failed on DATA command.%s"
                        " %s" % (ip, tls, conn.said(r)), accepted)
            return True
        held = b""
        if converted is not None:
            pieces = iter([converted])
        else:
            pieces = iter([self.whole]) if self.whole is not None else chunks(self.fd)
        for block in smtp_data(pieces):     # the short ending goes with the last block
            if len(block) <= 5:
                held += block
                continue
            if held:
                conn.send(held)
            held = block
        conn.send(held)
        try:
            r = conn.reply()
        except PeerError as e:
            self.settle(Z, "Connected to %s but connection died after the message: %s."
                        " Possible duplicate!%s (#4.4.2)" % (ip, e, tls), accepted)
            return False
        if r.code // 100 == 2:
            text = "%s accepted message.%s %s" % (ip, tls, conn.said(r))
            if dsn is None and self.dsn is not None:    # NOTIFY=SUCCESS ends here: relayed
                self.settle(RELAYED, text, [i for i in accepted
                                            if dsnparam.wants(self.dsn.rcpt[i], b"SUCCESS")])
            self.settle(K, text, accepted)
        else:
            self._check_421(r, ip, conn)
            self.settle(D if r.code // 100 == 5 else Z, "%s failed after I sent the message.%s"
                        " %s" % (ip, tls, conn.said(r)), accepted)
        return True


def deliver(ctl: Control, sender: bytes, rcpts: list[bytes], fd: int, host: str = "",
            cache: ConnCache | None = None, dsn: spawn.Dsn | None = None
            ) -> list[tuple[bytes, bytes]]:
    """Deliver the message on `fd`; (status, text) per recipient, in order.

    Recipients are routed by their domain, or all by `host` when it is given.
    With a `cache`, a connection it holds for a domain is tried first, and the
    last clean connection is left in it; without, every session ends with QUIT.
    """
    rcpts = list(rcpts)
    results: list[tuple[bytes, bytes] | None] = [None] * len(rcpts)
    try:
        sender = address.parse_mailbox(sender, utf8=True) if sender else b""
    except address.AddressError as e:
        return [(D, b"Bad sender address: %s. (#5.1.7)" % str(e).encode())] * len(rcpts)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rcpts):
        try:
            r = address.parse_mailbox(r, utf8=True)
        except address.AddressError as e:
            results[i] = (D, b"Bad recipient address: %s. (#5.1.3)" % str(e).encode())
            continue
        rcpts[i] = r
        dom = host or address.domain_part(r).decode("utf-8", "replace")
        groups.setdefault(dom, []).append(i)
    if cache is not None:
        cache.retain(set(groups))
    for dom, idx in groups.items():
        part = None if dsn is None else spawn.Dsn(dsn.mail, [dsn.rcpt[i] for i in idx])
        job = Job(ctl, sender, [rcpts[i] for i in idx], fd, dom, cache, part)
        try:
            job.run()
        except (PeerError, OSError) as e:      # e.g. the message fd cannot be read
            job.settle(Z, "Unable to deliver: %s. (#4.3.0)" % why(e))
        for i, res in zip(idx, job.results, strict=True):
            results[i] = res or (Z, b"No result. (#4.3.0)")
    return [r or (Z, b"No result. (#4.3.0)") for r in results]
