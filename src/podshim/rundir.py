"""Where podshim keeps its runtime state: the one definition of every directory under
``/run/podshim`` (or ``$PODSHIM_RUN_DIR``).

Read at call time, not at import, so a test or a second instance can point podshim
elsewhere with the environment. Standard library only: used on the ``start`` path.
"""

from __future__ import annotations

import os

DEFAULT = "/run/podshim"


def run_dir() -> str:
    """``$PODSHIM_RUN_DIR``, else ``/run/podshim``."""
    return os.environ.get("PODSHIM_RUN_DIR") or DEFAULT


def sockets_dir() -> str:
    """Shim sockets: ``<run>/s/<sha256(address/namespace/group)>``."""
    return os.path.join(run_dir(), "s")


def zygote_dir() -> str:
    """The zygotes' sockets, one per containerd address."""
    return os.path.join(run_dir(), "z")


def pods_dir() -> str:
    """Pod hosts' state: ``<run>/pods/<namespace>/<pod id>`` (e.g. namespace pins)."""
    return os.path.join(run_dir(), "pods")


def console_dir() -> str:
    """Console sockets handed to the OCI runtime for tty processes."""
    return os.path.join(run_dir(), "console")


def registry_dir() -> str:
    """The diag registry of running shims."""
    return os.path.join(run_dir(), "shims")


def runtime_root() -> str:
    """The OCI runtime's default ``--root`` (a directory per containerd namespace below)."""
    return os.path.join(run_dir(), "runc")
