"""Where the ``namespaces`` host finds ``podshim-init`` and the tools it runs, and
whether the shim can reap the init (standard library only)."""

from __future__ import annotations

import ctypes
import os
import sys

from podshim import errors as errdefs

INIT_NAME = "podshim-init"
_PR_GET_CHILD_SUBREAPER = 37


#: where the build (setup.py) puts podshim-init: next to this module, in the package
PACKAGED_INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), INIT_NAME)


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_init_binary(explicit: str | None = None) -> str:
    """``explicit``, else the one built into the installed package, else ``podshim-init``
    on PATH, else next to ``sys.executable``."""
    if explicit:
        if _executable(explicit):
            return explicit
        raise errdefs.FailedPrecondition(f"podshim-init not found at {explicit}")
    if _executable(PACKAGED_INIT):
        return PACKAGED_INIT
    found = which(INIT_NAME)
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), INIT_NAME)
    if _executable(beside):
        return beside
    raise errdefs.FailedPrecondition(
        f"podshim-init not found (not at {PACKAGED_INIT}, nor on PATH, nor beside "
        f"{sys.executable}): install podshim from its wheel or sdist, which compile it "
        "(a C compiler is needed), or run scripts/install.sh in a checkout"
    )


def which(name: str) -> str | None:
    """The executable ``name`` on PATH (``shutil.which`` for a plain name, without
    importing shutil, which loads bz2 and lzma)."""
    if "/" in name:
        return name if _executable(name) else None
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(d or ".", name)
        if _executable(path):  # a file (not a directory) with x
            return path
    return None


def tool(name: str, package: str = "util-linux") -> str:
    found = which(name)
    if not found:
        raise errdefs.FailedPrecondition(f"{name} not found on PATH ({package} is needed)")
    return found


def is_child_subreaper() -> bool:
    """Whether this process is a child subreaper (a read-only prctl, thread-safe)."""
    libc = ctypes.CDLL(None, use_errno=True)
    value = ctypes.c_int(0)
    if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0) != 0:
        return False
    return value.value != 0
