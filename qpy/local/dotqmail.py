"""dotqmail — find and parse the `.qmail` file that governs one local address (dot-qmail(5)).

Which file: for dash D and extension EXT (from qpy.common.users), with
SAFE = EXT lowercased and every `.` and `/` turned into `:` (no path tricks):

    .qmailD SAFE                 e.g. .qmail-list-info
    .qmailD SAFE-up-to-a-dash-default, longest first
                                 e.g. .qmail-list-default
    .qmailD default              e.g. .qmail-default        (only when D is "-")

The first that exists as a regular file wins (anything else counts as absent).
It must be owned by the user (or root, as an admin's files in the alias home)
and not writable by group or others: otherwise the delivery is deferred, never
run on someone else's instructions (a symlink to another user's file is refused
this way). A `.qmail` larger than MAX_DOTQMAIL_BYTES or with more than
MAX_INSTRUCTIONS instructions is deferred too.

Lines (trailing blanks removed; the first line must not be blank; later blank
lines are skipped):
    #text        comment
    |command     program, run by /bin/sh -c
    /path, ./path ending in /     Maildir
    /path, ./path                 mbox
    &address, or any other line   forward
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from qpy.common.exits import EXIT_PERM, EXIT_TEMP

MAX_DOTQMAIL_BYTES = 256 * 1024
MAX_LINE = 4096
MAX_INSTRUCTIONS = 1000



class Failure(Exception):
    """A delivery that cannot go on: code 100 (bounce) or 111 (retry), with qmail-style text."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code
        self.text = text


def temp(text: str) -> Failure:
    return Failure(EXIT_TEMP, text)


def perm(text: str) -> Failure:
    return Failure(EXIT_PERM, text)


@dataclass
class Found:
    name: bytes            # the file name used, e.g. b".qmail-list-default"
    data: bytes
    default: bytes | None  # the part of ext matched by `default`, when a -default file won
    forward_only: bool     # owner-execute bit set: only forwards allowed


def safe_ext(ext: bytes) -> bytes:
    return ext.lower().replace(b".", b":").replace(b"/", b":")


def candidates(dash: bytes, ext: bytes) -> list[tuple[bytes, bytes | None]]:
    """(file name, DEFAULT value or None) in search order."""
    safe = safe_ext(ext)
    out: list[tuple[bytes, bytes | None]] = [(b".qmail" + dash + safe, None)]
    if dash:
        i = len(safe)
        while True:
            i = safe.rfind(b"-", 0, i)
            if i < 0:
                break
            out.append((b".qmail" + dash + safe[:i] + b"-default", ext[i + 1:]))
        out.append((b".qmail" + dash + b"default", ext))
    return out


def open_checked(homefd: int, name: bytes, uid: int) -> tuple[bytes, os.stat_result] | None:
    """Read home/name if it is a usable .qmail file; None when absent."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=homefd)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise temp(f"Unable to open {name.decode(errors='replace')}: {e.strerror}. (#4.2.1)")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        shown = name.decode(errors="replace")
        if st.st_uid not in (uid, 0):
            raise temp(f"Uh-oh: {shown} is not owned by the user. (#4.7.0)")
        if st.st_mode & 0o022:
            raise temp(f"Uh-oh: {shown} is writable by group or others. (#4.7.0)")
        if st.st_size > MAX_DOTQMAIL_BYTES:
            raise temp(f"{shown} is larger than {MAX_DOTQMAIL_BYTES} bytes. (#4.2.1)")
        data = b""
        while len(data) <= MAX_DOTQMAIL_BYTES:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
        if len(data) > MAX_DOTQMAIL_BYTES:
            raise temp(f"{shown} is larger than {MAX_DOTQMAIL_BYTES} bytes. (#4.2.1)")
        return data, st
    except OSError as e:
        raise temp(f"Unable to read .qmail file: {e.strerror}. (#4.2.1)")
    finally:
        os.close(fd)


def find(homefd: int, dash: bytes, ext: bytes, uid: int) -> Found | None:
    for name, default in candidates(dash, ext):
        got = open_checked(homefd, name, uid)
        if got is not None:
            data, st = got
            return Found(name, data, default, bool(st.st_mode & stat.S_IXUSR))
    return None


def exists(homefd: int, name: bytes) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=homefd).st_mode)
    except OSError:
        return False


def parse(data: bytes) -> list[tuple[str, bytes]]:
    """[(kind, argument)] with kind in program, maildir, mbox, forward. Raises Failure."""
    out: list[tuple[str, bytes]] = []
    for n, raw in enumerate(data.split(b"\n")):
        line = raw.rstrip(b" \t\r")
        if len(line) > MAX_LINE:
            raise temp(f"line {n + 1} of .qmail file is longer than {MAX_LINE} bytes. (#4.2.1)")
        if not line:
            if n == 0 and data.strip():
                raise temp("first line of .qmail file is blank. (#4.2.1)")
            continue
        if b"\0" in line:
            raise temp(f"line {n + 1} of .qmail file contains a NUL byte. (#4.2.1)")
        c = line[:1]
        if c == b"#":
            continue
        if c == b"|":
            out.append(("program", line[1:]))
        elif c in (b"/", b"."):
            out.append(("maildir" if line.endswith(b"/") else "mbox", line))
        elif c == b"&":
            out.append(("forward", line[1:]))
        else:
            out.append(("forward", line))
        if len(out) > MAX_INSTRUCTIONS:
            raise temp(f".qmail file has more than {MAX_INSTRUCTIONS} instructions. (#4.2.1)")
    return out
