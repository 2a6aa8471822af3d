"""bundle — a front end's modules in one file, run without the import system's search.

NAME
    qpy.common.bundle — load qpy-sendmail's (and the other injectors') byte code
    from one file per program; write that file at install.

SYNOPSIS
    (launcher)  load(BUNDLE): this module's load(), copied in by setup.sh
    (setup.sh)  python3 -I -m qpy.common.bundle SITE BUNDLE < TEMPLATE > LAUNCHER

DESCRIPTION
    Shell loops start a front end once per message, and loading its fifteen
    modules through the import system costs more than anything the front end
    does: per module two stats of the `.py`, then open, fstat, read and close of
    the `.pyc`, and the path finders' Python-level search (docs/queue.md, "What a
    front end costs"). A bundle holds the code of exactly the modules a front
    end's launcher imports, in the order their imports finish; `load` reads it
    from one open file, creates the modules (name, package, spec, `__file__`,
    `__cached__`, `__path__` for the packages, registered in sys.modules and on
    their parent package, as the import system leaves them) and runs them in
    that order. A module the bundle does not hold (an error path's, or
    qpy.common.dsnparam for `-N`) is imported later the usual way: the packages
    keep their real `__path__`.

    setup.sh writes `PREFIX/lib/bundle/PROGRAM` for each launcher template that
    has the line `load('')  # QPY-BUNDLE`, right after compiling the package, and
    puts load() and the bundle's path in the launcher in place of the template's
    `from qpy.common.bundle import load` and that line (a launcher is compiled on
    every run, and twenty lines compile faster than the import system finds this
    module). The code is compiled from the source of the installed `.pyc` files,
    with annotations postponed (PEP 563) and without docstrings (_entry() says
    why). Format 2:

        MAGIC ("qpy-bundle 2\n"), importlib's 4-byte MAGIC_NUMBER of the
        interpreter that wrote it, the length of the index in 10 decimal digits;
        the index: marshal'd (code of run(), tuple of (name, is_package, source
        path, .pyc path, (st_ino, st_mtime_ns, st_size) of that .pyc, offset,
        length)); then each module's marshal'd code at its offset

    `load` returns False and changes nothing, and the launcher's imports then go
    the usual way, when the bundle is missing, unreadable, not a plain file,
    writable by group or others, owned by someone other than root or the caller,
    short, of another format or interpreter, or stale: any of its `.pyc` files
    no longer the one it was made from (a reinstall by anything but setup.sh, a
    setup.sh stopped half-way). A bundle can make a front end faster, never
    different: its code is that of the source the import system's `.pyc` files
    were compiled from.

SECURITY
    The bundle is code the caller runs, so it is trusted exactly as the `.pyc`
    files are: written by setup.sh (root for /opt/qpy) under the prefix, mode
    0644, in a directory only the installer may write (PREFIX/lib/bundle, 0755).
    `load` also refuses a file that is not owned by root or the caller's own
    uid, or that group or others may write, so a loose mode or a file planted by
    another user is ignored rather than run; and every `.pyc` it stands for must
    still be the very file (inode, mtime, size) the import system would read, so
    an old bundle linked in elsewhere is no way around a reinstall either. The
    checks are on the file opened (fstat of the open descriptor, O_NOFOLLOW),
    and every later read is from that descriptor: nothing can be swapped between
    check and read.

NOTES
    Imports only builtin modules. The writer runs the front end's imports in a
    fresh `python3 -IS -X importtime` and keeps the order in which they finish:
    each module runs after everything it imports at its top.
"""

# (no __future__ import: the front ends load this module on every run; docs/queue.md)

import marshal
import posix
import sys

MAGIC = b"qpy-bundle 2\n"       # load() spells it out: it is copied into the launchers


# load() is copied into each launcher that has a bundle (render() below, at install),
# so that no import searches for this module; it is compiled on every run, so short.
def load(path: str) -> bool:
    """Run the modules of the bundle at `path`: True if done, False if not trusted."""
    import marshal
    import posix
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC)
        try:
            st = posix.fstat(fd)
            head = b"qpy-bundle 2\n" + sys.modules["_frozen_importlib_external"].MAGIC_NUMBER
            if st.st_mode & 0o170022 == 0o100000 and st.st_uid in (0, posix.geteuid()) \
                    and posix.read(fd, len(head)) == head:
                size = min(int(posix.read(fd, 10)), st.st_size)
                code, index = marshal.loads(posix.read(fd, size))
                return type(load)(code, globals())(fd, index)
        finally:
            posix.close(fd)
    except Exception:
        pass
    return False


def run(fd: int, index: tuple) -> bool:
    """Create and run the bundle's modules, all of them or (False) none. Each module's
    code is read on its own, so that one buffer of a few KiB serves them all: a
    fresh page costs more here than a system call (a 150 KiB read, 38 faults, took
    90 us; fifteen reads of 10 KiB, 20 us). The bundle holds this function's code
    (load() makes it a function again), so it imports what it uses itself."""
    import marshal
    import posix
    for _name, _pkg, _source, cached, ident, _at, _size in index:
        try:
            s = posix.stat(cached)
        except OSError:
            return False
        if (s.st_ino, s.st_mtime_ns, s.st_size) != ident:
            return False        # stale: the import system would load another file
    base = posix.lseek(fd, 0, 1)         # SEEK_CUR: where load() stopped reading
    codes = []
    for _name, _pkg, _source, _cached, _ident, at, size in index:
        data = posix.pread(fd, size, base + at)
        if len(data) != size:
            return False
        codes.append(marshal.loads(data))
    bootstrap = sys.modules["_frozen_importlib"]
    Loader = sys.modules["_frozen_importlib_external"].SourceFileLoader
    made: list[str] = []
    try:
        for (name, pkg, source, cached, _ident, _at, _size), code in zip(index, codes, strict=True):
            if name in sys.modules:
                continue        # imported already
            parent, _, child = name.rpartition(".")
            loader = Loader(name, source)
            spec = bootstrap.ModuleSpec(name, loader, origin=source, is_package=pkg)
            spec.has_location = True
            spec.cached = cached
            module = type(sys)(name)
            module.__spec__ = spec
            module.__loader__ = loader
            module.__file__ = source
            module.__cached__ = cached
            if pkg:
                module.__path__ = spec.submodule_search_locations = \
                    [source.rpartition("/")[0]]
            module.__package__ = name if pkg else parent
            sys.modules[name] = module
            made.append(name)
            exec(code, module.__dict__)
            if parent:
                setattr(sys.modules[parent], child, module)
    except Exception:
        # as a failed import leaves things: the launcher's own import then runs
        # the module again the usual way, and reports what is wrong with it
        for name in made:
            sys.modules.pop(name, None)
        return False
    return True


def write(site: str, bundle: str, module: str) -> list[str]:
    """Write the bundle of what a launcher imports (`module`, then qpy.common.exits)
    from the compiled package under `site`; returns the modules' names in the order
    they will run."""
    order = _import_order(site, module)
    index, blobs, at = [], [], 0
    for name in order:
        name, pkg, source, cached, ident, code = _entry(site, name)
        blob = marshal.dumps(code)
        index.append((name, pkg, source, cached, ident, at, len(blob)))
        blobs.append(blob)
        at += len(blob)
    own = marshal.dumps((run.__code__, tuple(index)))
    magic = sys.modules["_frozen_importlib_external"].MAGIC_NUMBER
    tmp = bundle + ".tmp"
    fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_NOFOLLOW,
                    0o644)
    with open(fd, "wb") as f:
        posix.fchmod(fd, 0o644)
        f.write(MAGIC + magic + b"%010d" % len(own) + own + b"".join(blobs))
    # not durable, and need not be: a bundle lost or torn by a crash is refused by
    # load() (short, or not the .pyc files any more) and the imports go the usual way
    posix.rename(tmp, bundle)
    return order


def _entry(site: str, name: str) -> tuple:
    """A module's name, whether a package, its source and .pyc paths, the .pyc's
    identity, and its code: compiled from the source the .pyc was compiled from,
    with annotations postponed (PEP 563, as `from __future__ import annotations`
    would, without importing __future__: evaluating them at every `def` cost about
    50 us a run) and without docstrings (a fifth of the bytes to unmarshal; no
    module on the front ends' path reads a __doc__). Line numbers are kept."""
    import __future__

    import ast
    path = site + "/" + name.replace(".", "/")
    pkg = posix.access(path + "/__init__.py", posix.F_OK)
    source = path + "/__init__.py" if pkg else path + ".py"
    head, _, tail = source.rpartition("/")
    cached = "%s/__pycache__/%s.%s.pyc" % (head, tail[:-3], sys.implementation.cache_tag)
    s = posix.stat(cached)
    with open(source, "rb") as f:
        tree = ast.parse(f.read(), source)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                and isinstance(first.value.value, str):
            node.body = node.body[1:] or [ast.copy_location(ast.Pass(), first)]
    code = compile(tree, source, "exec", dont_inherit=True,
                   flags=__future__.annotations.compiler_flag)
    return (name, pkg, source, cached, (s.st_ino, s.st_mtime_ns, s.st_size), code)


def _import_order(site: str, module: str) -> list[str]:
    """qpy's modules that `import module` loads, in the order their imports finish,
    in a fresh interpreter started as the launchers are."""
    import subprocess
    code = "import sys; sys.path[:0] = [%r]; import %s; import qpy.common.exits" \
        % (site, module)
    p = subprocess.run([sys.executable, "-IS", "-X", "importtime", "-c", code],
                       capture_output=True, check=True)
    names = []
    for line in p.stderr.splitlines():
        if line.startswith(b"import time:") and b"|" in line:
            name = line.rsplit(b"|", 1)[1].strip().decode()
            if name == "qpy" or name.startswith("qpy."):
                names.append(name)
    return names


def render(template: str, bundle: str) -> str:
    """A launcher's text with load() copied in and its bundle named: compiling
    twenty lines costs less than the import system's search for this module."""
    import inspect
    lines = []
    for line in template.splitlines(keepends=True):
        if line == "from qpy.common.bundle import load\n":
            lines.append(inspect.getsource(load))
        elif line.startswith("load('')  # QPY-BUNDLE"):
            lines.append("load(%r)\n" % bundle)
        else:
            lines.append(line)
    return "".join(lines)


def main(argv: list[str]) -> int:
    """setup.sh: `python3 -I -m qpy.common.bundle SITE BUNDLE < TEMPLATE > LAUNCHER`."""
    if len(argv) != 2:
        sys.stderr.write("usage: python3 -I -m qpy.common.bundle SITE BUNDLE "
                         "< TEMPLATE > LAUNCHER\n")
        return 2
    site, bundle = argv
    template = sys.stdin.read()
    module = [ln.split()[1] for ln in template.splitlines()
              if ln.startswith("from qpy.") and ln.endswith(" import main")]
    if len(module) != 1:
        sys.stderr.write("bundle: the template has no `from qpy.X import main` line\n")
        return 2
    write(site, bundle, module[0])
    sys.stdout.write(render(template, bundle))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
