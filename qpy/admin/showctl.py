"""qpy-showctl — every control file's effective value, and where it comes from.

SYNOPSIS
    qpy-showctl [ROOT]

DESCRIPTION
    For every setting qpy knows (qpy.common.control.DEFAULTS) and every other file
    found in ROOT/control/, prints one line `name: value` (a list with one entry on
    that line, `(none)` for an empty list, several entries indented below `name: N
    entries`). A value taken from qmail's default is marked `(default)`; a file that
    exists but cannot be used (unreadable, too large, a NUL byte, not UTF-8, not a
    number where a number belongs, a directory) is marked `(malformed: reason)` and
    its default is shown, as the programs would use it. Files that look like keys or
    certificates (`*.pem`, `*.key`, names with `key`, `secret` or `passw`) and
    control/smtpauth (qpy-remote's AUTH passwords) are never printed, only their
    size.

RUNS AS
    any user that can read ROOT/control; it keeps the caller's uid, writes nothing.

EXIT CODES
    0 every file usable; 1 at least one file malformed; 111 control/ unreadable.
"""

from __future__ import annotations

import os
import sys

from qpy.common.control import DEFAULTS, Control
from qpy.common.exits import EXIT_TEMP
from qpy.common.log import clean
from qpy.common.privilege import preamble
from qpy.common.queue import root_from

EXIT_MALFORMED = 1
SECRET_WORDS = ("key", "secret", "passw", ".pem", "smtpauth")


def _secret(name: str) -> bool:
    return any(w in name.lower() for w in SECRET_WORDS)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return clean(str(value))


def render(ctl: Control, name: str) -> tuple[list[str], bool]:
    """The lines describing one control file, and whether it is malformed."""
    shown = clean(name)   # a stray file's name is outside text too
    if _secret(name):
        try:
            st = os.lstat(os.path.join(ctl.dir, name))
        except FileNotFoundError:
            return ["%s: (absent)" % shown], False
        return ["%s: (%d bytes, not shown)" % (shown, st.st_size)], False
    value, source = ctl.explain(name)
    marker = "" if source == "file" else " (%s)" % source
    if isinstance(value, list):
        # The value itself, as the programs see it: one entry on the name's line,
        # several one a line below it, none said so.
        if len(value) <= 1:
            shownval = clean(value[0]) if value else "(none)"
            return ["%s: %s%s" % (shown, shownval, marker)], source.startswith("malformed")
        head = "%s: %d entries%s" % (shown, len(value), marker)
        return [head] + ["  " + clean(v) for v in value], source.startswith("malformed")
    return ["%s: %s%s" % (shown, _show(value), marker)], source.startswith("malformed")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = root_from(args[:1])
    preamble("qpy-showctl", root, None)
    ctl = Control(root)
    try:
        present = set(os.listdir(ctl.dir))
    except OSError as e:
        sys.stderr.write("qpy-showctl: cannot list %s: %s\n" % (ctl.dir, e.strerror))
        return EXIT_TEMP
    # temporary names of durable writes in progress are not settings
    names = list(DEFAULTS) + sorted(n for n in present - set(DEFAULTS)
                                    if not n.startswith("."))
    bad = 0
    out = ["control directory: %s" % ctl.dir]
    for name in names:
        lines, malformed = render(ctl, name)
        out.extend(lines)
        bad += malformed
    sys.stdout.write("\n".join(out) + "\n")
    if bad:
        sys.stderr.write("qpy-showctl: %d malformed control file%s\n" % (bad, "s" * (bad > 1)))
        return EXIT_MALFORMED
    return 0
