"""Host-side cleanup helpers: mounts, cgroups, network links, directory trees.

All helpers only act on paths or names they are given; callers make sure those
belong to their own lab instance.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from podshim import mountinfo
from podshim_lab.procfs import ProcStat

__all__ = [
    "Bundle",
    "cgroup_dirs",
    "is_under",
    "link_exists",
    "mounts_under",
    "orphan_cleanup",
    "processes_using",
    "remove_bundle_traces",
    "remove_cgroup",
    "remove_link",
    "remove_tree",
    "scan_bundles",
    "shared_candidates",
    "shared_dirs",
    "unmount_under",
]

MNT_DETACH = 2
CGROUP_ROOT = Path("/sys/fs/cgroup")
SHIM_SOCKET_DIR = "/run/containerd/s"
DEFAULT_RUNC_ROOT = "/run/containerd/runc"
TASK_DIR = "io.containerd.runtime.v2.task"
_SHARED_DIRS = ("/run/containerd", SHIM_SOCKET_DIR, "/run/containerd/fifo", DEFAULT_RUNC_ROOT)


def is_under(path: str | Path, roots: Iterable[str | Path]) -> bool:
    """True if ``path`` equals or lies below one of ``roots``."""
    p = os.path.normpath(str(path))
    for root in roots:
        r = os.path.normpath(str(root))
        if p == r or p.startswith(r.rstrip("/") + "/"):
            return True
    return False


def mounts_under(roots: Sequence[str | Path]) -> list[str]:
    """Mount points (in our mount namespace) at or below any of ``roots``."""
    real = [os.path.realpath(r) for r in roots] + [os.path.normpath(str(r)) for r in roots]
    return [m.mountpoint for m in mountinfo.read() if is_under(m.mountpoint, real)]


def unmount_under(roots: Sequence[str | Path], rounds: int = 10) -> list[str]:
    """Unmount everything below ``roots``, deepest first, lazily as a fallback.

    Returns the mount points that could not be removed (empty on success).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(rounds):
        points = mounts_under(roots)
        if not points:
            return []
        # Deepest first; for stacked mounts on one point, the top one goes first.
        for point in sorted(points, key=lambda p: (p.count("/"), len(p)), reverse=True):
            raw = point.encode()
            if libc.umount2(raw, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
                libc.umount2(raw, MNT_DETACH)
    return mounts_under(roots)


def remove_tree(path: Path, roots: Sequence[str | Path]) -> None:
    """``rm -rf path`` but refuse while anything is still mounted below ``roots``."""
    if not os.path.lexists(path):
        return
    left = mounts_under(roots)
    if left:
        raise RuntimeError(f"refusing to remove {path}: still mounted: {left}")
    shutil.rmtree(path)


def cgroup_dirs(rel: str) -> list[Path]:
    """Existing directories for cgroup path ``rel`` in every mounted hierarchy."""
    rel = rel.strip("/")
    if not rel or ".." in rel.split("/") or ":" in rel:
        return []  # empty, weird or systemd-style "slice:prefix:name" paths
    found: list[Path] = []
    try:
        hierarchies = sorted(CGROUP_ROOT.iterdir())
    except OSError:
        return []
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        hierarchies = [CGROUP_ROOT]  # pure cgroup v2
    for hierarchy in hierarchies:
        candidate = hierarchy / rel
        if candidate.is_dir():
            found.append(candidate)
    return found


def remove_cgroup(rel: str) -> list[str]:
    """rmdir the (empty) cgroup ``rel`` everywhere; return what is still present."""
    left: list[str] = []
    for directory in cgroup_dirs(rel):
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            left.append(f"{directory}: {exc.strerror}")
    return left


def link_exists(name: str) -> bool:
    """True if a network link called ``name`` exists in our network namespace."""
    return Path("/sys/class/net", name).exists()


def remove_link(name: str) -> None:
    """``ip link del name`` if it exists."""
    if link_exists(name):
        subprocess.run(
            ["ip", "link", "del", name],
            check=False,
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )


class Bundle(NamedTuple):
    """Host-global traces of one task bundle: shim socket, runc state, cgroup."""

    namespace: str
    task_id: str
    socket: str
    runc_root: str
    cgroup: str

    def runc_state(self) -> str:
        """runc's state dir for the task."""
        return os.path.join(self.runc_root, self.task_id)


def _read_json(path: Path) -> Mapping[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def scan_bundles(state: Path) -> list[Bundle]:
    """Bundles under ``<state>/io.containerd.runtime.v2.task/<ns>/<id>``."""
    found: list[Bundle] = []
    for bundle in sorted(state.glob(f"{TASK_DIR}/*/*")):
        ns, task_id = bundle.parent.name, bundle.name
        try:
            socket = (bundle / "address").read_text().strip().removeprefix("unix://")
        except OSError:
            socket = ""
        runc_root = str(_read_json(bundle / "options.json").get("root") or "")
        linux = _read_json(bundle / "config.json").get("linux")
        cgroup = str(linux.get("cgroupsPath") or "") if isinstance(linux, dict) else ""
        runc_root = os.path.join(runc_root or DEFAULT_RUNC_ROOT, ns)
        found.append(Bundle(ns, task_id, socket, runc_root, cgroup))
    return found


def remove_bundle_traces(bundles: Iterable[Bundle], owned: Sequence[Path]) -> list[str]:
    """Remove shim sockets, runc state and cgroups that tasks left outside ``owned``."""
    errors: list[str] = []
    for bundle in bundles:
        if bundle.socket.startswith(SHIM_SOCKET_DIR + "/"):
            try:
                os.unlink(bundle.socket)
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"{bundle.socket}: {exc}")
        runc_state = Path(bundle.runc_state())
        if not is_under(runc_state, owned):
            try:
                remove_tree(runc_state, owned)
            except (OSError, RuntimeError) as exc:
                errors.append(f"{runc_state}: {exc}")
        if bundle.cgroup:
            errors += remove_cgroup(bundle.cgroup)
    return errors


def shared_candidates(namespaces: Iterable[str]) -> set[str]:
    """Host-global dirs an instance using ``namespaces`` may create on demand."""
    return set(_SHARED_DIRS) | {os.path.join(DEFAULT_RUNC_ROOT, ns) for ns in namespaces}


def shared_dirs() -> set[str]:
    """Host-global dirs that shims, runc and ctr create on demand."""
    found = {d for d in _SHARED_DIRS if os.path.isdir(d)}
    with contextlib.suppress(OSError):
        found |= {e.path for e in os.scandir(DEFAULT_RUNC_ROOT) if e.is_dir()}
    return found


def processes_using(owned: Sequence[str], table: Mapping[int, ProcStat]) -> list[str]:
    """Processes whose command line mentions, or whose root/cwd lies in, ``owned``."""
    found: list[str] = []
    me = os.getpid()
    for pid, stat in table.items():
        if pid == me:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            links = [os.readlink(f"/proc/{pid}/{name}") for name in ("root", "cwd")]
        except OSError:
            continue
        if any(d in cmdline for d in owned) or any(is_under(p, owned) for p in links):
            found.append(f"process {pid} ({stat.comm}) uses {list(owned)}")
    return found


def orphan_cleanup(
    dirs: Sequence[Path],
    links: Sequence[str] = (),
    empty_dirs: Sequence[str] = (),
    cgroups: Sequence[str] = (),
) -> list[str]:
    """Host cleanup of a dead owner's instance: mounts, task traces, links, dirs.

    ``empty_dirs`` (shared dirs such as ``/run/containerd/s``) and ``cgroups``
    (namespace parents) did not exist when the owner started: they are removed
    only if empty.  Returns what could not be removed.
    """
    bundles = [b for d in dirs if os.path.isdir(d) for b in scan_bundles(Path(d))]
    errors = [f"still mounted: {m}" for m in unmount_under(dirs)]
    errors += remove_bundle_traces(bundles, dirs)
    for link in links:
        remove_link(link)
    for directory in dirs:
        try:
            remove_tree(Path(directory), dirs)
        except (OSError, RuntimeError) as exc:
            errors.append(f"{directory}: {exc}")
    for cgroup in cgroups:
        remove_cgroup(cgroup)
    for path in sorted(empty_dirs, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(path)
    return errors
