"""supervise — fill in the service templates for one root (`qpy-install --supervise DIR`).

    write_services(root, directory, bindir) -> list of files written

Copies the templates (PREFIX/share/supervise/, from the repository's supervise/) to

    DIR/qpy-NAME/run, DIR/qpy-NAME/log/run, DIR/qpy-NAME/env/QPY_ROOT
                                                  daemontools, runit, s6 (NAME: send,
                                                  pickup, smtpd, authd)
    DIR/systemd/qpy-NAME.service, DIR/systemd/qpy.target

replacing @ROOT@, @BINDIR@ (absolute paths) and the user placeholders (@LOGUSER@,
@QPYQ@, @QPYAUTH@, @SMTPUSER@: the design's users, or the one user of a one-user
root). It also creates each service's log directory ROOT/log/qpy-NAME/, owned by the
log user, mode 0750 (logs name addresses). Link the DIR/qpy-* directories into
svscan's directory (/etc/service) to start them; DIR itself is not a scan directory
(svscan would take systemd/ for a service).

Runs inside qpy-install (root, or the one-user owner). Existing files are replaced
(each by a durable write: temp name, fsync, rename, fsync dir), so a live service
directory keeps its supervise/ state and picks the new run script up at its next
start.
"""

from __future__ import annotations

import os
import pwd

from qpy.common import durable
from qpy.common.privilege import resolve_user

SERVICES = ("send", "pickup", "smtpd", "authd")
SCRIPT_MODE = 0o755
FILE_MODE = 0o644
LOG_DIR_MODE = 0o750
MAX_TEMPLATE = 256 * 1024


def templates_dir(bindir: str) -> str:
    return os.path.normpath(os.path.join(bindir, "..", "share", "supervise"))


def placeholders(root: str, bindir: str) -> dict[str, str]:
    return {"@ROOT@": root, "@BINDIR@": bindir,
            "@LOGUSER@": resolve_user(root, "qpyl"), "@QPYQ@": resolve_user(root, "qpyq"),
            "@QPYAUTH@": resolve_user(root, "qpyauth"),
            "@SMTPUSER@": resolve_user(root, "qpyd")}


def fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(key, value)
    if "@" in text and any(w.startswith("@") and w.endswith("@") and len(w) > 2
                           for w in text.replace("/", " ").split()):
        raise ValueError("a placeholder was left unfilled")
    return text


def _copy(src: str, dst: str, values: dict[str, str], written: list[str]) -> None:
    with open(src, encoding="utf-8") as f:
        text = f.read(MAX_TEMPLATE)
    os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
    mode = SCRIPT_MODE if os.path.basename(src) == "run" else FILE_MODE
    # durable: temp name, fsync, rename, fsync dir — a live service never sees half a script
    durable.write_file(os.path.dirname(dst), os.path.basename(dst),
                       fill(text, values).encode("utf-8"), mode=mode)
    written.append(dst)


def _log_dir(root: str, name: str, user: str) -> None:
    path = os.path.join(root, "log", "qpy-" + name)
    try:
        os.mkdir(path, LOG_DIR_MODE)
    except FileExistsError:
        return
    if os.getuid() == 0:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def write_services(root: str, directory: str, bindir: str) -> list[str]:
    """Write filled-in service directories and systemd units for `root` under `directory`."""
    root, directory, bindir = (os.path.abspath(p) for p in (root, directory, bindir))
    src = templates_dir(bindir)
    values = placeholders(root, bindir)
    written: list[str] = []
    for name in SERVICES:
        base = os.path.join(src, "qpy-" + name)
        for sub in ("run", "log/run", "env/QPY_ROOT"):
            _copy(os.path.join(base, sub), os.path.join(directory, "qpy-" + name, sub),
                  values, written)
        _log_dir(root, name, values["@LOGUSER@"])
    units = os.path.join(src, "systemd")
    for unit in sorted(os.listdir(units)):
        if unit.endswith((".service", ".target")):
            _copy(os.path.join(units, unit), os.path.join(directory, "systemd", unit),
                  values, written)
    return written
