"""Where podshim keeps its runtime state: the one definition of every directory under
``/run/podshim`` (or ``$PODSHIM_RUN_DIR``).

Read at call time, not at import, so a test or a second instance can point podshim
elsewhere with the environment. Standard library only: used on the ``start`` path.

State that names containers and pods (the OCI runtime's root, the pods' state) is kept
per containerd instance: two containerds on one host may use the same namespace and id,
and one must never see, let alone delete, the other's. The instance key is a digest of
the containerd address (:func:`instance_key`); the shim's entry points bind it once
(:func:`bind_instance`) from their ``-address`` flag.
"""

from __future__ import annotations

import os

try:  # CPython's builtin module: hashlib loads OpenSSL (~3-5 ms, ~3.5 MB) on start/delete
    from _sha256 import sha256 as _sha256  # type: ignore[import-not-found]
except ImportError:  # Python 3.12+ names it _sha2
    from hashlib import sha256 as _sha256

DEFAULT = "/run/podshim"

_instance = ""


def digest(text: str) -> str:
    """Hex SHA-256 of ``text``: the one digest behind podshim's state names (instance
    keys, socket names, zygote and registry entries), without loading OpenSSL."""
    return str(_sha256(text.encode()).hexdigest())


def instance_key(address: str) -> str:
    """The directory name of a containerd instance's state: ``sha256(address)[:16]``."""
    return digest(address)[:16]


def bind_instance(address: str) -> None:
    """Key :func:`pods_dir` and :func:`runtime_root` by this containerd's address."""
    global _instance
    _instance = instance_key(address) if address else ""


def _keyed(base: str, address: str | None) -> str:
    key = instance_key(address) if address is not None else _instance
    return os.path.join(base, key) if key else base


def run_dir() -> str:
    """``$PODSHIM_RUN_DIR``, else ``/run/podshim``."""
    return os.environ.get("PODSHIM_RUN_DIR") or DEFAULT


def sockets_dir() -> str:
    """Shim sockets: ``<run>/s/<sha256(address/namespace/group)>``."""
    return os.path.join(run_dir(), "s")


def nodes_dir() -> str:
    """Node-scope daemons' own directories (log, panic.log): ``<run>/node/<key>``."""
    return os.path.join(run_dir(), "node")


def settings_dir() -> str:
    """What the C launcher reads instead of a node-scope config (it cannot read TOML):
    ``<run>/settings/<sha256(config path)[:16]>``, written by Python's ``start``."""
    return os.path.join(run_dir(), "settings")


def zygote_dir() -> str:
    """The zygotes' sockets, one per containerd address."""
    return os.path.join(run_dir(), "z")


def pods_dir(address: str | None = None) -> str:
    """Pod hosts' state: ``<run>/pods/<instance>/<namespace>/<pod id>`` (e.g. namespace
    pins), for the bound containerd instance or the one at ``address``."""
    return _keyed(os.path.join(run_dir(), "pods"), address)


def console_dir() -> str:
    """Console sockets handed to the OCI runtime for tty processes."""
    return os.path.join(run_dir(), "console")


def registry_dir() -> str:
    """The diag registry of running shims."""
    return os.path.join(run_dir(), "shims")


def runtime_root(address: str | None = None) -> str:
    """The OCI runtime's default ``--root``, ``<run>/runc/<instance>`` (a directory per
    containerd namespace below), for the bound instance or the one at ``address``."""
    return _keyed(os.path.join(run_dir(), "runc"), address)
