"""address — strict RFC 5321 mailbox parsing on bytes.

One parser for every envelope address qpy accepts: SMTP paths (`<...>`), the
sender and recipients of `qpy-queue-inject`'s envelope, `.qmail` forward lines and
command-line arguments. It works on bytes with explicit limits and refuses, rather
than repairs, anything odd: control characters, NUL, CR, LF, unbalanced quotes,
bad domains. Only what passes may reach a child's environment (`SENDER`,
`RECIPIENT`): the Shellshock exploit of qmail went through an unchecked `SENDER`;
here a bare `() {` can never pass (`(` is not atext), and no address carries a
control character: no C0 control or DEL, and in an SMTPUTF8 address no C1
control (U+0080-U+009F, NEL U+0085 among them) and no U+2028/U+2029 line or
paragraph separator, which a log, a header or a shell script may take for a
line end.

The local part leaves here in one canonical form (docs/addresses.md): a quoted
string whose content is a valid dot-atom becomes that dot-atom (`"joe"` and
`"j\\oe"` are `joe`); any other quoted string is written with the fewest escapes
(only `"` and `\\` escaped). Every later stage (the RCPT check, the envelope,
qpy-queue-send, qpy-lspawn) sees that one form, so all classify alike.

`email.utils.parseaddr` is not used: it misparses hostile input (CVE-2023-27043).
"""

# (no __future__ import: the front ends load this module on every run; docs/queue.md)

MAX_LOCAL = 64          # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255        # RFC 5321 4.5.3.1.2
MAX_PATH = 256          # RFC 5321 4.5.3.1.3 (with the angle brackets)
MAX_ADDRESS = 1002      # qmail-queue's limit; longer is exit 11
MAX_LABEL = 63

# atext of RFC 5322 3.2.3: letters, digits and these.
_ATEXT = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   b"!#$%&'*+-/=?^_`{|}~")
_PRINTABLE = bytes(range(0x20, 0x7F))
_LDH = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
# for the common case, checked in C (bytes.translate) before any byte-by-byte loop
_ATEXT_DOT = bytes(sorted(_ATEXT)) + b"."
_LDH_DOT = bytes(sorted(_LDH)) + b"."
# ASCII names that passed check_domain, lowercased: a session checks its domains again
# and again (MAIL, RCPT, the envelope). Bounded; a pure function of the name.
GOOD_DOMAINS = 256
_good_domains: dict[bytes, bytes] = {}


class AddressError(ValueError):
    """The bytes are not an address qpy accepts; str(e) is a short reason."""


class NeedsUTF8(AddressError):
    """An 8-bit address where SMTPUTF8 was not given (SMTP: 553 5.6.7, not 501)."""


def _is_dot_atom(s: bytes) -> bool:
    """True when s is a dot-atom (8-bit bytes count as atext: SMTPUTF8's rule)."""
    return bool(s) and all(atom and all(c in _ATEXT or c >= 0x80 for c in atom)
                           for atom in s.split(b"."))


def unquote(local: bytes) -> bytes:
    """The content of a local part: a quoted string without its quotes and quoted-pair
    backslashes; a dot-string as it is."""
    if len(local) < 2 or not local.startswith(b'"') or not local.endswith(b'"'):
        return local
    out, i, body = bytearray(), 0, local[1:-1]
    while i < len(body):
        if body[i] == 0x5C and i + 1 < len(body):
            i += 1
        out.append(body[i])
        i += 1
    return bytes(out)


def quote(content: bytes) -> bytes:
    """The canonical local part whose content is `content`: the dot-atom itself when
    it is one, else a quoted string with only `"` and `\\` escaped."""
    if _is_dot_atom(content):
        return content
    return b'"' + content.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def canonical_local(local: bytes) -> bytes:
    """A local part in its canonical form. Only a whole quoted string is rewritten; a
    dot-string, or anything else (a prepend before a quoted part), is left as it is."""
    if local.startswith(b'"') and local.endswith(b'"') and len(local) >= 2:
        return quote(unquote(local))
    return local


def _check_dot_string(local: bytes, utf8: bool) -> None:
    if not local:
        raise AddressError("empty local part")
    if (not local.translate(None, _ATEXT_DOT) and local[0] != 0x2E and local[-1] != 0x2E
            and b".." not in local):
        return          # a plain ASCII dot-atom; anything else gets the loop and its reason
    for atom in local.split(b"."):
        if not atom:
            raise AddressError("empty atom in local part")
        for c in atom:
            if c in _ATEXT:
                continue
            if c >= 0x80 and utf8:
                continue
            raise AddressError("bad character in local part")
    if utf8 and any(c >= 0x80 for c in local):
        try:
            local.decode("utf-8")
        except UnicodeDecodeError:
            raise AddressError("local part is not UTF-8")


def _check_quoted(q: bytes, utf8: bool) -> bytes:
    """q is the quoted string with its quotes; returns it unchanged if valid."""
    i, n = 1, len(q) - 1
    while i < n:
        c = q[i]
        if c == 0x5C:  # backslash: quoted-pair, printable ASCII only
            if i + 1 >= n or not 0x20 <= q[i + 1] <= 0x7E:
                raise AddressError("bad quoted pair")
            i += 2
            continue
        if c == 0x22:
            raise AddressError("stray quote in local part")
        if 0x20 <= c <= 0x7E or (c >= 0x80 and utf8):
            i += 1
            continue
        raise AddressError("control character in quoted local part")
    return q


def check_domain(domain: bytes, utf8: bool = False) -> bytes:
    """Validate a domain or address literal; return it lowercased (ASCII only)."""
    if not domain:
        raise AddressError("empty domain")
    if len(domain) > MAX_DOMAIN:
        raise AddressError("domain too long")
    if domain.startswith(b"["):
        if not domain.endswith(b"]"):
            raise AddressError("bad address literal")
        lit = domain[1:-1]
        import ipaddress  # only address literals need it; keeps sendmail's start-up small
        try:
            if lit[:5].lower() == b"ipv6:":
                ipaddress.IPv6Address(lit[5:].decode("ascii"))
                return b"[IPv6:" + lit[5:].lower() + b"]"
            ipaddress.IPv4Address(lit.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise AddressError("bad address literal")
        return domain
    if domain.endswith(b"."):
        raise AddressError("domain ends with a dot")
    known = _good_domains.get(domain)
    if known is not None:
        return known
    if not domain.translate(None, _LDH_DOT):     # ASCII letters, digits, hyphens, dots
        for label in domain.split(b"."):
            if (not label or len(label) > MAX_LABEL or label[0] == 0x2D
                    or label[-1] == 0x2D):
                break       # the loop below says what is wrong
        else:
            if len(_good_domains) >= GOOD_DOMAINS:
                _good_domains.clear()
            known = _good_domains[domain] = domain.lower()
            return known
    for label in domain.split(b"."):
        if not label or len(label) > MAX_LABEL:
            raise AddressError("bad domain label")
        if label[0] == 0x2D or label[-1] == 0x2D:
            raise AddressError("domain label starts or ends with a hyphen")
        for c in label:
            if c in _LDH or (c >= 0x80 and utf8):
                continue
            raise AddressError("bad character in domain")
    if utf8 and any(c >= 0x80 for c in domain):
        try:
            return domain.decode("utf-8").lower().encode("utf-8")
        except UnicodeDecodeError:
            raise AddressError("domain is not UTF-8")
    return domain.lower()


def split(addr: bytes) -> tuple[bytes, bytes]:
    """Split at the last '@' outside quotes: (local, domain); domain may be empty."""
    if addr.startswith(b'"'):
        end = addr.find(b'"', 1)
        while end != -1 and addr[end - 1] == 0x5C and not _even_backslashes(addr, end):
            end = addr.find(b'"', end + 1)
        if end == -1:
            raise AddressError("unterminated quoted local part")
        rest = addr[end + 1:]
        if rest and not rest.startswith(b"@"):
            raise AddressError("text after quoted local part")
        return addr[: end + 1], rest[1:]
    at = addr.rfind(b"@")
    if at == -1:
        return addr, b""
    return addr[:at], addr[at + 1:]


def _even_backslashes(s: bytes, pos: int) -> bool:
    n = 0
    while pos - 1 - n >= 0 and s[pos - 1 - n] == 0x5C:
        n += 1
    return n % 2 == 0


def _check_controls(addr: bytes, utf8: bool) -> None:
    """Refuse C0 controls and DEL; in 8-bit text also what is not UTF-8, C1 controls
    (NEL among them) and the Unicode line and paragraph separators."""
    rest = addr.translate(None, _PRINTABLE)     # what is not printable ASCII
    if not rest:
        return
    if any(c < 0x20 or c == 0x7F for c in rest):
        raise AddressError("control character in address")
    if not utf8:
        raise NeedsUTF8("8-bit address without SMTPUTF8")
    try:
        text = addr.decode("utf-8")
    except UnicodeDecodeError:
        raise AddressError("address is not UTF-8")
    for ch in text:
        if "\x80" <= ch <= "\x9f" or ch in "\u2028\u2029":
            raise AddressError("control character in address")


def parse_mailbox(addr: bytes, utf8: bool = False, need_domain: bool = True) -> bytes:
    """Check a bare mailbox `local@domain`; return it with the local part canonical
    (see above) and the domain lowercased."""
    if len(addr) > MAX_ADDRESS:
        raise AddressError("address too long")
    _check_controls(addr, utf8)
    local, domain = split(addr)
    if local.startswith(b'"'):
        _check_quoted(local, utf8)
    else:
        _check_dot_string(local, utf8)
    local = canonical_local(local)
    if len(local) > MAX_LOCAL:      # of the form that travels on: `"\\a"` is `a`
        raise AddressError("local part too long")
    if not domain:
        if need_domain:
            raise AddressError("address has no domain")
        return local
    return local + b"@" + check_domain(domain, utf8)


def parse_path(path: bytes, utf8: bool = False) -> bytes:
    """Parse an SMTP path `<...>` (RFC 5321 4.1.2); return the mailbox, b'' for `<>`.

    A source route (`<@a,@b:user@host>`) is accepted and dropped, as RFC 5321
    C. says receivers should.
    """
    if len(path) > MAX_PATH + 256:
        raise AddressError("path too long")
    if len(path) < 2 or path[0] != 0x3C or path[-1] != 0x3E:
        raise AddressError("path must be in angle brackets")
    inner = path[1:-1]
    if not inner:
        return b""
    if inner.startswith(b"@"):
        colon = inner.find(b":")
        if colon == -1:
            raise AddressError("bad source route")
        for hop in inner[:colon].split(b","):
            if not hop.startswith(b"@"):
                raise AddressError("bad source route")
            check_domain(hop[1:], utf8)
        inner = inner[colon + 1:]
    if len(inner) > MAX_PATH - 2:
        raise AddressError("path too long")
    return parse_mailbox(inner, utf8)


def is_utf8(addr: bytes) -> bool:
    """True when the address needs SMTPUTF8 to travel."""
    return any(c >= 0x80 for c in addr)


def domain_part(addr: bytes) -> bytes:
    return split(addr)[1]


# --- VERP (qmail's variable envelope return path) -------------------------------------
# A sender `pre@host-@[]` asks for a return path per recipient: to `box@dom` the
# message goes with the sender `pre` `box` `=` `dom` `@host` (`owner-@list.example-@[]`
# to joe@x.example: `owner-joe=x.example@list.example`), so that a bounce names the
# recipient it is about. ezmlm and other list managers send so.
VERP = b"-@[]"


def is_verp(sender: bytes) -> bool:
    return sender.endswith(VERP) and b"@" in sender[:-len(VERP)]


def parse_sender(addr: bytes, utf8: bool = False, need_domain: bool = True) -> bytes:
    """parse_mailbox() for an envelope sender: also the VERP form `mailbox-@[]`
    (whose mailbox needs its domain), returned as its canonical mailbox + VERP."""
    if addr.endswith(VERP):
        return parse_mailbox(addr[:-len(VERP)], utf8) + VERP
    return parse_mailbox(addr, utf8, need_domain)


def verp(sender: bytes, rcpt: bytes) -> bytes:
    """The return path for `rcpt` of the VERP sender `pre@host-@[]` (is_verp): the
    local part `pre` + the recipient's local part + `=` + its domain, at host; quoted
    only when it is not a dot-atom. One that is no valid address (a local part over
    MAX_LOCAL bytes) is `pre@host`: a delivery or a bounce must have a sender that
    every later stage accepts."""
    base = sender[:-len(VERP)]
    pre, host = split(base)
    box, dom = split(rcpt)
    try:
        return parse_mailbox(quote(unquote(pre) + unquote(box) + b"=" + dom) + b"@" + host,
                             utf8=True)
    except AddressError:
        return base
