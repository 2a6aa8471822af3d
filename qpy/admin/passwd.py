"""qpy-passwd — set or remove an SMTP AUTH password.

SYNOPSIS
    qpy-passwd [ROOT] USER         new password read twice from standard input
    qpy-passwd [ROOT] -d USER      remove USER

    ROOT defaults to $QPY_ROOT, else /var/qpy. Standard input need not be a
    terminal: `printf 'pw\\npw\\n' | qpy-passwd alice` works (on a terminal
    the password is not echoed).

RUNS AS
    root, dropping at once to qpyauth (in a one-user root: that user).

READS / WRITES
    ROOT/auth/passwd (qpy.common.authdb): a salted scrypt hash per user,
    mode 0600 owned by qpyauth; replaced durably (temporary name, fsync,
    rename, fsync of the directory) under an flock of the directory, so two
    runs at once cannot lose each other's change. qpy-authd notices the new
    file by itself.

EXIT CODES
    0 done; 1 usage, bad user name, passwords differ or empty; 111 cannot
    read or write the file.
"""

from __future__ import annotations

import fcntl
import getpass
import os
import sys

from qpy.common import authdb
from qpy.common.durable import write_file
from qpy.common.exits import EXIT_TEMP
from qpy.common.privilege import preamble
from qpy.common.queue import root_from

PROGRAM = "qpy-passwd"
PASSWD_MODE = 0o600
EXIT_USAGE = 1


def _fail(code: int, text: str) -> int:
    sys.stderr.write("%s: %s\n" % (PROGRAM, text))
    return code


def _read_passwords() -> tuple[bytes, bytes]:
    if sys.stdin.isatty():
        return (getpass.getpass("New password: ").encode(),
                getpass.getpass("Again: ").encode())
    lines = sys.stdin.buffer.read(2 * authdb.MAX_PASSWORD + 8).split(b"\n")
    if len(lines) < 2:
        return b"", b"\0"
    return lines[0].rstrip(b"\r"), lines[1].rstrip(b"\r")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    delete = "-d" in args
    args = [a for a in args if a != "-d"]
    if len(args) not in (1, 2):
        return _fail(EXIT_USAGE, "usage: qpy-passwd [ROOT] [-d] USER")
    root = root_from(args[:1] if len(args) == 2 else None)
    user = args[-1].encode("utf-8", "surrogateescape")
    preamble(PROGRAM, root, "qpyauth")
    if not authdb.valid_user(user):
        return _fail(EXIT_USAGE, "bad user name (printable ASCII, no ':' or space)")
    if not delete:
        first, second = _read_passwords()
        if first != second:
            return _fail(EXIT_USAGE, "the two passwords differ")
        if not authdb.valid_password(first):
            return _fail(EXIT_USAGE, "empty or too long password")
        stored = authdb.make_hash(first)
    directory = authdb.passwd_dir(root)
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        return _fail(EXIT_TEMP, "cannot open %s: %s" % (directory, e.strerror))
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        try:
            with open(authdb.passwd_path(root), "rb") as f:
                table = authdb.parse_passwd(f.read(authdb.MAX_PASSWD_FILE))
        except FileNotFoundError:
            table = {}
        if delete:
            if table.pop(user, None) is None:
                return _fail(EXIT_USAGE, "no such user %s" % args[-1])
        else:
            table[user] = stored
        # durable replace: temp name, fsync, rename, fsync of auth/
        write_file(directory, "passwd", authdb.format_passwd(table), mode=PASSWD_MODE)
    except OSError as e:
        return _fail(EXIT_TEMP, "cannot update %s: %s" % (authdb.passwd_path(root), e.strerror))
    finally:
        os.close(dfd)
    sys.stdout.write("%s: %s %s\n" % (PROGRAM, "removed" if delete else "set password for",
                                      args[-1]))
    return 0
