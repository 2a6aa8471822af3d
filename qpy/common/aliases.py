"""aliases — /etc/aliases (aliases(5)) read, compiled and looked up, in one place.

The source, as sendmail and Postfix read it:

    # comment                      (a line whose first character is #)
    name: value, value, ...        name is matched without case; "quoted" allowed
        value, ...                 a line starting with blank continues the last one
    value: user | user@domain      a forward (a bare name is a local address)
           \\user                   that name as it is, not looked up again here
           |command                run by /bin/sh as the alias user (quote it when
                                   it holds a comma: "|cmd a, b")
           /path                   append to an mbox (a path ending in / is a Maildir)
           :include:/path          the values in that file, read at delivery
    owner-name: address            the envelope sender of mail expanded from `name`

`newaliases` (qpy-sendmail -bi) compiles it into ROOT/users/aliases:

    QPYALIASES1 LF, then one entry a line: name NUL item NUL item ... LF

where an item is `&address`, `\\name`, `|command`, `/path` or `:include:/path`.
compile() refuses a file with a malformed line or a loop among its names (a
name whose values lead back to it through bare names), so the table it
replaces stays. qpy-local consults the table, as the alias user, for the local
parts that no user owns (qpy.common.users: the alias user's), before that user's
.qmail files; see docs/system-mta.md.
"""

from __future__ import annotations

import os

from qpy.common import address

MAGIC = b"QPYALIASES1"
TABLE = os.path.join("users", "aliases")
SOURCE = "/etc/aliases"
MAX_BYTES = 16 * 1024 * 1024
MAX_NAME = 64
MAX_ITEM = 4096
MAX_INCLUDE_DEPTH = 5


class AliasError(ValueError):
    """A malformed source or table; str(e) says where and why."""


def _split_values(text: bytes) -> list[bytes]:
    """Comma-separated values; commas inside double quotes do not split."""
    out, cur, quoted = [], bytearray(), False
    for c in text:
        if c == 0x22:
            quoted = not quoted
        if c == 0x2C and not quoted:
            out.append(bytes(cur))
            cur = bytearray()
        else:
            cur.append(c)
    if quoted:
        raise AliasError("unbalanced quote")
    out.append(bytes(cur))
    return [v.strip() for v in out if v.strip()]


def item(value: bytes) -> bytes:
    """One value as a table item; raise AliasError when it is none of the kinds."""
    v = value
    if len(v) >= 2 and v[:1] == b'"' and v[-1:] == b'"':
        v = v[1:-1].strip()
    if not v or len(v) > MAX_ITEM or any(c < 0x20 and c != 0x09 or c == 0x7F for c in v):
        raise AliasError("empty, overlong or control characters in %r" % value[:60])
    if v[:1] in (b"|", b"/"):
        return v
    if v[:9].lower() == b":include:":
        path = v[9:].strip()
        if not path.startswith(b"/"):
            raise AliasError(":include: needs an absolute path")
        return b":include:" + path
    backslash = v[:1] == b"\\"
    try:
        addr = address.parse_mailbox(v[1:] if backslash else v.strip(b"<>"), utf8=True,
                                     need_domain=False)
    except address.AddressError as e:
        raise AliasError("bad address %r: %s" % (v[:60], e))
    return (b"\\" if backslash else b"&") + addr


def logical_lines(data: bytes) -> list[tuple[int, bytes]]:
    """(first line number, text) of each logical line: comments and blank lines out,
    continuation lines joined."""
    out: list[tuple[int, bytes]] = []
    for n, line in enumerate(data.split(b"\n"), 1):
        line = line.rstrip(b"\r")
        if not line.strip() or line.startswith(b"#"):
            continue
        if line[:1] in (b" ", b"\t"):
            if not out:
                raise AliasError("line %d: continuation without an entry" % n)
            out[-1] = (out[-1][0], out[-1][1] + b" " + line.strip())
        else:
            out.append((n, line))
    return out


def parse(data: bytes) -> tuple[dict[bytes, list[bytes]], list[str]]:
    """The entries of an aliases file (name lowercased -> items) and warnings.
    Raise AliasError naming the first malformed line."""
    if len(data) > MAX_BYTES:
        raise AliasError("larger than %d bytes" % MAX_BYTES)
    table: dict[bytes, list[bytes]] = {}
    warnings: list[str] = []
    for n, line in logical_lines(data):
        name, colon, values = line.partition(b":")
        name = name.strip().strip(b'"').lower()
        if not colon or not name or len(name) > MAX_NAME or \
                any(c <= 0x20 or c == 0x7F or c in b"@/\\:\"," for c in name):
            raise AliasError("line %d: not `name: value, ...`" % n)
        try:
            items = [item(v) for v in _split_values(values)]
        except AliasError as e:
            raise AliasError("line %d (%s): %s" % (n, name.decode(errors="replace"), e))
        if not items:
            raise AliasError("line %d (%s): no value" % (n, name.decode(errors="replace")))
        if name in table:
            warnings.append("line %d: %s listed again; the first entry is kept"
                            % (n, name.decode(errors="replace")))
            continue
        table[name] = items
    loop = find_loop(table)
    if loop:
        raise AliasError("alias loop: %s" % " -> ".join(x.decode(errors="replace")
                                                          for x in loop))
    return table, warnings


def find_loop(table: dict[bytes, list[bytes]]) -> list[bytes] | None:
    """A cycle of names through bare-name forwards (`a: b`, `b: a`), or None."""
    def next_names(name: bytes) -> list[bytes]:
        return [i[1:].lower() for i in table.get(name, [])
                if i[:1] == b"&" and b"@" not in i and i[1:].lower() in table]
    state: dict[bytes, int] = {}          # 1: on the current path, 2: no loop from it
    for start in table:
        if start in state:
            continue
        path, state[start] = [start], 1
        stack = [iter(next_names(start))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(next_names(nxt)))
    return None


def encode(table: dict[bytes, list[bytes]]) -> bytes:
    return MAGIC + b"\n" + b"".join(b"\0".join([name] + items) + b"\n"
                                   for name, items in sorted(table.items()))


def decode(data: bytes) -> dict[bytes, list[bytes]]:
    lines = data.split(b"\n")
    if lines[0] != MAGIC or lines[-1] != b"":
        raise AliasError("not a compiled aliases table")
    table = {}
    for ln in lines[1:-1]:
        fields = ln.split(b"\0")
        if len(fields) < 2 or not fields[0]:
            raise AliasError("malformed table entry")
        table[fields[0]] = fields[1:]
    return table


def include(path: bytes) -> list[bytes]:
    """The items of an :include: file (its values, one or more a line; # comments),
    read now, as whoever runs this (the alias user at delivery)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    with open(fd, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise AliasError("include file larger than %d bytes" % MAX_BYTES)
    out = []
    for n, line in enumerate(data.split(b"\n"), 1):
        if line.strip() and not line.lstrip().startswith(b"#"):
            try:
                out += [item(v) for v in _split_values(line.rstrip(b"\r"))]
            except AliasError as e:
                raise AliasError("%s line %d: %s" % (os.fsdecode(path), n, e))
    return out


class Table:
    """ROOT/users/aliases, re-read when it changes (one stat per lookup)."""

    def __init__(self, root: str):
        self.path = os.path.join(root, TABLE)
        self.entries: dict[bytes, list[bytes]] = {}
        self._stamp: tuple[int, int, int] | None = None

    def get(self, name: bytes) -> list[bytes] | None:
        """The items for local part `name` (any case); None when it has no entry.
        OSError or AliasError when the table exists but cannot be read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.entries, self._stamp = {}, None
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            with open(self.path, "rb") as f:
                data = f.read(MAX_BYTES * 2)
            self.entries, self._stamp = decode(data), stamp
        return self.entries.get(name.lower())
