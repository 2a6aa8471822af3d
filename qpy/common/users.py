"""users — who owns a local address: `users/assign`, then the passwd database.

    lookup(root, b"joe-list")  -> Recipient(user="joe", uid, gid, home, dash=b"-", ext=b"list")
    valid_locals(root)         -> ValidLocals(exact={...}, prefixes=[...])

The rules are qmail's (qmail-users(5), qmail-getpw(8)):

1. `ROOT/users/assign`, one entry a line, ended by a line `.`:
     =local:user:uid:gid:homedir:dash:ext:      exact local part
     +prefix:user:uid:gid:homedir:dash:pre:     every local part starting with prefix;
                                                ext = pre + the rest of the local part
   Lines starting with `#` and blank lines are comments (a qpy addition).
   The exact entry wins, then the longest matching prefix (`+:` is a catch-all); for
   equal keys the first line wins. Keys compare in lowercase.
2. The passwd database: the longest prefix of the lowercased local part that ends
   at its end or just before a `-` and names a mail user. A mail user has a uid
   of at least UID_MIN (from /etc/login.defs, 1000 when it says nothing: system
   accounts such as `man` or `postgres` take mail only through users/assign), a
   home directory that exists and is owned by that uid, a name without upper
   case letters and shorter than 32 bytes. A whole-name match gives dash "" and
   ext ""; a prefix match gives dash "-" and ext = the rest (case kept).
3. Anything else belongs to the alias user `qpyalias` (home ROOT/alias) with
   dash "-" and ext = the whole local part. Root never receives mail: `root` is
   not a mail user, so it goes to the alias user as `.qmail-root`.

In a one-user root the passwd database is consulted for the single user's own
name only (mail to yourself reaches your Maildir; no one else can be delivered
to as their uid); assign entries and the alias user still work.

This module never delivers; qpy-lspawn (as root) and qpy-newrcpt use it. Errors
that a retry may cure (an unreadable or malformed assign file, a missing alias
user) raise UsersError: the caller defers, it never bounces on them.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass, field

from qpy.common import aliases
from qpy.common.queue import Paths

ALIAS_USER = "qpyalias"
MAX_ASSIGN_BYTES = 16 * 1024 * 1024
MAX_ASSIGN_LINE = 4096
MAX_USERNAME = 31
BREAK = b"-"
LOGIN_DEFS = "/etc/login.defs"
UID_MIN_DEFAULT = 1000


class UsersError(Exception):
    """A temporary lookup failure; str(e) is the reason."""


@dataclass(frozen=True)
class Recipient:
    user: str       # account name (for USER and the process title)
    uid: int
    gid: int
    home: str       # absolute path
    dash: bytes     # b"" or b"-": .qmail<dash><ext>
    ext: bytes      # extension, case kept


@dataclass
class Assign:
    exact: dict[bytes, tuple[str, int, int, str, bytes, bytes]]
    prefixes: dict[bytes, tuple[str, int, int, str, bytes, bytes]]


@dataclass
class ValidLocals:
    """Local parts that have an owner who can take mail (lowercased).

    A local part L is valid when L is in `exact` or starts with one of
    `prefixes` (an empty prefix makes everything valid).
    """
    exact: set[bytes]
    prefixes: list[bytes]
    unsure: list[str] = field(default_factory=list)   # homes that could not be looked at

    def __contains__(self, local: bytes) -> bool:
        low = local.lower()
        return low in self.exact or any(low.startswith(p) for p in self.prefixes)


def parse_assign(data: bytes) -> Assign:
    """Parse users/assign bytes; raise UsersError on any malformed line."""
    exact: dict = {}
    prefixes: dict = {}
    if len(data) > MAX_ASSIGN_BYTES:
        raise UsersError(f"users/assign larger than {MAX_ASSIGN_BYTES} bytes")
    ended = False
    for n, line in enumerate(data.split(b"\n"), 1):
        if ended:
            if line.strip():
                raise UsersError(f"users/assign line {n}: text after the final .")
            continue
        if len(line) > MAX_ASSIGN_LINE:
            raise UsersError(f"users/assign line {n}: too long")
        if line == b".":
            ended = True
            continue
        if not line.strip() or line.startswith(b"#"):
            continue  # qpy allows comments and blank lines (qmail-newu does not)
        if line[:1] not in (b"=", b"+"):
            raise UsersError(f"users/assign line {n}: must start with = or +")
        fields = line[1:].split(b":")
        if len(fields) != 8 or fields[7] != b"":
            raise UsersError(f"users/assign line {n}: needs 7 fields and a final :")
        key, user, uid, gid, home, dash, ext = fields[:7]
        if not (uid.isdigit() and gid.isdigit()) or not home.startswith(b"/") \
                or not user or any(c < 0x20 or c == 0x7F for c in line):
            raise UsersError(f"users/assign line {n}: bad user, uid, gid or home")
        if b"/" in dash or b"/" in ext:
            raise UsersError(f"users/assign line {n}: / in dash or ext")
        entry = (user.decode("utf-8", "replace"), int(uid), int(gid), os.fsdecode(home),
                 dash, ext)
        table = exact if line[:1] == b"=" else prefixes
        table.setdefault(key.lower(), entry)  # first line wins, as qmail-newu
    if not ended:
        raise UsersError("users/assign does not end with a line .")
    return Assign(exact, prefixes)


_cache: dict[str, tuple[tuple[int, int, int], Assign]] = {}


def read_assign(root: str) -> Assign:
    """ROOT/users/assign, parsed; cached until the file changes. Missing is empty."""
    path = os.path.join(Paths(root).users, "assign")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return Assign({}, {})
    except OSError as e:
        raise UsersError(f"cannot open users/assign: {e.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsersError("users/assign is not a regular file")
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = _cache.get(path)
        if hit and hit[0] == key:
            return hit[1]
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_ASSIGN_BYTES + 1)
    except OSError as e:
        raise UsersError(f"cannot read users/assign: {e.strerror}")
    finally:
        os.close(fd)
    parsed = parse_assign(data)
    _cache[path] = (key, parsed)
    return parsed


_uid_min: list[int] = []


def uid_min() -> int:
    """The lowest uid of a person's account: UID_MIN of /etc/login.defs, else 1000."""
    if not _uid_min:
        value = UID_MIN_DEFAULT
        try:
            with open(LOGIN_DEFS, "rb") as f:
                for line in f.read(1 << 20).splitlines():
                    words = line.split()
                    if len(words) >= 2 and words[0] == b"UID_MIN" and words[1].isdigit():
                        value = int(words[1])
        except OSError:
            pass
        _uid_min.append(value)
    return _uid_min[0]


def _mail_user(name: bytes) -> pwd.struct_passwd | None:
    """The passwd entry of `name` if it may receive mail under its own uid."""
    if not name or len(name) > MAX_USERNAME or name != name.lower():
        return None
    try:
        pw = pwd.getpwnam(name.decode("ascii"))
    except (KeyError, UnicodeDecodeError):
        return None
    if pw.pw_uid == 0 or pw.pw_uid < uid_min() or not pw.pw_dir.startswith("/"):
        return None
    try:
        st = os.stat(pw.pw_dir)
    except FileNotFoundError:
        return None
    except OSError as e:  # a flaky home (NFS) is not "no such user"
        raise UsersError(f"cannot stat home of {pw.pw_name}: {e.strerror}")
    if st.st_uid != pw.pw_uid or not stat.S_ISDIR(st.st_mode):
        return None
    return pw


def alias(root: str, ext: bytes) -> Recipient:
    """The alias user's recipient for extension `ext`."""
    name = Paths(root).oneuser() or ALIAS_USER
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise UsersError(f"unable to find the alias user {name}")
    return Recipient(name, pw.pw_uid, pw.pw_gid, Paths(root).alias, b"-", ext)


def lookup(root: str, local: bytes) -> Recipient:
    """The owner of local part `local` (case kept in ext). Raises UsersError."""
    low = local.lower()
    assign = read_assign(root)
    hit = assign.exact.get(low)
    if hit:
        return Recipient(*hit)
    best = None
    for prefix in assign.prefixes:
        if low.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    if best is not None:
        user, uid, gid, home, dash, pre = assign.prefixes[best]
        return Recipient(user, uid, gid, home, dash, pre + local[len(best):])
    one = Paths(root).oneuser()
    if one is None or low == one.encode() or low.startswith(one.encode() + BREAK):
        cut = len(low)
        while cut > 0:
            pw = _mail_user(low[:cut]) if one is None or low[:cut] == one.encode() else None
            if pw is not None:
                if cut == len(low):
                    return Recipient(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, b"", b"")
                return Recipient(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, b"-",
                                 local[cut + 1:])
            cut = low.rfind(BREAK, 0, cut)
    return alias(root, local)


def _dotqmail_locals(home: str, base: bytes, out: ValidLocals, dash: bytes = BREAK,
                     pre: bytes = b"") -> None:
    """Add the local parts `base` + R whose extension `pre` + R has a `.qmail<dash>`
    file in home (qpy.local.dotqmail's search: the exact name, a `…-default`, or
    `default`; `:` in a name stands for `.`, names compare in lower case)."""
    try:
        names = os.listdir(os.fsencode(home))
    except FileNotFoundError:
        return
    except OSError as e:
        # a home that cannot be listed now: delivery would see, or defer; no 550
        out.unsure.append(f"cannot list {home}: {e.strerror}")
        out.prefixes.append(base)
        return
    head, pre = b".qmail" + dash, pre.lower()
    for name in names:
        if not name.startswith(head) or name.endswith(b"-owner"):
            continue
        ext = name[len(head):].replace(b":", b".").lower()
        if ext == b"default" and dash == BREAK:
            out.prefixes.append(base)
        elif ext.endswith(b"-default"):
            ext = ext[: -len(b"default")]        # every extension starting with this
            if ext.startswith(pre):
                out.prefixes.append(base + ext[len(pre):])
            elif pre.startswith(ext):
                out.prefixes.append(base)
        elif ext and ext.startswith(pre):
            out.exact.add(base + ext[len(pre):])


def _assigned_locals(assign: Assign, out: ValidLocals) -> None:
    """The assign entries that a delivery would not bounce as unknown: every entry
    with an empty dash (`.qmail<ext>` or the default delivery); with a dash, only
    the local parts whose extension has a `.qmail` file in the entry's home."""
    for key, (_, _, _, home, dash, ext) in assign.exact.items():
        if not dash:
            out.exact.add(key)
            continue
        found = ValidLocals(set(), [])
        _dotqmail_locals(home, b"", found, dash, ext)
        if b"" in found:
            out.exact.add(key)
    for key, (_, _, _, home, dash, pre) in assign.prefixes.items():
        if dash:
            _dotqmail_locals(home, key, out, dash, pre)
        else:
            out.prefixes.append(key)


def valid_locals(root: str) -> ValidLocals:
    """Every local part that a delivery would not bounce as unknown (for qpy-newrcpt).

    assign `=` keys and `+` prefixes (with a dash, as far as the entry's home has
    `.qmail` files for them); each mail user's name, and its extensions
    as its `.qmail-EXT` / `.qmail-…-default` files allow; the alias user's
    `.qmail-NAME` files (a `.qmail-default` there makes every local part valid);
    the names in the aliases table (qpy.common.aliases).
    Run as root so that every home can be listed. A home that cannot be stat'd
    (other than missing) is named in `unsure`, and its user's addresses all count
    as valid.
    """
    out = ValidLocals(set(), [])
    _assigned_locals(read_assign(root), out)
    one = Paths(root).oneuser()
    if one and _mail_user(one.encode()) is not None:
        out.exact.add(one.encode())
        _dotqmail_locals(pwd.getpwnam(one).pw_dir, one.encode() + b"-", out)
    if not one:
        for pw in pwd.getpwall():
            name = pw.pw_name.encode("ascii", "replace")
            try:
                mail_user = _mail_user(name)
            except UsersError as e:
                # a home that cannot be stat'd now (NFS): delivery would defer, so all
                # of the user's addresses stay valid (accepted, then deferred; never a
                # 550 for a flaky home); the rest of the table is built as usual
                out.unsure.append(str(e))
                out.exact.add(name)
                out.prefixes.append(name + BREAK)
                continue
            if mail_user is not None:
                out.exact.add(name)
                _dotqmail_locals(pw.pw_dir, name + b"-", out)
    _dotqmail_locals(Paths(root).alias, b"", out)
    table = aliases.Table(root)      # /etc/aliases, compiled by newaliases
    try:
        table.get(b"")
    except (OSError, aliases.AliasError) as e:
        raise UsersError(f"cannot read {aliases.TABLE}: {e}")
    out.exact.update(table.entries)
    return out
