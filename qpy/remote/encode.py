"""encode — the message as SMTP DATA, what the message needs of the peer, and its
conversion to 7 bits for a peer without 8BITMIME.

Used by qpy-remote and qpy-rspawn's workers (as `qpyr`); no program of its own.
The message is read from an open fd with pread (never a path: qpyr cannot open
queue/mess/), in CHUNK-sized pieces, as many times as a delivery needs; one of
at most CHUNK bytes is read once (scan() keeps it).

7-BIT CONVERSION (downgrade)
    As Postfix does for a peer that offers neither 8BITMIME nor SMTPUTF8: the
    MIME structure is walked (multipart/* by its boundary, message/rfc822 into
    the message), and every leaf part whose body has 8-bit bytes, or a line
    over 998 bytes, and whose Content-Transfer-Encoding is absent, 7bit, 8bit or
    binary, is re-encoded as quoted-printable (lines of at most 76 bytes; a bare
    CR or any control byte as =XX, so binary-ish text decodes to what it was):
    its Content-Transfer-Encoding field is replaced (or added, with MIME-Version
    on a message that has none). A multipart or message/rfc822 labelled 8bit or
    binary is relabelled 7bit (a 7-bit peer must not get an 8bit label; one
    labelled base64 or quoted-printable cannot be converted, RFC 2045 6.4).
    Nothing else changes: headers, other parts,
    boundaries, preamble and epilogue are copied byte for byte (line ends
    become LF, as DATA makes them CRLF anyway). What cannot be converted raises
    CannotConvert: 8-bit bytes in a header (that needs SMTPUTF8), in a
    multipart's preamble or epilogue, in a part already declared base64 or
    quoted-printable, a multipart without a usable boundary, nesting deeper
    than MAX_DEPTH, a message larger than MAX_CONVERT.
"""

from __future__ import annotations

import binascii
import os
import re
from collections.abc import Iterator

CHUNK = 64 * 1024
MAX_CONVERT = 32 * 1024 * 1024  # bytes of a message converted in memory, at most
MAX_DEPTH = 20                  # nested multiparts and messages
MAX_LINE = 998                  # RFC 5321 4.5.3.1.6, without the CRLF


def scan(fd: int) -> tuple[int, bool, bool, bytes | None]:
    """(size, 8-bit bytes in the header, 8-bit bytes in the body, the message itself
    when it came in one read of at most CHUNK bytes, else None: read it again with
    chunks())."""
    size = os.fstat(fd).st_size
    off, head8, body8, in_head, tail = 0, False, False, True, b""
    whole: bytes | None = None
    while True:
        chunk = os.pread(fd, CHUNK, off)
        if not chunk:
            break
        whole = chunk if off == 0 else None
        off += len(chunk)
        if in_head:
            data = tail + chunk
            end = min((i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i != -1),
                      default=-1)
            if end == -1:
                head8 = head8 or not data.isascii()
                tail = data[-2:]
            else:
                head8 = head8 or not data[:end].isascii()
                body8 = not data[end:].isascii()
                in_head = False
        elif not body8:
            body8 = not chunk.isascii()
        if len(chunk) < CHUNK and off >= size:
            break       # a short read up to the size fstat gave: the end (no read for "")
    return max(size, off), head8, body8, whole


def chunks(fd: int) -> Iterator[bytes]:
    """The message on `fd`, from its start, in CHUNK-sized pieces."""
    off = 0
    while True:
        chunk = os.pread(fd, CHUNK, off)
        if not chunk:
            return
        off += len(chunk)
        yield chunk


def smtp_data(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """The message as DATA: CRLF line ends, dot-stuffed, ending with CRLF . CRLF."""
    carry, at_start = b"", True
    for chunk in pieces:
        data = carry + chunk
        carry = b""
        if data.endswith(b"\r"):        # maybe half of a CRLF: decide with the next chunk
            data, carry = data[:-1], b"\r"
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not data:
            continue
        if at_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\n.", b"\n..")
        at_start = data.endswith(b"\n")
        yield data.replace(b"\n", b"\r\n")
    if carry:
        at_start = True
        yield b"\r\n"
    yield b".\r\n" if at_start else b"\r\n.\r\n"


class CannotConvert(ValueError):
    """The message cannot be sent in 7 bits; why."""


def _header_fields(header: bytes) -> list[bytes]:
    """The header's fields, each with its continuation lines (LF line ends)."""
    fields: list[bytes] = []
    for line in header.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\n" + line
        elif line:
            fields.append(line)
    return fields


def _field(fields: list[bytes], name: bytes) -> bytes | None:
    """The unfolded value of the first field `name` (case-insensitive)."""
    for f in fields:
        key, sep, value = f.partition(b":")
        if sep and key.strip().lower() == name:
            return b" ".join(value.split())
    return None


_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.I)


def _split(entity: bytes) -> tuple[bytes, bytes]:
    """(header with its final LF, body) of an entity with LF line ends."""
    if entity.startswith(b"\n"):
        return b"", entity[1:]
    end = entity.find(b"\n\n")
    if end == -1:
        return entity if entity.endswith(b"\n") else entity + b"\n", b""
    return entity[:end + 1], entity[end + 2:]


def _needs(body: bytes) -> bool:
    return not body.isascii() or any(len(ln) > MAX_LINE for ln in body.split(b"\n"))


def _entity(entity: bytes, depth: int, top: bool) -> bytes:
    if depth > MAX_DEPTH:
        raise CannotConvert("MIME nesting deeper than %d" % MAX_DEPTH)
    header, body = _split(entity)
    if not header.isascii():
        raise CannotConvert("8-bit bytes in a header (that needs SMTPUTF8)")
    if not _needs(body):
        return entity
    fields = _header_fields(header)
    ctype = (_field(fields, b"content-type") or b"text/plain").lower()
    cte = (_field(fields, b"content-transfer-encoding") or b"7bit").lower()
    if ctype.startswith((b"multipart/", b"message/rfc822")):
        if cte not in (b"7bit", b"8bit", b"binary"):
            raise CannotConvert("8-bit bytes in a composite part declared %s"
                                % cte.decode("ascii", "replace"))
        if cte != b"7bit":
            header = _relabel(fields, b"7bit")
        if ctype.startswith(b"message/rfc822"):
            return header + b"\n" + _entity(body, depth + 1, False)
        m = _BOUNDARY.search(_field(fields, b"content-type") or b"")
        if m is None:
            raise CannotConvert("a multipart without a boundary")
        return header + b"\n" + _multipart(body, m.group(1) or m.group(2), depth)
    if cte not in (b"7bit", b"8bit", b"binary"):
        raise CannotConvert("8-bit bytes in a part declared %s" % cte.decode("ascii", "replace"))
    # line by line, not istext: that would leave a bare CR, which DATA makes a line end
    qp = b"\n".join(binascii.b2a_qp(ln, quotetabs=False, istext=False, header=False)
                    for ln in body.split(b"\n"))
    mime = not top or _field(fields, b"mime-version") is not None
    return _relabel(fields, b"quoted-printable", mime) + b"\n" + qp


def _relabel(fields: list[bytes], cte: bytes, mime: bool = True) -> bytes:
    """The header with its Content-Transfer-Encoding fields replaced by one saying
    cte (after a MIME-Version field when `mime` is False: the message had none)."""
    kept = [f for f in fields if f.partition(b":")[0].strip().lower()
            != b"content-transfer-encoding"]
    if not mime:
        kept.append(b"MIME-Version: 1.0")
    return b"\n".join(kept + [b"Content-Transfer-Encoding: " + cte]) + b"\n"


def _multipart(body: bytes, boundary: bytes, depth: int) -> bytes:
    """The multipart body with each part converted; its delimiters untouched."""
    delim = b"--" + boundary
    lines = body.split(b"\n")
    out: list[bytes] = []
    part: list[bytes] | None = None     # None: in the preamble or the epilogue
    closed = False
    for line in lines:
        bare = line.rstrip(b" \t")
        if not closed and bare in (delim, delim + b"--"):
            if part is not None:
                out.append(_entity(b"\n".join(part), depth + 1, False))
            out.append(line)
            closed = bare == delim + b"--"
            part = None if closed else []
            continue
        if part is None:
            if _needs(line):
                raise CannotConvert("8-bit bytes in a multipart's preamble or epilogue")
            out.append(line)
        else:
            part.append(line)
    if part is not None:                # no closing delimiter: the last part ends here
        out.append(_entity(b"\n".join(part), depth + 1, False))
    return b"\n".join(out)


def downgrade(fd: int, size: int) -> bytes:
    """The message on `fd` converted to 7 bits (see 7-BIT CONVERSION), LF line ends."""
    if size > MAX_CONVERT:
        raise CannotConvert("larger than %d bytes, too large to convert" % MAX_CONVERT)
    data = b"".join(chunks(fd)).replace(b"\r\n", b"\n")
    return _entity(data, 0, True)
