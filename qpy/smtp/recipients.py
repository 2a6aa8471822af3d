"""recipients — which local addresses exist: the reader of `users/recipients`.

`qpy-newrcpt` (qpy/admin/newrcpt.py, as root) builds the table, because `qpyd`
cannot read users' home directories; `qpy-smtpd` only reads it. Format, one
entry a line, local parts in lower case:

    QPYRCPT1                first line
    =LOCAL                  LOCAL exists (a user, an assign line, a .qmail-EXT file)
    +PREFIX                 every local part starting with PREFIX exists
                            (a -default file, a `+prefix` line in users/assign)

The local part looked up is the one qpy-lspawn will look up: that of the
delivery address qpy.common.rewrite gives (`LOCAL` for a domain in `locals`,
`PREPEND-LOCAL` for a `virtualdomains` hit), lowercased.
A missing table means "not built yet": every local part is accepted (and the
reader says so), as qmail would. A table that exists but cannot be read makes
local recipients a temporary failure, never a wrong refusal.
"""

from __future__ import annotations

import os

TABLE = os.path.join("users", "recipients")
MAGIC = b"QPYRCPT1"
MAX_TABLE_BYTES = 256 * 1024 * 1024


class TableError(Exception):
    pass


class RecipientTable:
    def __init__(self, root: str):
        self.path = os.path.join(root, TABLE)
        self.exact: set[bytes] = set()
        self.prefixes: set[bytes] = set()
        self.longest = 0
        self.state = "missing"     # missing, ok, or 'error: reason'
        self._stamp: tuple[int, int, int] | None = None

    def refresh(self) -> None:
        """Re-read the table when the file changed (a stat per call)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.exact, self.prefixes, self.state, self._stamp = set(), set(), "missing", None
            return
        except OSError as e:
            self.state = "error: %s" % e.strerror
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp and self.state == "ok":
            return
        try:
            self._load()
            self._stamp = stamp
            self.state = "ok"
        except (OSError, TableError) as e:
            self.state = "error: %s" % (getattr(e, "strerror", None) or e)

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read(MAX_TABLE_BYTES + 1)
        if len(data) > MAX_TABLE_BYTES:
            raise TableError("table too large")
        lines = data.split(b"\n")
        if lines[0] != MAGIC:
            raise TableError("not a recipient table")
        exact, prefixes = set(), set()
        for ln in lines[1:]:
            if ln[:1] == b"=":
                exact.add(ln[1:])
            elif ln[:1] == b"+":
                prefixes.add(ln[1:])
        self.exact, self.prefixes = exact, prefixes
        self.longest = max((len(p) for p in prefixes), default=0)

    def known(self, local: bytes) -> bool | None:
        """True/False for a local part; None when the table cannot be read."""
        if self.state == "missing":
            return True
        if self.state != "ok":
            return None
        local = local.lower()
        if local in self.exact:
            return True
        for n in range(min(len(local), self.longest) + 1):
            if local[:n] in self.prefixes:
                return True
        return False

