"""qpy-install — lay out a qpy root, or check one.

SYNOPSIS
    qpy-install ROOT [--me HOST] [--smtp ADDR:PORT] [--supervise DIR]
    qpy-install --check ROOT
    qpy-install ROOT --system-mta [--system-prefix DIR]
    qpy-install --remove-system-mta [--system-prefix DIR]

RUNS AS
    root: creates the system users and groups qpyd qpyq qpys qpyr qpyl qpyalias
    qpyauth (no login shell) when missing, and a root owned as queue-layout says.
    any other user: a one-user root (ROOT/oneuser names the user); every program
    run on it later runs as that user.

READS
    PREFIX/share/queue-layout/layout (owners, groups and modes, as data).

WRITES
    ROOT/ and what the layout lists; control/ defaults (me, locals, rcpthosts,
    defaultdelivery, smtprules, smtplisten with --smtp); users/assign; alias/
    with .qmail-postmaster, .qmail-mailer-daemon, .qmail-root and a Maildir.
    Only what is missing is created: on a live root nothing that exists changes
    and queued mail is never touched. Then qpy-newrcpt ROOT builds the
    recipient table, and --supervise writes filled-in service files.

    --system-mta (after the above) installs /usr/sbin/sendmail, /usr/lib/sendmail,
    /usr/bin/mailq and /usr/bin/newaliases (under --system-prefix DIR, default /)
    as launchers bound to ROOT, moving aside what is there (NAME.qpy-saved);
    on Debian it refuses (exit 1) while a package such as postfix or exim4 owns
    those paths, and says how to remove it. --remove-system-mta puts back what
    was moved aside (qpy.admin.systemmta; docs/system-mta.md).

    --check compares ROOT with the layout and prints every difference (missing,
    wrong type, owner, group, mode), one a line; exit 1 if there is any. It also
    checks the secret control files when they exist: control/smtpauth (SMTP
    AUTH passwords for qpy-remote) must be a plain file of qpyr's, mode 0400.

SECURITY
    Run as root on a live root, it works inside directories other users own
    (queue/ is qpyq's, alias/ qpyalias's, auth/ qpyauth's), where they could
    plant a symbolic link in place of a directory or a file. So every path
    under ROOT is reached from an open descriptor of ROOT, one component at a
    time with O_NOFOLLOW; directories are made with mkdir at a descriptor and
    files under a temporary name with O_EXCL, linked into place (link never
    replaces a name); owner and mode are set on the open descriptor. A symbolic
    link (or anything else) where a directory is expected stops the install
    with the path named (exit 111): nothing is created through it.

EXIT CODES
    0 done (or no difference); 1 differences found; 2 usage; 111 failure.
"""

from __future__ import annotations

import argparse
import errno
import grp
import os
import pwd
import stat
import subprocess
import sys

from qpy.common import control as controlmod
from qpy.common import durable
from qpy.common.paths import BINDIR, program

SYSTEM_USERS = ("qpyd", "qpyq", "qpys", "qpyr", "qpyl", "qpyalias", "qpyauth")
NOLOGIN = "/usr/sbin/nologin"
LAYOUT = os.path.join(BINDIR, "..", "share", "queue-layout", "layout")
CONTROL_MODE = 0o644
ALIAS_QMAIL = ("postmaster", "mailer-daemon", "root")

ASSIGN_TEXT = b"""\
# users/assign, as qmail-users(5): one entry a line, then a line with a single dot.
#   =local:user:uid:gid:home:dash:ext:      mail for exactly `local`
#   +prefix:user:uid:gid:home:dash:pre:     mail for every local part starting `prefix`
# Addresses not listed here go to the user named by the longest part of the local
# part that ends at its end or before a dash (the passwd database), and the rest to
# the alias user. Run qpy-newrcpt after a change.
.
"""

SMTPRULES_TEXT = b"""\
# Client rules for the SMTP listener, tcprules syntax; the first match wins.
127.:allow,RELAYCLIENT=""
::1:allow,RELAYCLIENT=""
:allow
"""


class Entry:
    def __init__(self, path: str, kind: str, owner: str, group: str, mode: int):
        self.path, self.kind, self.owner, self.group, self.mode = path, kind, owner, group, mode


def read_layout(path: str = LAYOUT) -> list[Entry]:
    entries = []
    with open(path, encoding="ascii") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 5 or fields[1] not in ("d", "f"):
                raise ValueError("%s:%d: bad layout line" % (path, n))
            entries.append(Entry(fields[0], fields[1], fields[2], fields[3], int(fields[4], 8)))
    return entries


def ensure_users() -> None:
    """Create the system groups and users that are missing (root only)."""
    for name in SYSTEM_USERS:
        try:
            grp.getgrnam(name)
        except KeyError:
            subprocess.run(["groupadd", "--system", name], check=True)
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                            "/nonexistent", "--shell", NOLOGIN, "--gid", name, name],
                           check=True)


class Ids:
    """Owner and group names of the layout, mapped to numbers for this root."""

    def __init__(self, oneuser: str | None):
        self.oneuser = oneuser

    def uid(self, name: str) -> int:
        if self.oneuser:
            return pwd.getpwnam(self.oneuser).pw_uid
        return pwd.getpwnam(name).pw_uid

    def gid(self, name: str) -> int:
        if self.oneuser:
            return pwd.getpwnam(self.oneuser).pw_gid
        return grp.getgrnam(name).gr_gid


def apply_layout(root_fd: int, entries: list[Entry], ids: Ids) -> None:
    for e in entries:
        parent, name = os.path.split(os.path.normpath(e.path))
        if name in ("", "."):
            continue                      # the root itself: made by install()
        pfd = open_under(root_fd, parent)
        try:
            uid, gid = ids.uid(e.owner), ids.gid(e.group)
            if e.kind == "d":
                make_dir(pfd, name, e.mode, uid, gid)
            else:
                make_file(pfd, name, b"", e.mode, uid, gid)
        finally:
            os.close(pfd)


def check_layout(root: str, entries: list[Entry], ids: Ids) -> list[str]:
    problems = []
    for e in entries:
        path = os.path.normpath(os.path.join(root, e.path))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            problems.append("%s: missing (want %s %s:%s %04o)"
                            % (path, "directory" if e.kind == "d" else "file",
                               e.owner, e.group, e.mode))
            continue
        want_type = stat.S_ISDIR if e.kind == "d" else stat.S_ISREG
        if not want_type(st.st_mode):
            problems.append("%s: wrong type (want %s)"
                            % (path, "directory" if e.kind == "d" else "plain file"))
            continue
        try:
            uid, gid = ids.uid(e.owner), ids.gid(e.group)
        except KeyError as err:
            problems.append("%s: no such user or group %s" % (path, err))
            continue
        if st.st_uid != uid:
            problems.append("%s: owner uid %d, want %s (%d)" % (path, st.st_uid, e.owner, uid))
        if st.st_gid != gid:
            problems.append("%s: group gid %d, want %s (%d)" % (path, st.st_gid, e.group, gid))
        mode = stat.S_IMODE(st.st_mode)
        if mode != e.mode:
            problems.append("%s: mode %04o, want %04o" % (path, mode, e.mode))
    return problems


SECRETS = (("control/smtpauth", "qpyr", 0o400),)


def check_secrets(root: str, ids: Ids) -> list[str]:
    """The optional files that hold secrets: owner and mode, when they exist."""
    problems = []
    for rel, owner, mode in SECRETS:
        path = os.path.join(root, rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append("%s: wrong type (want plain file)" % path)
            continue
        if st.st_uid != ids.uid(owner):
            problems.append("%s: owner uid %d, want %s (%d)" % (path, st.st_uid, owner,
                                                                 ids.uid(owner)))
        if stat.S_IMODE(st.st_mode) != mode:
            problems.append("%s: mode %04o, want %04o" % (path, stat.S_IMODE(st.st_mode), mode))
    return problems


# Run as root on a live root, qpy-install works inside directories other users own
# (queue/ is qpyq's, alias/ qpyalias's): they could plant a symbolic link where it
# expects a directory or a file. So it works relative to opened directories, never
# follows a link (O_NOFOLLOW at every step), creates with O_EXCL and sets owner and
# mode on the open descriptor.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def open_under(dfd: int, rel: str) -> int:
    """Directory `rel` under the open directory dfd, one component at a time."""
    fd = os.dup(dfd)
    for part in rel.split("/"):
        if part in ("", "."):
            continue
        try:
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise OSError(e.errno, "%s: not a directory (a symbolic link is never "
                              "followed)" % rel)
            raise
        finally:
            os.close(fd)
        fd = nfd
    return fd


def make_dir(dfd: int, name: str, mode: int, uid: int, gid: int) -> None:
    """Create directory name in dfd unless something has that name."""
    try:
        os.mkdir(name, 0o700, dir_fd=dfd)
    except FileExistsError:
        return                            # never change what exists
    fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
    try:
        if os.fstat(fd).st_uid != os.geteuid():   # swapped for another's meanwhile
            raise OSError(errno.EEXIST, "%s: replaced while being made" % name)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)               # after chown: chown clears setgid bits
    finally:
        os.close(fd)


def make_file(dfd: int, name: str, data: bytes, mode: int, uid: int = -1,
              gid: int = -1) -> None:
    """Create file name in dfd with data unless something has that name."""
    try:
        os.lstat(name, dir_fd=dfd)
        return                            # never change what exists
    except FileNotFoundError:
        pass
    tmp = ".tmp.%s.%d" % (name, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                 dir_fd=dfd)
    try:
        try:
            durable.write_all(fd, data)
            if uid != -1:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        # durable: the file was fsync'd; link() never replaces a name that appeared
        # meanwhile (rename would), then the directory is fsync'd
        os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
    except FileExistsError:
        pass
    finally:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except FileNotFoundError:
            pass
    os.fsync(dfd)


def write_defaults(root_fd: int, me: str, smtp: str | None, ids: Ids) -> None:
    line = (me + "\n").encode("ascii")
    ctl = open_under(root_fd, "control")
    try:
        for name in ("me", "locals", "rcpthosts"):
            make_file(ctl, name, line, CONTROL_MODE)
        make_file(ctl, "defaultdelivery", b"./Maildir/\n", CONTROL_MODE)
        make_file(ctl, "smtprules", SMTPRULES_TEXT, CONTROL_MODE)
        if smtp:
            make_file(ctl, "smtplisten", (smtp + "\n").encode("ascii"), CONTROL_MODE)
    finally:
        os.close(ctl)
    users = open_under(root_fd, "users")
    try:
        make_file(users, "assign", ASSIGN_TEXT, 0o644)
    finally:
        os.close(users)
    auid, agid = ids.uid("qpyalias"), ids.gid("qpyalias")
    alias = open_under(root_fd, "alias")
    try:
        for name in ALIAS_QMAIL:
            make_file(alias, ".qmail-" + name, b"./Maildir/\n", 0o600, auid, agid)
        make_dir(alias, "Maildir", 0o700, auid, agid)
        maildir = open_under(root_fd, "alias/Maildir")
        try:
            for sub in ("tmp", "new", "cur"):
                make_dir(maildir, sub, 0o700, auid, agid)
        finally:
            os.close(maildir)
    finally:
        os.close(alias)


def install(root: str, me: str, smtp: str | None) -> int:
    is_root = os.geteuid() == 0
    oneuser = None if is_root else pwd.getpwuid(os.geteuid()).pw_name
    if is_root:
        ensure_users()
    os.makedirs(os.path.dirname(root) or "/", exist_ok=True)
    if not os.path.isdir(root):
        os.mkdir(root, 0o755)
    ids = Ids(oneuser)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if oneuser:
            make_file(root_fd, "oneuser", (oneuser + "\n").encode("ascii"), 0o644)
        apply_layout(root_fd, read_layout(), ids)
        write_defaults(root_fd, me, smtp, ids)
    finally:
        os.close(root_fd)
    newrcpt = program("qpy-newrcpt")
    if os.path.exists(newrcpt):
        r = subprocess.run([newrcpt, root], env={"PATH": "/usr/bin:/bin", "QPY_ROOT": root})
        if r.returncode != 0:
            sys.stderr.write("qpy-install: qpy-newrcpt failed (exit %d)\n" % r.returncode)
            return 111
    print("qpy-install: root %s ready%s" % (root, " (one-user mode, user %s)" % oneuser
                                             if oneuser else ""))
    return 0


def oneuser_of(root: str) -> str | None:
    try:
        with open(os.path.join(root, "oneuser"), encoding="ascii") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qpy-install")
    ap.add_argument("root", nargs="?")
    ap.add_argument("--me", default=None)
    ap.add_argument("--smtp", default=None, help="ADDR:PORT for control/smtplisten")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--supervise", default=None, metavar="DIR")
    ap.add_argument("--system-mta", action="store_true")
    ap.add_argument("--remove-system-mta", action="store_true")
    ap.add_argument("--system-prefix", default="/", metavar="DIR")
    args = ap.parse_args(argv)
    os.umask(0o022)
    if args.remove_system_mta:
        from qpy.admin import systemmta
        return systemmta.remove(os.path.abspath(args.system_prefix))
    if not args.root:
        ap.error("ROOT is needed")
    root = os.path.abspath(args.root)
    try:
        if args.check:
            ids = Ids(oneuser_of(root))
            problems = check_layout(root, read_layout(), ids) + check_secrets(root, ids)
            for p in problems:
                print(p)
            return 1 if problems else 0
        me = args.me or controlmod.hostname()
        rc = install(root, me, args.smtp)
        if rc == 0 and args.supervise:
            from qpy.admin import supervise
            supervise.write_services(root, os.path.abspath(args.supervise), BINDIR)
        if rc == 0 and args.system_mta:
            from qpy.admin import systemmta
            rc = systemmta.install(root, os.path.realpath(BINDIR),
                                   os.path.abspath(args.system_prefix))
        return rc
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError) as e:
        sys.stderr.write("qpy-install: %s\n" % e)
        return 111
