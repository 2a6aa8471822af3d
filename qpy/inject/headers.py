"""headers — what the sendmail and inject front ends do to a message's header.

Works on bytes, with limits, without the `email` package (its import alone costs
more than the rest of a sendmail run, and its address parser misreads hostile
input). It finds the header block, adds `From:`, `Date:` and `Message-ID:` when
missing, and for `-t` collects the recipients of `To:`, `Cc:` and `Bcc:` and
removes `Bcc:`. The body is never touched: its bytes reach the queue intact.
"""

# (no __future__ import: the front ends load this module on every run; docs/queue.md)

import posix
import time

from qpy.common.rfcdate import rfc5322_date

MAX_HEADER_BYTES = 1 << 20        # a header block past this is treated as body
MAX_HEADER_RECIPIENTS = 10_000
RECIPIENT_FIELDS = (b"to", b"cc", b"bcc")


class HeaderError(ValueError):
    pass


def split(message: bytes) -> tuple[list[bytes], bytes]:
    """(header lines, each with its line end; the rest of the message from the blank line)."""
    lines: list[bytes] = []
    pos = 0
    limit = min(len(message), MAX_HEADER_BYTES)
    while pos < limit:
        nl = message.find(b"\n", pos)
        end = len(message) if nl == -1 else nl + 1
        line = message[pos:end]
        if line in (b"\n", b"\r\n"):
            break
        if not (line[:1] in (b" ", b"\t") and lines) and b":" not in line.split(b"\n")[0]:
            break                 # not a header line: the body starts here (no blank line)
        lines.append(line)
        pos = end
    return lines, message[pos:]


def fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Header lines grouped into fields: (lowercased name, whole raw field)."""
    out: list[tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and out:
            name, raw = out[-1]
            out[-1] = (name, raw + line)
        else:
            out.append((line.split(b":", 1)[0].strip().lower(), line))
    return out


def _strip_comments(value: bytes) -> bytes:
    out = bytearray()
    depth = 0
    quoted = False
    i = 0
    while i < len(value):
        c = value[i]
        if quoted:
            out.append(c)
            if c == 0x5C and i + 1 < len(value):
                out.append(value[i + 1])
                i += 1
            elif c == 0x22:
                quoted = False
        elif c == 0x22 and depth == 0:
            quoted = True
            out.append(c)
        elif c == 0x28:
            depth += 1
        elif c == 0x29 and depth:
            depth -= 1
        elif depth == 0:
            out.append(c)
        i += 1
    return bytes(out)


def addresses(value: bytes) -> list[bytes]:
    """Mailboxes in an address-list field value: `a@b, Name <c@d>, group: e@f;`."""
    value = _strip_comments(value.replace(b"\r", b"").replace(b"\n", b""))
    result = []
    for item in _split_commas(value):
        item = item.strip()
        if b":" in item and b"<" not in item.split(b":", 1)[0] and not item.startswith(b'"'):
            item = item.split(b":", 1)[1]          # group name: members follow
        item = item.rstrip(b";").strip()
        if not item:
            continue
        lt, gt = item.rfind(b"<"), item.rfind(b">")
        if lt != -1 and gt > lt:
            item = item[lt + 1:gt].strip()
        if item:
            result.append(item)
    return result


def _split_commas(value: bytes) -> list[bytes]:
    parts, start, quoted, angle = [], 0, False, 0
    for i, c in enumerate(value):
        if c == 0x22 and (i == 0 or value[i - 1] != 0x5C):
            quoted = not quoted
        elif not quoted and c == 0x3C:
            angle += 1
        elif not quoted and c == 0x3E and angle:
            angle -= 1
        elif not quoted and not angle and c in (0x2C, 0x3B):
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def names(message: bytes) -> set[bytes]:
    """The header's field names, lowercased."""
    return {n for n, _ in fields(split(message)[0])}


def complete(message: bytes, from_addr: bytes, full_name: bytes, idhost: bytes,
             take_recipients: bool) -> tuple[bytes, list[bytes]]:
    """Add missing From:/Date:/Message-ID:; with take_recipients, collect To/Cc/Bcc
    and drop Bcc. Returns (new message, recipients found in the header). from_addr
    and idhost are used only for a missing From: and Message-ID: (b"" will do when
    names() has them)."""
    lines, rest = split(message)
    flds = fields(lines)
    names = {n for n, _ in flds}
    found: list[bytes] = []
    kept = []
    for name, raw in flds:
        if take_recipients and name in RECIPIENT_FIELDS:
            found += addresses(raw.split(b":", 1)[1])
            if len(found) > MAX_HEADER_RECIPIENTS:
                raise HeaderError("too many recipients in the header")
        if name == b"bcc":
            continue
        kept.append(raw)
    nl = b"\r\n" if lines and lines[0].endswith(b"\r\n") else b"\n"
    added = []
    if b"from" not in names:
        if full_name:
            added.append(b"From: " + _quote_name(full_name) + b" <" + from_addr + b">" + nl)
        else:
            added.append(b"From: " + from_addr + nl)
    if b"date" not in names:
        added.append(b"Date: " + rfc5322_date(local=True).encode() + nl)
    if b"message-id" not in names:
        added.append(b"Message-ID: <%d.%d.%s.qpy@%s>" % (
            time.time_ns(), posix.getpid(), posix.urandom(3).hex().encode(), idhost) + nl)
    if rest[:1] not in (b"\n", b"\r"):
        rest = nl + rest                           # no blank line: keep the body a body
    return b"".join(kept) + b"".join(added) + rest, found


def _quote_name(name: bytes) -> bytes:
    safe = bytes(c for c in name if c >= 0x20 and c != 0x7F)
    if all(c < 0x80 and (chr(c).isalnum() or c in b" .-_'") for c in safe):
        return safe
    return b'"' + safe.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
