"""Linux cgroups for the shim: which hierarchy the host runs, statistics, OOM events.

The shim answers ``Task.Stats`` with containerd's own metrics messages
(``io.containerd.cgroups.v1.Metrics`` or ``io.containerd.cgroups.v2.Metrics``) and
publishes ``TaskOOM`` when the kernel OOM-kills inside a container's memory cgroup.

Submodules, imported on demand (this package itself loads neither protobuf nor ctypes):

* :mod:`.v1`: cgroup v1 paths and metrics (legacy and hybrid hosts);
* :mod:`.v2`: cgroup v2 paths and metrics (unified hosts);
* :mod:`.stats`: version-independent entry points, ``Any`` packing, summing;
* :mod:`.oom`: OOM watchers (eventfd for v1, inotify for v2) and :func:`~.oom.watch_oom`.

Paths given to this package are either a *cgroups path* as the OCI spec carries it
(``linux.cgroupsPath``, e.g. ``/k8s.io/<id>``, or the systemd form
``slice:prefix:name``) or absolute directories under a cgroup mount.
"""

from __future__ import annotations

import errno
import os
from typing import Literal

__all__ = ["CGROUP2_SUPER_MAGIC", "DEFAULT_ROOT", "Mode", "expand_cgroups_path", "mode"]

Mode = Literal["unified", "hybrid", "legacy"]

CGROUP2_SUPER_MAGIC = 0x63677270
"""``f_type`` that statfs(2) reports for a cgroup2 mount."""

DEFAULT_ROOT = "/sys/fs/cgroup"


def mode(root: str = DEFAULT_ROOT) -> Mode:
    """Which cgroup layout is mounted at ``root``, decided as containerd does.

    ``"unified"``: ``root`` itself is cgroup2 (v2 only); ``"hybrid"``: v1 controllers
    under ``root`` plus a cgroup2 mount at ``<root>/unified``; ``"legacy"``: v1 only.
    The answer comes from statfs(2) ``f_type`` (``os.statvfs`` does not expose it),
    compared with :data:`CGROUP2_SUPER_MAGIC`. Raises :class:`OSError` if ``root``
    itself cannot be statfs'ed (for example it does not exist).
    """
    from podshim.cgroups._sys import statfs_type

    if statfs_type(root) == CGROUP2_SUPER_MAGIC:
        return "unified"
    try:
        unified = statfs_type(os.path.join(root, "unified"))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "legacy"
        raise
    return "hybrid" if unified == CGROUP2_SUPER_MAGIC else "legacy"


def expand_cgroups_path(cgroups_path: str) -> str:
    """The cgroupfs-relative path (``/a/b``) for an OCI ``linux.cgroupsPath``.

    A path in the systemd driver's ``slice:prefix:name`` form is expanded the way
    runc's systemd driver lays it out: ``kubepods-pod1.slice:cri-containerd:abc`` →
    ``/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope`` (an empty slice
    means ``system.slice``; a name ending in ``.slice`` is used as is). Any other
    string is returned with exactly one leading ``/``. Raises :class:`ValueError` for a
    slice name systemd would reject (a ``-`` at either end or ``--``).
    """
    parts = cgroups_path.split(":")
    if cgroups_path.startswith("/") or len(parts) != 3:
        return "/" + cgroups_path.lstrip("/")
    slice_name, prefix, name = parts
    parent = _expand_slice(slice_name or "system.slice")
    if name.endswith(".slice"):
        unit = name
    else:
        unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    return f"{parent.rstrip('/')}/{unit}"


def _expand_slice(slice_name: str) -> str:
    """``a-b.slice`` → ``/a.slice/a-b.slice``; ``-.slice`` (the root slice) → ``/``."""
    if not slice_name.endswith(".slice") or "/" in slice_name:
        raise ValueError(f"invalid systemd slice name {slice_name!r}")
    stem = slice_name[: -len(".slice")]
    if stem == "-":
        return "/"
    if stem.startswith("-") or stem.endswith("-") or "--" in stem or not stem:
        raise ValueError(f"invalid systemd slice name {slice_name!r}")
    path = ""
    prefix = ""
    for component in stem.split("-"):
        prefix = f"{prefix}-{component}" if prefix else component
        path += f"/{prefix}.slice"
    return path
