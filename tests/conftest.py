"""Fixtures shared by all tests; helpers live in qpytest.py."""

from __future__ import annotations

import os

import pytest
import qpytest


@pytest.fixture
def qroot():
    """A freshly installed root (system users when root, one-user otherwise)."""
    if not os.path.exists(qpytest.bin_path("qpy-install")):
        pytest.fail("qpy is not installed in %s: run ./setup.sh install" % qpytest.PREFIX)
    r = qpytest.install_root()
    try:
        yield r
    finally:
        r.stop_all()
        if not os.environ.get("QPY_KEEP"):
            qpytest.remove_tree(os.path.dirname(r.path))


@pytest.fixture(autouse=True)
def _release_test_users():
    """Test users held by make_user() are let go when the test ends."""
    yield
    qpytest.release_users()
