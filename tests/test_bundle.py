"""qpy.common.bundle: the injectors' modules from one file, and every way back to the
usual imports.

Real launchers (copies of the installed ones, naming a bundle the test controls), run
as a shell runs them, into a freshly installed root; `-X importtime` tells which of
qpy's modules went through the import system (a bundle's never do)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess

import pytest
import qpytest
from qpytest import needs_root

from qpy.common import dropfile, envelope

LOAD = re.compile(r"^load\('([^']*)'\)$", re.M)
MSG = b"From: a@x.example\nTo: d@test.example\nSubject: t\n\nbody\n"
ARGS = ["-f", "a@x.example", "d@test.example"]
SLOW = {"os", "__future__", "signal", "enum", "functools", "collections", "re", "socket"}


def site() -> str:
    return subprocess.run([qpytest.PYTHON, "-c", "import sysconfig; print(sysconfig."
                           "get_paths()['purelib'])"], capture_output=True, text=True,
                          check=True).stdout.strip()


def installed_bundle(prog: str = "qpy-sendmail") -> str:
    with open(qpytest.bin_path(prog)) as f:
        m = LOAD.search(f.read())
    assert m and m.group(1), "the installed %s names no bundle" % prog
    return m.group(1)


def launcher(where: str, bundle: str, prog: str = "qpy-sendmail",
             text: str | None = None) -> str:
    """A copy of the installed launcher (or `text`) that loads `bundle`."""
    if text is None:
        with open(qpytest.bin_path(prog)) as f:
            text = f.read()
    path = os.path.join(where, prog)
    with open(path, "w") as f:
        f.write(LOAD.sub(lambda _m: "load(%r)" % bundle, text))
    return path


def run(qroot, path: str, args: list[str] = ARGS, msg: bytes = MSG, env: dict | None = None,
        as_user: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run a launcher as the shell would (after `as_user`, a setpriv command line); the
    modules it loaded through the import system."""
    p = subprocess.run([*as_user, qpytest.PYTHON, "-IS", "-X", "importtime", path, *args],
                       input=msg, capture_output=True, env=env or qroot.env(), timeout=60)
    loaded = {line.rsplit(b"|", 1)[1].strip().decode() for line in p.stderr.splitlines()
              if line.startswith(b"import time:") and b"imported package" not in line}
    p.stderr = b"".join(line + b"\n" for line in p.stderr.splitlines()
                        if not line.startswith(b"import time:"))
    return p, loaded


def qpy_modules(loaded: set[str]) -> set[str]:
    return {m for m in loaded if m.split(".")[0] == "qpy"}


def queued(qroot) -> list[tuple[bytes, bytes, list[bytes]]]:
    out = []
    for name in sorted(os.listdir(qroot.paths.drop)):
        with open(os.path.join(qroot.paths.drop, name), "rb") as f:
            out.append(qpytest.split_drop(f.read()))
    return out


def test_installed_bundles_are_the_installers_and_used(qroot):
    """setup.sh gave each injector a bundle nobody else may write, and the launcher
    takes every module of qpy from it."""
    for prog in ("qpy-sendmail", "qpy-queue-inject", "qpy-inject"):
        path = installed_bundle(prog)
        for p in (path, os.path.dirname(path)):
            st = os.stat(p)
            assert st.st_uid == os.getuid() and not st.st_mode & 0o022, (p, oct(st.st_mode))
    p, loaded = run(qroot, qpytest.bin_path("qpy-sendmail"))
    assert p.returncode == 0, p.stderr
    assert not qpy_modules(loaded) and not loaded & SLOW, loaded
    [(msg, sender, rcpts)] = queued(qroot)
    assert sender == b"a@x.example" and rcpts == [b"d@test.example"]
    assert msg.endswith(b"\n\nbody\n") and b"\nMessage-ID: <" in msg


def _spoil(path: str, how: str) -> None:
    if how == "missing":
        os.unlink(path)
    elif how in ("group-writable", "world-writable"):
        os.chmod(path, 0o664 if how == "group-writable" else 0o646)
    elif how == "foreign-owned":
        os.chown(path, pwd.getpwnam("nobody").pw_uid, -1)
    elif how == "symlink":
        os.rename(path, path + ".real")
        os.symlink(path + ".real", path)
    elif how == "directory":
        os.unlink(path)
        os.mkdir(path)
    else:
        with open(path, "rb") as f:
            data = f.read()
        data = {"truncated": data[:len(data) // 2],
                "other-interpreter": data[:13] + b"\0\0\r\n" + data[17:],
                "other-format": b"qpy-bundle 1\n" + data[13:],      # the first format
                "garbage": data[:17] + b"\xff" * 64,
                "empty": b""}[how]
        with open(path, "wb") as f:
            f.write(data)


@pytest.mark.parametrize("how", [
    "missing", "group-writable", "world-writable",
    pytest.param("foreign-owned", marks=needs_root), "symlink", "directory",
    "truncated", "other-interpreter", "other-format", "garbage", "empty"])
def test_a_refused_bundle_falls_back_to_the_usual_imports(qroot, how):
    """A bundle that is missing, writable by others, someone else's, not a plain
    file, torn, or not this interpreter's: the launcher imports the usual way and
    queues the message just the same. The intact copy first: it is used."""
    where = os.path.dirname(qroot.path)
    bundle = os.path.join(where, "bundle")
    shutil.copyfile(installed_bundle(), bundle)
    os.chmod(bundle, 0o644)
    path = launcher(where, bundle)
    p, loaded = run(qroot, path)
    assert p.returncode == 0 and not qpy_modules(loaded), (p.stderr, loaded)
    _spoil(bundle, how)
    p, loaded = run(qroot, path)
    assert p.returncode == 0, p.stderr
    assert p.stderr == b"", p.stderr
    assert "qpy.inject.drop" in loaded and not loaded & SLOW, loaded
    got = queued(qroot)
    assert len(got) == 2 and got[0][1:] == got[1][1:] == (b"a@x.example", [b"d@test.example"])
    assert got[1][0].endswith(b"\n\nbody\n")


def test_a_stale_bundle_falls_back(qroot):
    """A package changed after its bundle was written (a reinstall by anything but
    setup.sh): the bundle stands for .pyc files that are not there any more, and the
    launcher imports the usual way. The bundle is written here as setup.sh writes it,
    from a copy of the installed package."""
    where = os.path.dirname(qroot.path)
    copy = os.path.join(where, "site")
    shutil.copytree(os.path.join(site(), "qpy"), os.path.join(copy, "qpy"))
    template = os.path.join(os.path.dirname(__file__), os.pardir, "bin", "qpy-sendmail")
    bundle = os.path.join(where, "bundle")
    with open(template, "rb") as f:
        r = subprocess.run([qpytest.PYTHON, "-I", "-m", "qpy.common.bundle", copy, bundle],
                           stdin=f, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = r.stdout.replace("sys.path[:0] = []  # QPY-PATH", "sys.path[:0] = [%r]" % copy)
    assert "def load(path" in text and "load(%r)" % bundle in text
    path = launcher(where, bundle, text=text)
    p, loaded = run(qroot, path)
    assert p.returncode == 0 and not qpy_modules(loaded), (p.stderr, loaded)
    # the package's byte code "reinstalled": same bytes, a new file
    pyc = os.path.join(copy, "qpy", "inject", "__pycache__")
    pyc = os.path.join(pyc, [n for n in os.listdir(pyc) if n.startswith("drop.")][0])
    shutil.copy2(pyc, pyc + ".new")
    os.rename(pyc + ".new", pyc)
    p, loaded = run(qroot, path)
    assert p.returncode == 0, p.stderr
    assert "qpy.inject.drop" in loaded and "qpy.inject.front" in loaded, loaded
    assert len(queued(qroot)) == 2


@pytest.mark.parametrize("case", ["bad address", "DSN option", "no queue", "bad option"])
def test_paths_outside_the_bundle_work_as_without_it(qroot, case):
    """What needs a module the bundle does not hold (qpy.common.dsnparam for -N,
    socket for a root with no control/me) imports it the usual way,
    and every outcome is the one the usual imports give: same exit code, same
    message, same envelope."""
    where = os.path.dirname(qroot.path)
    plain = launcher(where, "")
    args, env = {"bad address": (["-f", "a@x.example", "d@@test.example"], None),
                 "DSN option": (["-N", "success,delay", "-V", "e1"] + ARGS, None),
                 "no queue": (ARGS, qroot.env({"QPY_ROOT": os.path.join(where, "none")})),
                 "bad option": (["-Z"] + ARGS, None)}[case]
    runs = []
    for path in (qpytest.bin_path("qpy-sendmail"), plain):
        p, loaded = run(qroot, path, args, env=env)
        envs = []
        for name in sorted(os.listdir(qroot.paths.drop)):
            with open(os.path.join(qroot.paths.drop, name), "rb") as f:
                data = f.read()
            h = dropfile.parse_header(data[:dropfile.HEADER_LEN], len(data))
            e = envelope.decode_all(data[h.length + h.msglen:])
            envs.append((e.sender, e.recipients, e.mail, e.rcpt))
            os.unlink(os.path.join(qroot.paths.drop, name))
        runs.append((p.returncode, p.stderr, envs, loaded))
    (code, err, envs, loaded), (code2, err2, envs2, loaded2) = runs
    assert (code, err, envs) == (code2, err2, envs2)
    assert "qpy.inject.drop" in loaded2 and "qpy.inject.drop" not in loaded
    if case == "DSN option":
        assert code == 0 and "qpy.common.dsnparam" in loaded
        assert envs == [(b"a@x.example", [b"d@test.example"], b"ENVID=e1",
                         [b"NOTIFY=SUCCESS,DELAY"])]
    else:
        assert code != 0 and err.startswith(b"qpy-sendmail: ") and envs == [], runs[0]
    if case == "no queue":      # no control/me there: the host's name, from socket
        assert "socket" in loaded, loaded


def test_a_bundle_is_trusted_from_root_or_the_caller_only(qroot):
    """Owned by the caller (a user's own install) is trusted; owned by anyone else
    is not, whatever the mode: nobody's bundle is refused by root and used by nobody."""
    if os.getuid() != 0:
        pytest.skip("needs root to run as another uid")
    where = os.path.dirname(qroot.path)
    bundle = os.path.join(where, "bundle")
    shutil.copyfile(installed_bundle(), bundle)
    os.chmod(where, 0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(bundle, nobody.pw_uid, -1)
    assert stat.S_IMODE(os.stat(bundle).st_mode) == 0o644
    path = launcher(where, bundle)
    args = ["-bv", "d@test.example"]        # a mode nobody may run: nothing is queued
    p, loaded = run(qroot, path, args)
    assert "qpy.inject.sendmail" in loaded, loaded
    as_nobody = ("setpriv", "--reuid", str(nobody.pw_uid), "--regid", str(nobody.pw_gid),
                 "--clear-groups", "--")
    p, loaded = run(qroot, path, args, as_user=as_nobody)
    assert qpy_modules(loaded) and "qpy.inject.sendmail" not in loaded, (p.stderr, loaded)
