"""The containerd version matrix of the integration tests.

``PODSHIM_CONTAINERD=1.7`` (or ``2.1``) makes the lab fixtures (conftest's
``containerd*`` fixtures, ``shimutil.open_lab``, ``criutil.open_cri_lab``) start that
containerd instead of the system package (1.6), with its own config dialect (see
``podshim_lab.versions``); the builds are unpacked by ``scripts/fetch_containerd.sh``.
"""

from __future__ import annotations

import os

import pytest

from podshim_lab import versions

#: the builds other than the system package that the matrix covers
NEWER = ("1.7", "2.1")


def selected() -> str | None:
    """The version ``$PODSHIM_CONTAINERD`` asks for, or ``None``."""
    return os.environ.get(versions.ENV_VERSION) or None


def require(version: str | None) -> str:
    """``version`` (``None``: the selected one, else 1.6) if its binaries are here; a
    build asked for by name that is missing fails the test, it is never skipped."""
    build = versions.resolve(version)
    why = build.missing()
    if why is not None:
        pytest.fail(why, pytrace=False)
    return build.version


def matrix_version() -> str:
    """The version the integration fixtures start (see the module docstring)."""
    return require(selected())
