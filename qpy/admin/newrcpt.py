"""qpy-newrcpt — build the table of local recipients that qpy-smtpd checks at RCPT.

SYNOPSIS
    qpy-newrcpt [ROOT]

RUNS AS
    root (it must list every user's home directory), or the owner of a one-user
    root. qpy-install runs it at the end of an install, qpy-start at start and
    on SIGHUP; run it by hand after changing users/assign, users or .qmail files.

READS
    ROOT/users/assign, the passwd database, the users' and the alias user's
    `.qmail-*` file names (never their contents), all through
    qpy.common.users.valid_locals, the same rules qpy-lspawn delivers by.

WRITES
    ROOT/users/recipients, mode 0640, owner root, group qpyd (qpyd cannot read
    homes; it reads this table), durably: temporary name, fsync, rename, fsync
    of the directory. Format (read by qpy.smtp.recipients):

        QPYRCPT1
        =LOCAL          an existing local part (lower case)
        +PREFIX         every local part that starts with PREFIX

    A home it cannot stat (other than a missing one: an NFS server down, a
    link loop) does not fail the table: a warning line names it, and all of that
    user's addresses (USER and USER-anything) are accepted at RCPT, since
    qpy-lspawn defers their delivery until the home can be looked at again;
    a flaky home never turns into a 550.

SECURITY
    Local parts with a control character or a newline are left out (they could
    not be one line of the table; qpy-smtpd refuses such addresses anyway).

EXIT CODES
    0 table written; 111 temporary failure (unreadable assign file, no qpyd
    user, write error), with the reason on stderr.
"""

from __future__ import annotations

import grp
import os
import pwd
import sys

from qpy.common import durable
from qpy.common.exits import EXIT_TEMP
from qpy.common.log import clean, log
from qpy.common.privilege import preamble, resolve_user
from qpy.common.queue import Paths, root_from
from qpy.common.users import UsersError, valid_locals

PROGRAM = "qpy-newrcpt"
TABLE_NAME = "recipients"
MAGIC = b"QPYRCPT1"
TABLE_MODE = 0o640


def _ok(local: bytes) -> bool:
    return all(0x20 < c != 0x7F for c in local)


def build(root: str) -> bytes:
    """The table's bytes for this root."""
    valid = valid_locals(root)
    for why in valid.unsure:
        log("warning: %s; all of that user's addresses are accepted, their "
            "delivery deferred until it can be" % clean(why))
    lines = [MAGIC]
    lines += sorted(b"=" + e for e in valid.exact if e and _ok(e))
    lines += sorted({b"+" + p for p in valid.prefixes if _ok(p)})
    return b"\n".join(lines) + b"\n"


def main() -> int:
    root = root_from(sys.argv[1:2] or None)
    preamble(PROGRAM, root, None)
    paths = Paths(root)
    try:
        data = build(root)
        group = resolve_user(root, "qpyd")
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            gid = pwd.getpwnam(group).pw_gid
        path = os.path.join(paths.users, TABLE_NAME)
        # Create it with group qpyd from the start (effective gid), so that no
        # reader ever sees the table in place but unreadable.
        old_gid = os.getegid()
        if os.getuid() == 0:
            os.setegid(gid)
        try:
            # durable: temp name, fsync, rename, fsync dir (qpy.common.durable)
            durable.write_file(paths.users, TABLE_NAME, data, TABLE_MODE)
        finally:
            if os.getuid() == 0:
                os.setegid(old_gid)
    except (UsersError, OSError, KeyError) as e:
        log("cannot build the recipient table: %s" % clean(str(e)))
        return EXIT_TEMP
    log("%d entries in %s" % (data.count(b"\n") - 1, path))
    return 0
