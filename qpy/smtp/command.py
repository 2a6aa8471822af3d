"""command — parse SMTP command lines and their arguments, as bytes, strictly.

Pure functions, no I/O: `qpy-smtpd` calls them and the property tests drive
them with arbitrary bytes. Every function either returns a well-formed value or
raises CommandError with the SMTP reply to give; none can raise anything else.

Addresses themselves are checked by qpy.common.address (the one parser); here
we only find the path's end (respecting quoted local parts, so that `>` inside
quotes does not end it) and parse the ESMTP parameters after it (RFC 5321
4.1.2 esmtp-param; values limited to printable ASCII without `=` and space);
the DSN parameters' values (RFC 3461) by qpy.common.dsnparam.
"""

from __future__ import annotations

from qpy.common import dsnparam

MAX_COMMAND = 512        # RFC 5321 4.5.3.1.4: a command line with its CRLF
MAX_DSN_COMMAND = MAX_COMMAND + 500   # RFC 3461 4: MAIL and RCPT with DSN parameters
MAX_PARAMS = 10          # more ESMTP parameters than this is not a real client
MAX_RECEIVED_TEXT = 120  # longest HELO or host name copied into a Received line

_KEYCHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
# Characters copied verbatim into the Received line; everything else becomes '?'.
_SAFE_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_:@+=/%[]"
_SAFE = frozenset(_SAFE_BYTES)
# C0 controls but TAB, and DEL: no place in a command line
_CONTROLS = bytes(c for c in range(0x20) if c != 0x09) + b"\x7f"


class CommandError(ValueError):
    """The reply to give: `code` (int) and `text` ('5.5.4 ...')."""

    def __init__(self, code: int, text: str):
        super().__init__("%d %s" % (code, text))
        self.code = code
        self.text = text


def split_line(line: bytes) -> tuple[bytes, bytes]:
    """A command line without its line end -> (VERB in upper case, argument).

    Control characters (NUL, a CR inside the line, ...) are refused: they have no
    place in a command, and letting them through invites injection further on.
    """
    if len(line.translate(None, _CONTROLS)) != len(line):
        raise CommandError(500, "5.5.2 Syntax error: control character in command")
    verb, _, arg = line.partition(b" ")
    if not verb:
        raise CommandError(500, "5.5.2 Syntax error: empty command")
    return verb.upper(), arg


def path_end(text: bytes) -> int:
    """Index of the `>` that closes the path opening at text[0] == `<`."""
    end = text.find(b">", 1)
    if end != -1 and b'"' not in text[1:end]:
        return end          # no quoted part before it: the first `>` closes the path
    quoted = False
    i = 1
    n = len(text)
    while i < n:
        c = text[i]
        if quoted and c == 0x5C:      # quoted-pair: skip the next byte
            i += 2
            continue
        if c == 0x22:
            quoted = not quoted
        elif c == 0x3E and not quoted:
            return i
        i += 1
    raise CommandError(501, "5.5.4 Syntax error: path not closed with >")


def parse_params(text: bytes) -> dict[bytes, bytes | None]:
    """ESMTP parameters `KEY=VALUE KEY ...` -> {KEY (upper case): VALUE or None}."""
    params: dict[bytes, bytes | None] = {}
    for word in text.split(b" "):
        if not word:
            continue
        key, eq, value = word.partition(b"=")
        if not key or not all(c in _KEYCHARS for c in key) or key[0] == 0x2D:
            raise CommandError(501, "5.5.4 Syntax error in parameters")
        if eq and (not value or not all(0x21 <= c <= 0x7E and c != 0x3D for c in value)):
            raise CommandError(501, "5.5.4 Syntax error in parameter value")
        key = key.upper()
        if key in params:
            raise CommandError(501, "5.5.4 Duplicate parameter")
        params[key] = value if eq else None
        if len(params) > MAX_PARAMS:
            raise CommandError(501, "5.5.4 Too many parameters")
    return params


def parse_path_arg(arg: bytes, keyword: bytes) -> tuple[bytes, dict[bytes, bytes | None]]:
    """`FROM:<path> params` (keyword b"FROM:") -> (path with brackets, params).

    A space after the colon is tolerated, as nearly every server does.
    """
    usage = "5.5.4 Syntax: %s<address>" % keyword.decode()
    if arg[:len(keyword)].upper() != keyword:
        raise CommandError(501, usage)
    rest = arg[len(keyword):].lstrip(b" ")
    if not rest.startswith(b"<"):
        raise CommandError(501, usage)
    end = path_end(rest)
    tail = rest[end + 1:]
    if tail and not tail.startswith(b" "):
        raise CommandError(501, "5.5.4 Syntax error after the address")
    return rest[:end + 1], parse_params(tail)


def line_too_long(line: bytes) -> bool:
    """A command line (without its CRLF) over its limit: MAX_COMMAND, and
    MAX_DSN_COMMAND for MAIL and RCPT (RFC 3461 4)."""
    limit = MAX_DSN_COMMAND if line[:5].upper() in (b"MAIL ", b"RCPT ") else MAX_COMMAND
    return len(line) + 2 > limit


def dsn_params(params: dict[bytes, bytes | None], keys: dict) -> dict[bytes, bytes]:
    """The canonical values of those `params` that are among the DSN `keys`
    (dsnparam.MAIL_KEYS or RCPT_KEYS); a malformed one is 501."""
    have = {}
    for key, value in params.items():
        check = keys.get(key)
        if check is not None:
            try:
                have[key] = check(value)
            except dsnparam.DsnError as e:
                raise CommandError(501, "5.5.4 %s" % e)
    return have


def parse_size(value: bytes | None) -> int:
    """The value of SIZE= (RFC 1870): digits only, bounded."""
    if value is None or not value.isdigit() or len(value) > 20:
        raise CommandError(501, "5.5.4 Syntax error in SIZE")
    return int(value)


def safe_text(text: bytes | str, limit: int = MAX_RECEIVED_TEXT) -> str:
    """Text from the client made safe for a header: unusual characters become '?'."""
    if isinstance(text, str):
        text = text.encode("utf-8", "replace")
    text = text[:limit]
    if not text.translate(None, _SAFE_BYTES):       # the common case: all of it is safe
        return text.decode("ascii") or "unknown"
    return "".join(chr(c) if c in _SAFE else "?" for c in text) or "unknown"


def received_line(helo: bytes, host: str, ip: str, me: str, protocol: str, ident: str,
                  date: str) -> bytes:
    """The Received: line qpy-smtpd puts on top of each accepted message (LF line ends)."""
    return ("Received: from %s (%s [%s])\n\tby %s (qpy) with %s id %s;\n\t%s\n"
            % (safe_text(helo), safe_text(host), safe_text(ip), safe_text(me), protocol,
               ident, date)).encode("ascii")
