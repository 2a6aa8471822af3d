"""systemmta — qpy as the host's MTA: /usr/sbin/sendmail and friends as launchers.

qpy-install ROOT --system-mta [--system-prefix DIR] writes, under DIR (default /):

    usr/sbin/sendmail, usr/lib/sendmail   exec qpy-sendmail "$@"
    usr/bin/mailq                         exec qpy-sendmail -bp "$@"
    usr/bin/newaliases                    exec qpy-sendmail -bi "$@"

each a four-line /bin/sh script that sets QPY_ROOT=ROOT and execs the program by
its absolute path: a symlink would lose the root (every caller would get
/var/qpy) and the program's own directory. What was there is renamed to
NAME.qpy-saved first (once: a second run leaves the saved file alone), and
--remove-system-mta puts it back. On Debian, with DIR /, nothing is done while
a package (postfix, exim4, ...) owns one of those paths (dpkg -S): qpy-install
says which and how to remove it, and exits 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from qpy.common import durable

TARGETS = (("usr/sbin/sendmail", ""), ("usr/lib/sendmail", ""),
           ("usr/bin/mailq", "-bp "), ("usr/bin/newaliases", "-bi "))
MARK = "# qpy launcher (qpy-install --system-mta)"
SAVED = ".qpy-saved"


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def launcher(root: str, bindir: str, flags: str) -> bytes:
    return ("#!/bin/sh\n%s\nQPY_ROOT=%s; export QPY_ROOT\nexec %s %s\"$@\"\n"
            % (MARK, _quote(root), _quote(os.path.join(bindir, "qpy-sendmail")), flags)
            ).encode("utf-8", "surrogateescape")


def _ours(path: str) -> bool:
    """Whether path is a launcher we wrote (a symlink never is: /usr/lib/sendmail is
    often one to /usr/sbin/sendmail, which may already be ours)."""
    if os.path.islink(path):
        return False
    try:
        with open(path, "rb") as f:
            return MARK.encode() in f.read(4096)
    except OSError:
        return False


def owners(prefix: str) -> list[tuple[str, str]]:
    """(path, Debian package) for each target a package owns; only for prefix /."""
    if os.path.realpath(prefix) != "/" or not shutil.which("dpkg"):
        return []
    out = []
    for rel, _ in TARGETS:
        path = "/" + rel
        if not os.path.lexists(path) or _ours(path):
            continue
        r = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
        if r.returncode == 0 and ":" in r.stdout:
            out.append((path, r.stdout.split(":", 1)[0].strip()))
    return out


def install(root: str, bindir: str, prefix: str) -> int:
    taken = owners(prefix)
    if taken:
        pkgs = sorted({p for _, p in taken})
        for path, pkg in taken:
            sys.stderr.write("qpy-install: %s belongs to the Debian package %s\n" % (path, pkg))
        sys.stderr.write("qpy-install: not installing qpy as the system MTA while %s is "
                         "installed; remove it first (apt-get remove %s, which keeps its "
                         "configuration), then run this again\n"
                         % (" and ".join(pkgs), " ".join(pkgs)))
        return 1
    for rel, flags in TARGETS:
        path = os.path.join(prefix, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path) and not _ours(path) and not os.path.lexists(path + SAVED):
            os.rename(path, path + SAVED)
        # durable: written to a temporary, fsync'd, renamed into place, directory fsync'd
        durable.write_file(os.path.dirname(path), os.path.basename(path),
                           launcher(root, bindir, flags), 0o755)
        print("qpy-install: %s runs qpy-sendmail %son %s" % (path, flags, root))
    return 0


def remove(prefix: str) -> int:
    for rel, _ in TARGETS:
        path = os.path.join(prefix, rel)
        if os.path.lexists(path) and _ours(path):
            os.unlink(path)
        if os.path.lexists(path + SAVED) and not os.path.lexists(path):
            os.rename(path + SAVED, path)
            print("qpy-install: %s restored" % path)
        if os.path.isdir(os.path.dirname(path)):
            durable.fsync_dir(os.path.dirname(path))     # durable: the renames back
    return 0
