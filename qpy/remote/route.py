"""route — where a remote delivery goes: smtproutes, then MX/A/AAAA from DNS.

Used by qpy-remote (as `qpyr`); no program of its own.

ORDER
    1. A recipient domain that is an address literal (`[192.0.2.1]`,
       `[IPv6:2001:db8::1]`) is that address.
    2. `control/smtproutes` as qmail: `domain:relay[:port[:mode]]`; the key
       is tried exactly, then as each `.suffix`, then empty (a smarthost for
       all). The relay is a name (A/AAAA only, never MX) or `[address]`. An
       empty relay means "look up MX as usual"; qpy lets it carry a port
       (`domain::2525`) to reach peers on another port by MX. The mode is
       `smtps` (TLS from the first byte, RFC 8314 implicit TLS) or `starttls`
       (STARTTLS required: never clear text); without one, port 465 means
       `smtps`, port 587 `starttls`, any other port what control/tlspolicy
       says. A line with an unknown mode defers its mail (#4.3.5).
    3. DNS with dnspython, through `control/resolvers` (`IP` or `IP:port`,
       `[IPv6]:port`) when it exists, else the system's resolvers: MX sorted
       by preference, random among equal ones; no MX record at all means the
       domain itself at preference 0 (RFC 5321 5.1); CNAMEs are followed by
       the resolver; each MX gets its AAAA then its A addresses.

OUTCOMES
    NXDOMAIN: permanent (#5.1.2). Null MX (RFC 7505, exchange `.`): permanent
    (#5.1.10). DNS timeouts and SERVFAIL: temporary (#4.4.3). No address at
    all: permanent, or temporary when some lookup failed softly.

THIS HOST
    An MX named `me` or in `locals`, or whose address is one of this host's
    (the exact interface addresses, plus `control/ipme`), is this host: only
    MXs of strictly better preference are kept, and when none is left the
    delivery fails permanently (#5.4.6) instead of looping. Addresses are
    compared only for port 25: with an explicit port (`domain::2525`) the
    target is a service on that port, not this host's SMTP listener. An
    smtproutes relay is used as configured, as qmail does.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.resolver
import psutil

from qpy.common.control import Control
from qpy.common.resolver import literal, make_resolver

SMTP_PORT = 25
DNS_TIMEOUT = 10        # seconds per query attempt
DNS_LIFETIME = 30       # seconds for one lookup, retries included
MAX_MX = 20             # MX records kept; more is a misconfiguration or an attack
MAX_ADDRS = 10          # addresses kept per host name


class RouteError(Exception):
    """No target: status b"Z" (temporary) or b"D" (permanent), with a reason."""

    def __init__(self, status: bytes, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


MODES = ("", "smtps", "starttls")


@dataclass
class Target:
    host: str       # the name we connect to (for TLS verification), or the address
    address: str
    port: int
    pref: int
    mode: str = ""  # smtproutes' mode: "" (control/tlspolicy decides), smtps, starttls
    hop: str = ""   # the next hop as smtproutes names it (or the MX name): the key of
                    # control/smtpauth, control/tlsclientcert and control/tlspolicy
    secure: bool = False    # from an MX answer the resolver marked AD (qpy.remote.dane)
    mx: bool = False        # found by MX (or the domain itself): MTA-STS may apply


def smtproute(routes: list[str], domain: str) -> tuple[str, int, str] | None:
    """The (relay, port, mode) smtproutes gives `domain`; relay '' means MX. None: no
    line."""
    table: dict[str, str] = {}
    for line in routes:
        key, sep, value = line.partition(":")
        if sep:
            table.setdefault(key.strip().lower(), value.strip())
    keys = [domain] + [domain[i:] for i, c in enumerate(domain) if c == "."] + [""]
    for key in keys:
        if key in table:
            return _parse_relay(table[key])
    return None


def _parse_relay(value: str) -> tuple[str, int, str]:
    if value.startswith("["):
        end = value.find("]")
        relay, rest = value[: end + 1], value[end + 1:]
    else:
        relay, _, rest = value.partition(":")
        rest = ":" + rest if rest else ""
    port_text, _, mode = rest[1:].partition(":")
    port = SMTP_PORT
    if rest.startswith(":") and port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    mode = mode.strip().lower() or {465: "smtps", 587: "starttls"}.get(port, "")
    return relay.strip(), port, mode


def this_host_addresses(ipme: list[str]) -> set[str]:
    """The exact addresses on this host's interfaces, plus control/ipme."""
    found = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            ip = literal(a.address.split("%")[0])
            if ip:
                found.add(ip)
    for line in ipme:
        ip = literal(line)
        if ip:
            found.add(ip)
    return found


class Router:
    def __init__(self, ctl: Control):
        self.ctl = ctl
        self._res: dns.resolver.Resolver | None = None
        self.soft: list[str] = []
        self.ad: set[tuple[str, str]] = set()      # (name, type) answered with AD

    @property
    def res(self) -> dns.resolver.Resolver:
        if self._res is None:       # made when needed: a relay by address needs no DNS
            # one per Control (a worker's, until SIGHUP makes new workers): not
            # control/resolvers and /etc/resolv.conf read again for every delivery
            self._res = self.ctl.derived("route.resolver", self._make_resolver)
        return self._res  # type: ignore[return-value]

    def _make_resolver(self) -> dns.resolver.Resolver:
        lines, source = self.ctl.explain("resolvers")
        res = make_resolver(None if source == "default" else lines,  # type: ignore[arg-type]
                            DNS_TIMEOUT, DNS_LIFETIME)
        # AD in the query asks a validating resolver to say what it validated
        # (RFC 6840 5.7); DANE trusts only that (qpy.remote.dane)
        res.flags = dns.flags.RD | dns.flags.AD
        return res

    def _query(self, name: str, rdtype: str) -> list:
        """Records of one type; [] when there are none; RouteError on NXDOMAIN/soft."""
        try:
            ans = self.res.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise RouteError(b"D", "Sorry, I couldn't find any host named %s. (#5.1.2)" % name)
        except (dns.resolver.NoAnswer, dns.resolver.NoMetaqueries):
            return []
        except (dns.exception.DNSException, OSError, ValueError) as e:
            raise RouteError(b"Z", "Sorry, DNS for %s failed temporarily: %s (#4.4.3)"
                             % (name, type(e).__name__))
        if ans.response is not None and ans.response.flags & dns.flags.AD:
            self.ad.add((name, rdtype))
        return list(ans)

    def addresses(self, name: str) -> list[str]:
        """AAAA then A addresses of `name`; soft failures noted in self.soft."""
        out: list[str] = []
        nx = 0
        for rdtype in ("AAAA", "A"):
            try:
                out += [r.address for r in self._query(name, rdtype)][:MAX_ADDRS]
            except RouteError as e:
                if e.status == b"Z":
                    self.soft.append(e.text)
                else:
                    nx += 1
        if nx == 2:
            raise RouteError(b"D", "Sorry, I couldn't find any host named %s. (#5.1.2)" % name)
        return out

    def targets(self, domain: str) -> list[Target]:
        """Where to try delivering mail for `domain`, in order; or RouteError."""
        domain = domain.lower()
        lit = literal(domain) if domain.startswith("[") else None
        if lit is not None:
            return self._not_self([Target(lit, lit, SMTP_PORT, 0, hop=domain)], SMTP_PORT)
        route = smtproute(self.ctl.lines("smtproutes"), domain)
        port, mode = SMTP_PORT, ""
        if route is not None:
            relay, port, mode = route
            if mode not in MODES:
                raise RouteError(b"Z", "Sorry, control/smtproutes names an unknown mode %r"
                                 " for %s. (#4.3.5)" % (mode[:40], domain))
            if relay:
                return self._relay(relay, port, mode)
        return [dataclasses.replace(t, mode=mode) for t in self._mx(domain, port)]

    def _relay(self, relay: str, port: int, mode: str) -> list[Target]:
        lit = literal(relay)
        if lit is not None:
            return [Target(lit, lit, port, 0, mode, relay.lower())]
        try:
            addrs = self.addresses(relay)
        except RouteError as e:
            raise RouteError(b"Z", "smtproutes relay: " + e.text)
        if not addrs:
            raise RouteError(b"Z", "Sorry, no address for smtproutes relay %s. (#4.4.3) %s"
                             % (relay, " ".join(self.soft)))
        return [Target(relay, a, port, 0, mode, relay.lower()) for a in addrs]

    def _mx(self, domain: str, port: int) -> list[Target]:
        records = self._query(domain, "MX")
        if any(r.exchange.to_text() == "." for r in records):
            raise RouteError(b"D", "Sorry, %s does not accept mail (null MX, RFC 7505). (#5.1.10)"
                             % domain)
        if not records:
            mxs = [(0, domain)]
        else:
            mxs = [(r.preference, r.exchange.to_text().rstrip(".").lower()) for r in records]
            random.shuffle(mxs)
            mxs.sort(key=lambda m: m[0])     # stable: random order among equal preferences
            mxs = mxs[:MAX_MX]
        secure = bool(records) and (domain, "MX") in self.ad
        me = {self.ctl.line("me").lower()} | {x.lower() for x in self.ctl.lines("locals")}
        local_pref = min((p for p, h in mxs if h in me), default=None)
        targets: list[Target] = []
        for pref, host in mxs:
            if host in me:
                continue
            try:
                addrs = self.addresses(host)
            except RouteError as e:
                if e.status == b"Z":
                    self.soft.append(e.text)
                continue
            targets += [Target(host, a, port, pref, hop=host, secure=secure, mx=True)
                        for a in addrs]
        out = self._not_self(targets, port, local_pref)
        if not out:
            if self.soft and local_pref is None:
                raise RouteError(b"Z", "Sorry, I couldn't find an address for %s: %s"
                                 % (domain, " ".join(self.soft)[:400]))
            if local_pref is None:
                raise RouteError(b"D", "Sorry, I couldn't find a mail exchanger or IP address"
                                 " for %s. (#5.4.4)" % domain)
        return out

    def _not_self(self, targets: list[Target], port: int,
                  local_pref: int | None = None) -> list[Target]:
        """qmail's rule: keep only MXs better than the best one that is this host."""
        if port == SMTP_PORT:
            mine = this_host_addresses(self.ctl.lines("ipme"))
            for t in targets:
                if t.address in mine and (local_pref is None or t.pref < local_pref):
                    local_pref = t.pref
        if local_pref is None:
            return targets
        kept = [t for t in targets if t.pref < local_pref]
        if not kept:
            raise RouteError(b"D", "Sorry. Although I'm listed as a best-preference MX or A"
                             " for that host, it isn't in my control/locals file, so I don't"
                             " treat it as local. (#5.4.6)")
        return kept
