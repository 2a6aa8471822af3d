"""privilege — the one preamble every qpy entry point calls the same way.

    preamble("qpy-pickup", root, user="qpyq")

names the process (setproctitle), sets a strict umask, and drops to `user` when
started as root: supplementary groups, then gid, then uid, then a check that root
cannot be taken back. In a one-user root (installed by a plain user) every program
runs as that user and nothing changes. Started as someone else than root or the
one-user owner, a program that names a user refuses to run (exit 111).
"""

from __future__ import annotations

import grp
import os
import pwd
import sys

from qpy.common import log
from qpy.common.exits import EXIT_TEMP
from qpy.common.queue import Paths

UMASK = 0o027


class PrivilegeError(RuntimeError):
    pass


def set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # titles are a convenience; never fail delivery for one
        return
    setproctitle.setproctitle(title)


def user_ids(name: str) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary gids) of a system user."""
    pw = pwd.getpwnam(name)
    groups = sorted({pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem})
    return pw.pw_uid, pw.pw_gid, groups


def become(uid: int, gid: int, groups: list[int]) -> None:
    """Drop from root to uid/gid/groups for good, and prove it."""
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise PrivilegeError("could take root back after dropping it")


def resolve_user(root: str, user: str) -> str:
    """The real account a design user name maps to in this root."""
    return Paths(root).oneuser() or user


def preamble(program: str, root: str, user: str | None, title: str = "") -> None:
    """Name the process and its log lines, set the umask, and drop to `user`
    (None: keep root)."""
    set_title((program + " " + title).strip())
    log.name(program)
    os.umask(UMASK)
    if user is None:
        return
    target = resolve_user(root, user)
    try:
        uid, gid, groups = user_ids(target)
    except KeyError:
        sys.stderr.write("%s: no such user %s\n" % (program, target))
        raise SystemExit(EXIT_TEMP)
    if os.getuid() == 0 and uid != 0:
        become(uid, gid, groups)
    elif os.geteuid() != uid:
        sys.stderr.write("%s: must be started as root or as %s\n" % (program, target))
        raise SystemExit(EXIT_TEMP)
