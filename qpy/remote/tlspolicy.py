"""tlspolicy — how much TLS a delivery needs, and the TLS context that gives it.

Used by qpy.remote.session (as `qpyr`); no program of its own.

LEVELS (Postfix's names)
    none        no STARTTLS, even when offered.
    may         STARTTLS when offered, any certificate; a failed handshake is
                retried once in clear text (opportunistic TLS). The default.
    encrypt     TLS required, any certificate.
    verify      TLS required; the certificate must chain to the system's CAs
                (or those of control/tlscafile) and name the host connected to
                (the MX name, or the relay as smtproutes names it).
    dane        the host's TLSA records (qpy.remote.dane) when the resolver
                vouches for them: TLS required, the certificate must match one;
                without TLSA records, `may`. The default for an MX host of a
                domain whose MX answer the resolver marked AD, when it has TLSA
                records; an explicit `may` (or any other level) turns it off.
    dane-only   as dane, but no TLSA records defers.
    A level that cannot be met defers the delivery (#4.7.5), with the reason
    in the log and in qpy-qread: never a fall back to clear text.

WHERE THE LEVEL COMES FROM (the first that applies)
    1. control/tlspolicy, `DOMAIN-OR-HOST LEVEL` a line: the recipient's domain
       first, then the next-hop host (the MX name, or the relay as
       control/smtproutes names it, tried as `HOST:PORT` then `HOST`). A key
       starting with a dot matches every name below it (`.example.com`). A line
       with an unknown level is logged and that delivery deferred.
    2. control/tlsverify (qpy's older list of domains): verify.
    3. may.
    Then: an smtproutes mode (smtps, starttls) raises none or may to encrypt,
    and so do credentials in control/smtpauth without `cleartext-ok`.

OTHER CONTROL FILES
    control/tlscafile: a PEM file of CA certificates trusted for `verify`, in
    addition to the system's. Default: none (the system's CAs only).
    control/tlsclientcert: `HOST[:PORT] CERTFILE [KEYFILE]` a line, a client
    certificate (PEM chain, with its key, or the key in KEYFILE) shown to that
    next hop; readable by qpyr. Default: none. A file that cannot be loaded
    defers the delivery.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, replace
from typing import TypeVar

from qpy.common.control import Control
from qpy.common.log import clean, log
from qpy.remote.dane import TLSA
from qpy.remote.route import Target
from qpy.remote.smtpauth import Credentials, hop_keys

V = TypeVar("V")
LEVELS = ("none", "may", "encrypt", "verify", "dane", "dane-only")
TLS_LEVELS = LEVELS[2:]         # the ones that need TLS


class PolicyError(Exception):
    """The policy cannot be worked out or loaded: defer, with this reason."""


@dataclass(frozen=True)
class Plan:
    """What one connection must do: its TLS level and why, AUTH, a client cert."""
    level: str
    why: str                        # where the level came from, for the reasons
    creds: Credentials | None = None
    cert: tuple[str, str] | None = None     # (certfile, keyfile)
    tlsa: tuple[TLSA, ...] = ()             # DANE: the records the certificate must match


def _match(table: dict[str, V], names: list[str]) -> tuple[str, V] | None:
    """(key, value) for the first name found exactly or under a `.suffix` key."""
    for name in names:
        if name in table:
            return name, table[name]
        for i, c in enumerate(name):
            if c == "." and name[i:] in table:
                return name[i:], table[name[i:]]
    return None


def table(lines: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        f = line.split()
        if len(f) >= 2:
            out.setdefault(f[0].lower(), " ".join(f[1:]).lower())
    return out


def level_for(ctl: Control, domain: str, t: Target) -> tuple[str, str]:
    """(level, where it came from) before smtproutes and smtpauth raise it."""
    pol: dict[str, str] = ctl.derived("tlspolicy", lambda: table(ctl.lines("tlspolicy")))
    for names in ([domain.lower()], hop_keys(t.hop or t.host, t.port)):
        m = _match(pol, names)
        if m is not None:
            key, level = m
            if level not in LEVELS:
                log("warning: control/tlspolicy: unknown level %r for %s" % (clean(level, 40),
                                                                              clean(key, 100)))
                raise PolicyError("control/tlspolicy names an unknown level %r for %s. (#4.7.5)"
                                  % (clean(level, 40), clean(key, 100)))
            return level, "control/tlspolicy (%s)" % key
    verify: dict[str, str] = ctl.derived("tlsverify", lambda: {d.lower(): ""
                                                                 for d in ctl.lines("tlsverify")})
    if _match(verify, [domain.lower()]):
        return "verify", "control/tlsverify"
    return "may", "default"


def _cert_rows(ctl: Control) -> dict[str, tuple[str, str]]:
    rows: dict[str, tuple[str, str]] = {}
    for line in ctl.lines("tlsclientcert"):
        f = line.split()
        if len(f) in (2, 3):
            rows.setdefault(f[0].lower(), (f[1], f[-1]))
    return rows


def client_cert(ctl: Control, t: Target) -> tuple[str, str] | None:
    """(certfile, keyfile) from control/tlsclientcert for the next hop, or None."""
    rows: dict[str, tuple[str, str]] = ctl.derived("tlsclientcert", lambda: _cert_rows(ctl))
    m = _match(rows, hop_keys(t.hop or t.host, t.port))
    return m[1] if m else None


def plan(ctl: Control, domain: str, t: Target, creds: Credentials | None) -> Plan:
    level, why = level_for(ctl, domain, t)
    if t.mode and level in ("none", "may"):
        level, why = "encrypt", "control/smtproutes (%s)" % t.mode
    if creds is not None and not creds.cleartext_ok:
        if level == "none":
            raise PolicyError("%s says none for %s, but control/smtpauth has credentials for"
                              " it that go only over TLS. (#4.7.5)" % (why, t.hop or t.host))
        if level == "may":
            level, why = "encrypt", "control/smtpauth (credentials only over TLS)"
    return Plan(level, why, creds, client_cert(ctl, t))


def wants_tlsa(p: Plan, t: Target) -> bool:
    """Whether the TLSA records of `t` are to be looked up for this plan."""
    return p.level in ("dane", "dane-only") or (p.why == "default" and t.secure)


def with_tlsa(p: Plan, t: Target, records: tuple[TLSA, ...] | None) -> Plan:
    """The plan once the TLSA lookup answered (None: records the resolver did not
    vouch for, treated as none)."""
    if records and any(r.usable() for r in records):
        why = p.why if p.level.startswith("dane") else "TLSA records of %s" % t.host
        return replace(p, level="dane", why=why, tlsa=records)
    if records:
        return replace(p, level="encrypt", why="TLSA records of %s (none usable)" % t.host)
    if p.level == "dane-only":
        raise PolicyError("%s says dane-only, and %s has no TLSA records the resolver vouches"
                          " for. (#4.7.5)" % (p.why, t.host))
    if p.level == "dane":
        return replace(p, level="may", why=p.why + ", no TLSA records")
    return p


def context(ctl: Control, p: Plan) -> ssl.SSLContext:
    """The client context for the plan's level (and client certificate)."""
    if p.level == "verify":
        ctx = ssl.create_default_context()
        cafile = (ctl.lines("tlscafile") or [""])[0]
        if cafile:
            try:
                ctx.load_verify_locations(cafile=cafile)
            except (OSError, ssl.SSLError) as e:
                raise PolicyError("control/tlscafile %s cannot be loaded: %s. (#4.7.5)"
                                  % (clean(cafile, 200), clean(str(e), 200)))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if p.cert is not None:
        try:
            ctx.load_cert_chain(p.cert[0], p.cert[1])
        except (OSError, ssl.SSLError) as e:
            raise PolicyError("control/tlsclientcert %s cannot be loaded: %s. (#4.7.5)"
                              % (clean(p.cert[0], 200), clean(str(e), 200)))
    return ctx
