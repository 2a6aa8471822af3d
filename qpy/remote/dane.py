"""dane — DANE for SMTP (RFC 7672): TLSA records of an MX host, trusted only when
the resolver vouches for them, and the check of the certificate chain against them.

Used by qpy.remote.transaction and qpy.remote.session (as `qpyr`); no program of
its own.

WHEN
    TLSA records are looked up (`_PORT._tcp.HOST`, through control/resolvers) for
    an MX host whose MX answer came with the AD bit (a validating resolver says the
    MX RRset is signed and valid), and for any next hop whose control/tlspolicy
    level is `dane` or `dane-only`. qpy validates no signatures itself: like
    Postfix, it trusts the AD bit of the resolver it is configured to use, which
    should be a validating resolver on this host.

    A TLSA answer without AD is as if there were none. An answer with AD:
      - records of usage DANE-TA(2) or DANE-EE(3), selector 0 (certificate) or 1
        (SubjectPublicKeyInfo), matching type 0 (full), 1 (SHA-256) or 2
        (SHA-512): the level is `dane`, TLS is required and the certificate must
        match one of them;
      - records, none of them usable (PKIX usages 0/1, unknown types): TLS is
        required, any certificate (RFC 7672 2.2: `encrypt`);
      - no records: `dane` becomes `may`, `dane-only` defers.
    A lookup that fails (SERVFAIL, timeout) makes that MX host unusable: the
    delivery moves on to the next one and defers when none is left (RFC 7672
    2.2.1), for a host whose MX answer was signed or whose level says dane.

MATCHING (RFC 7671, 7672)
    DANE-EE: the server's own certificate (or its key) matches; its names and
    dates are not checked. DANE-TA: a certificate the server sent above its own
    matches, the chain up to it is signed link by link, the server's
    certificate is within its dates and names the host connected to (its MX
    name) in a subjectAltName DNS entry (a leading `*.` matches one label). A
    DANE-TA record that matches only a key the server does not send is not
    supported.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DANE_TA, DANE_EE = 2, 3
MAX_TLSA = 20               # records kept; more is a misconfiguration or an attack


class LookupFailed(Exception):
    """The TLSA lookup failed (SERVFAIL, timeout): this MX host is unusable."""


@dataclass(frozen=True)
class TLSA:
    usage: int
    selector: int
    mtype: int
    data: bytes

    def usable(self) -> bool:
        return self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1) \
            and self.mtype in (0, 1, 2)


def lookup(res: dns.resolver.Resolver, host: str, port: int) -> tuple[TLSA, ...] | None:
    """The TLSA records of host:port when the resolver set AD; () when it says there
    are none (securely or not), None when there are some but not AD-vouched."""
    name = "_%d._tcp.%s" % (port, host.rstrip("."))
    try:
        ans = res.resolve(name, "TLSA", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return ()
    except (dns.exception.DNSException, OSError, ValueError) as e:
        raise LookupFailed("TLSA lookup for %s failed: %s" % (name, type(e).__name__))
    if ans.response is None or not ans.response.flags & dns.flags.AD:
        return None
    return tuple(TLSA(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in ans)[:MAX_TLSA]


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _matches(rec: TLSA, cert: x509.Certificate, der: bytes) -> bool:
    data = _selected(cert, der, rec.selector)
    if rec.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif rec.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == rec.data


def name_matches(cert: x509.Certificate, names: list[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns_names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        return False
    for want in (n.lower().rstrip(".") for n in names):
        for have in (d.lower().rstrip(".") for d in dns_names):
            if have == want:
                return True
            if have.startswith("*.") and "." in want and want.split(".", 1)[1] == have[2:]:
                return True
    return False


def verify(chain: list[bytes], records: tuple[TLSA, ...], names: list[str]) -> str:
    """"" when the chain the server sent satisfies one usable record; else why not."""
    if not chain:
        return "no certificate"
    try:
        certs = [x509.load_der_x509_certificate(d) for d in chain]
    except ValueError:
        return "a certificate that does not parse"
    usable = [r for r in records if r.usable()]
    leaf = certs[0]
    for rec in usable:
        if rec.usage == DANE_EE and _matches(rec, leaf, chain[0]):
            return ""
    why = "no TLSA record matches the certificate"
    for rec in usable:
        if rec.usage != DANE_TA:
            continue
        for k in range(1, len(certs)):
            if not _matches(rec, certs[k], chain[k]):
                continue
            try:
                for i in range(k):
                    certs[i].verify_directly_issued_by(certs[i + 1])
            except (InvalidSignature, ValueError, TypeError) as e:
                why = "the chain to the DANE-TA certificate does not verify (%s)" \
                    % type(e).__name__
                continue
            now = datetime.datetime.now(datetime.UTC)
            if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
                why = "the certificate is outside its dates"
                continue
            if not name_matches(leaf, names):
                why = "the certificate does not name %s" % names[0]
                continue
            return ""
    return why
