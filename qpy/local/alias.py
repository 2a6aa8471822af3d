"""alias — the instructions that ROOT/users/aliases (from /etc/aliases) gives a
local part of the alias user, for qpy-local.

qpy-local asks here first when it delivers for the alias user (qpyalias, home
ROOT/alias): an entry in the table wins over that home's `.qmail-NAME` files,
so that the `.qmail-root` and `.qmail-postmaster` qpy-install writes do not
hide the host's /etc/aliases; a name with no entry goes on to them and to
`.qmail-default`. Items become qpy-local's instructions:

    &address   forward        \\name      forward (the entry's own name: the
    |command   program                    alias user's default delivery)
    /path      mbox, or Maildir when it ends in /
    :include:/path   that file's items, read now as the alias user (nesting
                     up to aliases.MAX_INCLUDE_DEPTH)

so every program and file delivery runs as the alias user, never as root.
An `owner-NAME` entry makes owner-NAME@DOMAIN the envelope sender of what
NAME forwards (a bounce then goes to the list's owner), unless the sender is
null. A name whose forwards lead back to it is refused by newaliases; a loop
through other hosts or .qmail files ends at qpy-local's Delivered-To: check.
"""

from __future__ import annotations

import os

from qpy.common import aliases
from qpy.local.dotqmail import parse, perm, temp

_tables: dict[str, aliases.Table] = {}      # per root; a worker serves many deliveries


def entry(root: str, home: str, ext: bytes) -> list[bytes] | None:
    """The table's items for the alias user's local part `ext`, or None."""
    if os.path.normpath(home) != os.path.join(root, "alias"):
        return None
    table = _tables.get(root)
    if table is None:
        table = _tables[root] = aliases.Table(root)
    try:
        return table.get(ext)
    except (OSError, aliases.AliasError) as e:
        raise temp(f"Unable to read the aliases table: {e}. (#4.3.0)")


def owner(root: str, ext: bytes) -> bool:
    """Whether an owner-EXT entry exists (its table was just read by entry())."""
    table = _tables.get(root)
    return bool(table and table.entries.get(b"owner-" + ext.lower()))


def lines(d) -> tuple[list[tuple[str, bytes]], bool, bytes] | None:
    """For qpy-local's Delivery d of the alias user: the entry's instructions, whether
    the default delivery is among them, and the envelope sender for forwards; None
    when the table has no entry (or d is not the alias user's)."""
    items = entry(d.root, d.home, d.ext)
    if items is None:
        return None
    out, used_default = instructions(items, d.ext, d.defaultdelivery)
    newsender = d.sender
    if d.sender not in (b"", b"#@[]") and owner(d.root, d.ext):
        newsender = b"owner-" + d.ext + b"@" + d.domain
    return out, used_default, newsender


def instructions(items: list[bytes], ext: bytes, defaultdelivery: bytes,
                 depth: int = 0) -> tuple[list[tuple[str, bytes]], bool]:
    """qpy-local's (kind, argument) lines for an entry's items, and whether the
    default delivery was used (a missing default Maildir may then be made)."""
    out: list[tuple[str, bytes]] = []
    used_default = False
    for it in items:
        kind = it[:1]
        if kind == b"&":
            out.append(("forward", it[1:]))
        elif kind == b"\\":
            if it[1:].lower() == ext.lower():
                out += parse(defaultdelivery)
                used_default = True
            else:
                out.append(("forward", it[1:]))
        elif kind == b"|":
            out.append(("program", it[1:]))
        elif kind == b"/":
            out.append(("maildir" if it.endswith(b"/") else "mbox", it))
        elif it.startswith(b":include:"):
            if depth >= aliases.MAX_INCLUDE_DEPTH:
                raise perm("Too many nested :include: files in the aliases. (#5.4.6)")
            path = it[len(b":include:"):]
            try:
                more = aliases.include(path)
            except OSError as e:
                raise temp(f"Unable to read {os.fsdecode(path)}: {e.strerror}. (#4.3.0)")
            except aliases.AliasError as e:
                raise temp(f"Malformed :include: file: {e}. (#4.3.0)")
            lines, dflt = instructions(more, ext, defaultdelivery, depth + 1)
            out += lines
            used_default = used_default or dflt
        else:
            raise temp("Malformed aliases table entry. (#4.3.0)")
    return out, used_default
