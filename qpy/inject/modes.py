"""modes — qpy-sendmail's modes other than -bm (see qpy.inject.sendmail's page).

Each either runs another qpy program (found beside the real qpy-sendmail, so
that a `mailq` symlink elsewhere still finds it) or does its small job here:
-bi compiles the aliases file (qpy.common.aliases), -bv classifies addresses.
Imported only for these modes: the per-message path stays light.
"""

from __future__ import annotations

import os
import sys

from qpy.common import address, aliases, durable
from qpy.common.control import Control
from qpy.common.queue import Paths, root_from
from qpy.inject.front import SYSEXITS

BINDIR = os.path.dirname(os.path.realpath(sys.argv[0])) if sys.argv and sys.argv[0] else ""


def _fail(code: str, text: str) -> int:
    sys.stderr.write("qpy-sendmail: %s\n" % text)
    return SYSEXITS[code]


def _run(name: str, *args: str) -> int:
    path = os.path.join(BINDIR, name)
    try:
        return os.spawnv(os.P_WAIT, path, [path, *args])
    except OSError as e:
        return _fail("temp", "cannot run %s: %s" % (path, e.strerror))


def _exec(name: str, *args: str, env: dict[str, str] | None = None) -> int:
    path = os.path.join(BINDIR, name)
    try:
        if env is None:
            os.execv(path, [path, *args])
        os.execve(path, [path, *args], env)
    except OSError as e:
        return _fail("temp", "cannot run %s: %s" % (path, e.strerror))
    return 0  # not reached


def run(cmd) -> int:
    root = root_from()
    if cmd.mode in ("p", "P"):
        rc = _run("qpy-qstat", root)
        if rc != 0 or cmd.mode == "P":
            return rc
        sys.stdout.flush()
        return _exec("qpy-qread", root)
    if cmd.mode == "q":
        return _exec("qpy-qretry", root)
    if cmd.mode == "s":
        # the caller is local: it may relay, as any local program may run sendmail
        env = {"QPY_ROOT": root, "RELAYCLIENT": "", "PATH": "/usr/bin:/bin",
               "TCPREMOTEHOST": "localhost"}
        return _exec("qpy-smtpd", "--as-caller", env=env)
    if cmd.mode == "i":
        return newaliases(root, cmd.alias_file)
    if cmd.mode == "v":
        return verify(root, cmd.operands)
    return _fail("usage", "mode -b%s is not handled" % cmd.mode)


def newaliases(root: str, source: str) -> int:
    """Compile source into ROOT/users/aliases, atomically; then qpy-newrcpt."""
    try:
        with open(source, "rb") as f:
            data = f.read(aliases.MAX_BYTES + 1)
    except OSError as e:
        return _fail("temp" if e.errno not in (2, 13) else "data",
                     "cannot read %s: %s" % (source, e.strerror))
    try:
        table, warnings = aliases.parse(data)
    except aliases.AliasError as e:
        return _fail("data", "%s: %s (the table was not changed)" % (source, e))
    for w in warnings:
        sys.stderr.write("qpy-sendmail: warning: %s: %s\n" % (source, w))
    users = Paths(root).users
    try:
        # durable: written to a temporary, fsync'd, renamed over the old table and the
        # directory fsync'd: a crash leaves the old table or the new one, never a mix
        durable.write_file(users, os.path.basename(aliases.TABLE), aliases.encode(table),
                           0o644)
    except OSError as e:
        return _fail("temp", "cannot write %s: %s" % (os.path.join(root, aliases.TABLE),
                                                       e.strerror))
    print("%s: %d aliases" % (os.path.join(root, aliases.TABLE), len(table)))
    sys.stdout.flush()
    if _run("qpy-newrcpt", root) != 0:   # so that SMTP accepts the names
        return _fail("temp", "qpy-newrcpt failed: the SMTP recipient table is stale")
    return 0


def verify(root: str, operands: list[bytes]) -> int:
    """-bv: say for each address where it would go; nothing is sent."""
    from qpy.common import users  # dataclasses: fine here, not on the -bm path
    if not operands:
        return _fail("usage", "-bv needs addresses")
    ctl = Control(root)
    me = ctl.line("defaulthost").encode()
    locals_ = {d.strip().lower().encode() for d in ctl.lines("locals")}
    table = aliases.Table(root)
    bad = 0
    for op in operands:
        shown = op.decode("utf-8", "replace")
        try:
            addr = address.parse_mailbox(op.strip(b"<>"), utf8=True, need_domain=False)
        except address.AddressError as e:
            print("%s... undeliverable: bad address: %s" % (shown, e))
            bad += 1
            continue
        local, domain = address.split(addr)
        domain = (domain or me).lower()
        if domain not in locals_:
            print("%s... deliverable: remote, to %s by SMTP (not checked)"
                  % (shown, domain.decode("utf-8", "replace")))
            continue
        try:
            who = users.lookup(root, local)
            entry = table.get(local) if who.home == Paths(root).alias else None
        except (users.UsersError, OSError, aliases.AliasError) as e:
            print("%s... undeliverable now: %s" % (shown, e))
            bad += 1
            continue
        if who.home != Paths(root).alias:
            print("%s... deliverable: local user %s" % (shown, who.user))
        elif entry:
            print("%s... deliverable: alias to %s" % (shown, ", ".join(
                i.decode("utf-8", "replace").lstrip("&") for i in entry)))
        elif _alias_qmail(root, who.ext):
            print("%s... deliverable: the alias user's .qmail" % shown)
        else:
            print("%s... undeliverable: no user, alias or .qmail file by that name" % shown)
            bad += 1
    return SYSEXITS["nouser"] if bad else 0


def _alias_qmail(root: str, ext: bytes) -> bool:
    """Whether a .qmail file in the alias home takes `ext` (True when the home
    cannot be read by the caller: then only the delivery can tell)."""
    try:
        names = set(os.listdir(os.fsencode(Paths(root).alias)))
    except OSError:
        return True
    safe = ext.lower().replace(b".", b":")
    parts = safe.split(b"-")
    wanted = {b".qmail-" + safe} | {b".qmail-" + b"-".join(parts[:i] + [b"default"])
                                    for i in range(len(parts))}
    return bool(names & wanted)
