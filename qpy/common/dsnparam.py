"""dsnparam — the DSN extension's parameters (RFC 3461), parsed as bytes in one place.

    MAIL FROM:<...> RET=FULL|HDRS ENVID=xtext
    RCPT TO:<...>   NOTIFY=NEVER|SUCCESS,DELAY,FAILURE ORCPT=addr-type;xtext

qpy-smtpd parses what a client sends with `mail_param` and `rcpt_param`; the
sendmail front ends with `notify_value`, `ret_value` and `envid_value`. What
passes is kept in one canonical form, the parameters as they go on the wire
(upper-case keywords and values, xtext re-encoded with upper-case hex, RET
before ENVID and NOTIFY before ORCPT, one space between), which the queue holds
(qpy.common.envelope, qpy.common.state) and qpy-remote sends as it stands to a
peer that offers DSN. `mail_params`/`rcpt_params` read that form back, with the
same checks, for every reader of a queue file.

The rules (RFC 3461 section 4): xtext is printable ASCII but `+` and `=`, and
`+XX` (upper-case hex) for any byte; ENVID is at most 100 characters and decodes
to printable ASCII; ORCPT is at most 500 characters, its address type `rfc822`
(xtext that decodes to printable ASCII) or `utf-8` (RFC 6533 utf-8-addr-xtext:
printable ASCII but `+`, `=` and `\\`, and `\\x{HEX}` for any other character);
NOTIFY is NEVER alone, or a list of SUCCESS, DELAY and FAILURE, each at most once.
Anything else raises DsnError; nothing is repaired.
"""

# (no __future__ import: qpy-sendmail -N/-R/-V loads this module; docs/queue.md)

MAX_ENVID = 100         # RFC 3461 4.4
MAX_ORCPT = 500         # RFC 3461 4.2
NOTIFY_WORDS = (b"SUCCESS", b"DELAY", b"FAILURE")
_HEX = b"0123456789ABCDEF"


class DsnError(ValueError):
    """A DSN parameter qpy does not accept; str(e) is a short reason."""


def xtext_decode(text: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == 0x2B:           # +XX
            pair = text[i + 1:i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise DsnError("bad xtext")
            out.append(int(pair, 16))
            i += 3
            continue
        if not 0x21 <= c <= 0x7E or c == 0x3D:
            raise DsnError("bad character in xtext")
        out.append(c)
        i += 1
    return bytes(out)


def xtext_encode(data: bytes) -> bytes:
    return b"".join(bytes((c,)) if 0x21 <= c <= 0x7E and c not in (0x2B, 0x3D)
                    else b"+%02X" % c for c in data)


def _printable(data: bytes, space: bool) -> bool:
    low = 0x20 if space else 0x21
    return all(low <= c <= 0x7E for c in data)


def utf8_xtext_decode(text: bytes) -> str:
    """RFC 6533 utf-8-addr-xtext: `\\x{HEX}` for what is not printable ASCII."""
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == 0x5C:
            end = text.find(b"}", i)
            digits = text[i + 3:end]
            if text[i + 1:i + 3] != b"x{" or end == -1 or not 1 <= len(digits) <= 6 \
                    or not all(d in _HEX for d in digits):
                raise DsnError("bad utf-8-addr-xtext")
            point = int(digits, 16)
            if point < 0x20 or 0x7F <= point <= 0x9F or 0xD800 <= point <= 0xDFFF \
                    or point > 0x10FFFF or point in (0x2028, 0x2029):
                raise DsnError("bad character in utf-8-addr-xtext")
            out.append(chr(point))
            i = end + 1
            continue
        if not 0x21 <= c <= 0x7E or c in (0x2B, 0x3D):
            raise DsnError("bad character in utf-8-addr-xtext")
        out.append(chr(c))
        i += 1
    return "".join(out)


def utf8_xtext_encode(text: str) -> bytes:
    return "".join(ch if "!" <= ch <= "~" and ch not in "+=\\" else "\\x{%X}" % ord(ch)
                   for ch in text).encode("ascii")


# -- the parameters one at a time: (canonical value) or DsnError -------------------------
def ret_value(value: bytes | None) -> bytes:
    v = (value or b"").upper()
    if v not in (b"FULL", b"HDRS"):
        raise DsnError("RET is FULL or HDRS")
    return v


def envid_value(value: bytes | None, encoded: bool = True) -> bytes:
    """The canonical xtext of ENVID; `encoded` False: value is the plain text."""
    if value is None or not value:
        raise DsnError("ENVID needs a value")
    plain = xtext_decode(value) if encoded else value
    if not _printable(plain, False):
        raise DsnError("ENVID is printable ASCII")
    text = xtext_encode(plain)
    if len(text) > MAX_ENVID or (encoded and len(value) > MAX_ENVID):
        raise DsnError("ENVID longer than %d characters" % MAX_ENVID)
    return text


def notify_value(value: bytes | None) -> bytes:
    words = (value or b"").upper().split(b",")
    if words == [b"NEVER"]:
        return b"NEVER"
    if not all(w in NOTIFY_WORDS for w in words) or len(set(words)) != len(words):
        raise DsnError("NOTIFY is NEVER, or SUCCESS, DELAY and FAILURE each once")
    return b",".join(words)


def orcpt_value(value: bytes | None) -> bytes:
    if value is None or len(value) > MAX_ORCPT:
        raise DsnError("ORCPT longer than %d characters" % MAX_ORCPT)
    kind, semi, addr = value.partition(b";")
    kind = kind.lower()
    if not semi or not addr:
        raise DsnError("ORCPT is addr-type;address")
    if kind == b"rfc822":
        plain = xtext_decode(addr)
        if not _printable(plain, True):
            raise DsnError("ORCPT rfc822 address is printable ASCII")
        return b"rfc822;" + xtext_encode(plain)
    if kind == b"utf-8":
        return b"utf-8;" + utf8_xtext_encode(utf8_xtext_decode(addr))
    raise DsnError("ORCPT address type is rfc822 or utf-8")


MAIL_KEYS = {b"RET": ret_value, b"ENVID": envid_value}
RCPT_KEYS = {b"NOTIFY": notify_value, b"ORCPT": orcpt_value}


def _join(have: dict[bytes, bytes], order: tuple[bytes, bytes]) -> bytes:
    return b" ".join(k + b"=" + have[k] for k in order if k in have)


def _read(text: bytes, keys: dict) -> dict[bytes, bytes]:
    have: dict[bytes, bytes] = {}
    for word in text.split(b" ") if text else ():
        key, eq, value = word.partition(b"=")
        check = keys.get(key)
        if check is None or not eq or key in have:
            raise DsnError("bad stored DSN parameters")
        have[key] = check(value)
    return have


def mail_params(text: bytes) -> dict[bytes, bytes]:
    """The stored MAIL parameters (b"" for none) as {b"RET": .., b"ENVID": ..}."""
    have = _read(text, MAIL_KEYS)
    if _join(have, (b"RET", b"ENVID")) != text:
        raise DsnError("DSN parameters not in their canonical form")
    return have


def rcpt_params(text: bytes) -> dict[bytes, bytes]:
    """The stored RCPT parameters (b"" for none) as {b"NOTIFY": .., b"ORCPT": ..}."""
    have = _read(text, RCPT_KEYS)
    if _join(have, (b"NOTIFY", b"ORCPT")) != text:
        raise DsnError("DSN parameters not in their canonical form")
    return have


def join_mail(have: dict[bytes, bytes]) -> bytes:
    return _join(have, (b"RET", b"ENVID"))


def join_rcpt(have: dict[bytes, bytes]) -> bytes:
    return _join(have, (b"NOTIFY", b"ORCPT"))


# -- what the stored form means ------------------------------------------------------------
def notify_of(rcpt: bytes) -> frozenset[bytes] | None:
    """The NOTIFY words of stored RCPT parameters; None: not given (the default)."""
    value = rcpt_params(rcpt).get(b"NOTIFY")
    return None if value is None else frozenset(value.split(b","))


def wants(rcpt: bytes, word: bytes) -> bool:
    """Whether a notice of kind `word` (SUCCESS, DELAY, FAILURE) goes out. Without
    NOTIFY: failures and delays, as before DSN (RFC 3461 4.1)."""
    notify = notify_of(rcpt) if rcpt else None
    if notify is None:
        return word != b"SUCCESS"
    return word in notify


def original_recipient(rcpt: bytes) -> str:
    """The Original-Recipient field's value (RFC 3464 2.3.1), or "" without ORCPT;
    a utf-8 address stays in its utf-8-addr-xtext form (RFC 6533)."""
    orcpt = rcpt_params(rcpt).get(b"ORCPT")
    if orcpt is None:
        return ""
    kind, _, addr = orcpt.partition(b";")
    if kind == b"rfc822":
        addr = xtext_decode(addr)
    return "%s;%s" % (kind.decode("ascii"), addr.decode("ascii"))


def envid_of(mail: bytes) -> str:
    """The ENVID as plain text (Original-Envelope-Id), or ""."""
    envid = mail_params(mail).get(b"ENVID")
    return xtext_decode(envid).decode("ascii") if envid else ""


def headers_only(mail: bytes) -> bool:
    return mail_params(mail).get(b"RET") == b"HDRS"
