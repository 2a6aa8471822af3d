"""mkman — render qpy's manual pages: each program's docstring, and the pages in docs/man/.

    python3 docs/mkman.py OUTDIR [VERSION]

Every program in bin/ names its module (`from qpy.x.y import main`); that module's
docstring is its manual page, written as plain text: a first line `NAME — summary`,
then sections whose headings stand in capitals at the left margin. The pages in
docs/man/ (`NAME.5`) are written the same way. Each becomes OUTDIR/manN/NAME.N in roff
with the text kept as written (no filling: the docstrings are laid out for 80 columns).
The docstring is read with ast, never imported, so rendering runs no program code.

setup.sh calls this at install time with OUTDIR = PREFIX/share/man.
"""

from __future__ import annotations

import ast
import datetime
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# A heading: capitals at the left margin, perhaps with a note in brackets after them,
# as in "EXIT CODES (qmail-queue(8))".
HEADING = re.compile(r"^[A-Z][A-Z0-9 ,/'-]*[A-Z](?: \(.*\))?$")
# Commands a user or script calls go in section 1, as Postfix files sendmail(1);
# daemons and admin tools in section 8.
SECTION1 = {"qpy-sendmail", "qpy-inject"}


def module_of(launcher: str) -> str:
    """The source file of the module a bin/ launcher runs."""
    with open(launcher) as f:
        for line in f:
            m = re.match(r"from (qpy(?:\.\w+)+) import main", line)
            if m:
                return os.path.join(REPO, *m.group(1).split(".")) + ".py"
    raise ValueError("%s names no qpy module" % launcher)


def docstring(path: str) -> str:
    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read(), path), clean=True)
    if not doc:
        raise ValueError("%s has no docstring" % path)
    return doc


def sections(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """The first line, and (HEADING, body lines) in order."""
    lines = text.splitlines()
    out: list[tuple[str, list[str]]] = []
    for line in lines[1:]:
        if HEADING.match(line):
            out.append((line, []))
        elif out:
            out[-1][1].append(line)
        elif line.strip():
            out.append(("DESCRIPTION", [line]))
    return lines[0], out


def _escape(line: str) -> str:
    line = line.replace("\\", "\\e").replace("-", "\\-")
    if line.startswith((".", "'")):
        line = "\\&" + line
    return line


def _dedent(body: list[str]) -> list[str]:
    while body and not body[0].strip():
        body = body[1:]
    while body and not body[-1].strip():
        body = body[:-1]
    indent = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
    return [b[indent:] for b in body]


def render(text: str, name: str, section: str, version: str, date: str) -> str:
    first, parts = sections(text)
    summary = first.split("—", 1)[1].strip() if "—" in first else first
    out = ['.TH "%s" "%s" "%s" "qpy %s" "qpy manual"' % (name.upper(), section, date, version),
           ".SH NAME", "%s \\- %s" % (_escape(name), _escape(summary))]
    for heading, body in parts:
        out += ['.SH "%s"' % heading, ".nf"]
        out += [_escape(b) if b.strip() else "" for b in _dedent(body)]
        out.append(".fi")
    return "\n".join(out) + "\n"


def pages() -> list[tuple[str, str, str]]:
    """(name, section, text) for every page qpy ships."""
    found = []
    bindir = os.path.join(REPO, "bin")
    for prog in sorted(os.listdir(bindir)):
        if prog.startswith("qpy-"):
            sec = "1" if prog in SECTION1 else "8"
            found.append((prog, sec, docstring(module_of(os.path.join(bindir, prog)))))
    mandir = os.path.join(HERE, "man")
    for page in sorted(os.listdir(mandir)) if os.path.isdir(mandir) else []:
        name, _, sec = page.rpartition(".")
        if sec.isdigit():
            with open(os.path.join(mandir, page)) as f:
                found.append((name, sec, f.read()))
    return found


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: mkman.py OUTDIR [VERSION]", file=sys.stderr)
        return 2
    outdir, version = argv[1], argv[2] if len(argv) == 3 else "0"
    date = datetime.date.today().isoformat()
    for name, sec, text in pages():
        d = os.path.join(outdir, "man" + sec)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, ".%s.%s.tmp" % (name, sec))
        with open(tmp, "w") as f:
            f.write(render(text, name, sec, version, date))
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(d, "%s.%s" % (name, sec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
