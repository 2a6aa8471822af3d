"""Manual pages: every program's docstring is a complete page, and the install renders them."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess

import pytest
import qpytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mkman():
    spec = importlib.util.spec_from_file_location("mkman", os.path.join(REPO, "docs", "mkman.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mkman = _mkman()
PAGES = mkman.pages()


def test_every_program_has_a_page():
    progs = sorted(p for p in os.listdir(os.path.join(REPO, "bin")) if p.startswith("qpy-"))
    assert [n for n, s, _ in PAGES if s in ("1", "8")] == progs
    assert {("qpy-control", "5"), ("dot-qmail", "5")} <= {(n, s) for n, s, _ in PAGES}


@pytest.mark.parametrize("name,section,text", [p for p in PAGES if p[1] in "18"],
                         ids=[p[0] for p in PAGES if p[1] in "18"])
def test_program_page_has_the_sections_admins_look_for(name, section, text):
    first, parts = mkman.sections(text)
    assert first.startswith(name + " — "), first
    heads = [h.split(" (")[0] for h, _ in parts]
    for needed in ("SYNOPSIS", "RUNS AS", "EXIT CODES"):
        assert needed in heads, "%s: no %s section (has %s)" % (name, needed, heads)
    for h, body in parts:
        assert any(b.strip() for b in body), "%s: empty %s" % (name, h)


def test_render_escapes_roff():
    out = mkman.render("qpy-x — a test\n\nSYNOPSIS\n    .dot first\n    back\\slash -f\n",
                       "qpy-x", "8", "1", "2026-01-01")
    assert "\n\\&.dot first\n" in out
    assert "back\\eslash \\-f" in out
    assert out.startswith('.TH "QPY-X" "8"')


@pytest.mark.skipif(not shutil.which("man"), reason="man is not installed")
def test_installed_pages_render_with_man():
    mandir = os.path.join(qpytest.PREFIX, "share", "man")
    for name, sec in (("qpy-smtpd", "8"), ("qpy-sendmail", "1"), ("qpy-control", "5"),
                      ("dot-qmail", "5")):
        assert os.path.exists(os.path.join(mandir, "man" + sec, "%s.%s" % (name, sec)))
        r = subprocess.run(["man", "-M", mandir, "-P", "cat", sec, name], capture_output=True,
                           env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "LANG": "C.UTF-8"},
                           timeout=60)
        assert r.returncode == 0, r.stderr
        text = re.sub(r".\x08", "", r.stdout.decode())
        assert "NAME" in text and name in text


@pytest.mark.skipif(not qpytest.IS_ROOT or not shutil.which("man"),
                    reason="the system-wide links are made only by a root install")
def test_man_finds_pages_after_root_install():
    r = subprocess.run(["man", "-w", "qpy-smtpd"], capture_output=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and b"qpy-smtpd.8" in r.stdout, r
    r = subprocess.run(["man", "-w", "5", "qpy-control"], capture_output=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and b"qpy-control.5" in r.stdout, r


def test_qpy_control_names_every_setting():
    """Every control file the code has a default for is documented in qpy-control(5)."""
    from qpy.common import control
    text = dict(((n, s), t) for n, s, t in PAGES)[("qpy-control", "5")]
    named = set()
    for line in text.splitlines():
        m = re.match(r"    ([a-z][a-z0-9.]*(?:, [a-z][a-z0-9.]*)*)(?:\s|$)", line)
        if m:
            named.update(m.group(1).split(", "))
    missing = sorted(set(control.DEFAULTS) - named)
    assert not missing, "not in docs/man/qpy-control.5: %s" % missing
