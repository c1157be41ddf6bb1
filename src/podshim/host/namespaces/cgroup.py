"""The pod's sandbox cgroup for the ``namespaces`` host (cgroupfs driver only).

CRI gives the sandbox a ``linux.cgroupsPath`` such as ``/k8s.io/<id>``. This module makes
that cgroup in every mounted hierarchy, applies the sandbox's CPU and memory limits,
moves processes in, and removes it again:

* cgroup v1 (legacy, or hybrid with an empty cgroup2 at ``<root>/unified``): one
  directory per mounted hierarchy (``cpu``, ``cpuacct``, ``memory``, ``pids``,
  ``cpuset``, ``blkio``, ``devices``, ``freezer``, named ones such as ``name=systemd``,
  and the hybrid cgroup2 one). A new ``cpuset`` directory gets ``cpuset.cpus`` and
  ``cpuset.mems`` from its parent (it cannot take tasks while they are empty).
* cgroup v2 (unified): one directory, with the controllers it needs enabled in the
  ``cgroup.subtree_control`` of each ancestor.

Limits come from ``linux.resources`` (``cpu.shares``, ``cpu.quota``, ``cpu.period``,
``memory.limit``) and, overriding them when set, from CRI's
``io.kubernetes.cri.sandbox-cpu-shares|cpu-quota|cpu-period|memory`` annotations.

The path is placed as runc's cgroupfs driver places it (absolute below each hierarchy's
root, relative below the shim's own cgroup: :func:`validate_cgroups_path`). With
``systemd_cgroup = true`` the pod's cgroup is a systemd scope instead
(:mod:`podshim.host.namespaces.systemd`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import posixpath
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from podshim import errors as errdefs
from podshim.mountinfo import read as read_mountinfo

log = logging.getLogger("podshim.host.namespaces.cgroup")

DEFAULT_ROOT = "/sys/fs/cgroup"

ANN_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
ANN_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
ANN_CPU_SHARES = "io.kubernetes.cri.sandbox-cpu-shares"
ANN_MEMORY = "io.kubernetes.cri.sandbox-memory"

#: v1 controllers a hierarchy may carry (a hierarchy can combine several: "cpu,cpuacct")
V1_CONTROLLERS = frozenset(
    {
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "devices",
        "freezer",
        "net_cls",
        "net_prio",
        "blkio",
        "perf_event",
        "hugetlb",
        "pids",
        "rdma",
        "misc",
    }
)

#: v2 controllers the sandbox cgroup asks its parents for (those available)
V2_WANTED = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc")

_COMPONENT = re.compile(r"^[A-Za-z0-9_.@+=:-]+$")


@dataclass(frozen=True, slots=True)
class Resources:
    """The limits the sandbox cgroup gets (None: leave the kernel's default)."""

    cpu_shares: int | None = None
    cpu_quota: int | None = None  # microseconds per period; -1 = unlimited
    cpu_period: int | None = None  # microseconds
    memory_limit: int | None = None  # bytes; -1 = unlimited

    def empty(self) -> bool:
        return (
            self.cpu_shares is None
            and self.cpu_quota is None
            and self.cpu_period is None
            and self.memory_limit is None
        )


def validate_cgroups_path(path: str, pod_id: str = "") -> str:
    """``linux.cgroupsPath`` checked and cleaned for the cgroupfs driver, as runc's is.

    runc's cgroupfs driver takes any string as a path: an absolute one (``/k8s.io/<id>``)
    is below each hierarchy's root, a relative one (such as the systemd form
    ``kubepods-pod1.slice:cri-containerd:<id>`` that containerd's CRI makes of a ``.slice``
    parent) below the *caller's own* cgroup in each hierarchy, and both are cleaned
    lexically first (``a/../b`` is ``b``; ``..`` cannot climb above the start). Returns
    ``""`` when the spec names no cgroup, ``/a/b`` for an absolute path, ``a/b`` for a
    relative one. Raises InvalidArgument for a path that cleans to the start itself (the
    root cgroup, or the caller's own cgroup: never adopted) or with odd characters in a
    component.
    """
    who = f" for pod {pod_id}" if pod_id else ""
    if not path:
        return ""
    if not isinstance(path, str):
        raise errdefs.InvalidArgument(f"cgroupsPath{who} must be a string, not {path!r}")
    if len(path) > 4096:
        raise errdefs.InvalidArgument(f"cgroupsPath{who} is too long")
    absolute = path.startswith("/")
    # "/" + ...: ".." stops at the top, as Go's filepath.Clean does for runc's CleanPath
    parts = [p for p in posixpath.normpath("/" + path).split("/") if p]
    if not parts:
        where = "the root cgroup" if absolute else "the shim's own cgroup"
        raise errdefs.InvalidArgument(f"cgroupsPath {path!r}{who} names {where}")
    for p in parts:
        if not _COMPONENT.match(p):
            raise errdefs.InvalidArgument(
                f"cgroupsPath {path!r}{who} has an invalid component {p!r}"
            )
    cleaned = "/".join(parts)
    return "/" + cleaned if absolute else cleaned


def _int_field(value: Any, what: str, pod_id: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str):
            try:
                return int(value.strip(), 10)
            except ValueError:
                pass
        raise errdefs.InvalidArgument(f"{what} for pod {pod_id} is not an integer: {value!r}")
    return value


def resources_from_spec(spec: Mapping[str, Any], pod_id: str = "") -> Resources:
    """The sandbox limits from an OCI spec: ``linux.resources`` overridden by CRI's
    sandbox annotations (a zero or absent annotation leaves the spec's value).

    Raises InvalidArgument for values that are not integers or out of range.
    """
    linux = spec.get("linux") or {}
    res = linux.get("resources") or {}
    cpu = res.get("cpu") or {}
    mem = res.get("memory") or {}
    ann = spec.get("annotations") or {}

    shares = _int_field(cpu.get("shares"), "linux.resources.cpu.shares", pod_id)
    quota = _int_field(cpu.get("quota"), "linux.resources.cpu.quota", pod_id)
    period = _int_field(cpu.get("period"), "linux.resources.cpu.period", pod_id)
    memory = _int_field(mem.get("limit"), "linux.resources.memory.limit", pod_id)

    a_shares = _int_field(ann.get(ANN_CPU_SHARES), ANN_CPU_SHARES, pod_id)
    a_quota = _int_field(ann.get(ANN_CPU_QUOTA), ANN_CPU_QUOTA, pod_id)
    a_period = _int_field(ann.get(ANN_CPU_PERIOD), ANN_CPU_PERIOD, pod_id)
    a_memory = _int_field(ann.get(ANN_MEMORY), ANN_MEMORY, pod_id)
    if a_shares:
        shares = a_shares
    if a_quota:
        quota = a_quota
    if a_period:
        period = a_period
    if a_memory:
        memory = a_memory

    # zero means "not set" for every one of them (as in the OCI runtimes)
    shares = shares or None
    quota = quota or None
    period = period or None
    memory = memory or None
    if shares is not None and not 2 <= shares <= 262144:
        raise errdefs.InvalidArgument(f"cpu shares {shares} for pod {pod_id} not in [2, 262144]")
    if period is not None and not 1000 <= period <= 1_000_000:
        raise errdefs.InvalidArgument(
            f"cpu period {period}us for pod {pod_id} not in [1000, 1000000]"
        )
    if quota is not None:
        if quota < 0:
            quota = -1
        elif quota < 1000:
            raise errdefs.InvalidArgument(f"cpu quota {quota}us for pod {pod_id} is below 1000")
    if memory is not None and memory < 0:
        memory = -1
    return Resources(shares, quota, period, memory)


@dataclass(slots=True)
class Hierarchy:
    """One mounted cgroup hierarchy."""

    mountpoint: str
    version: int  # 1 or 2
    controllers: frozenset[str] = field(default_factory=frozenset)


def hierarchies(
    root: str = DEFAULT_ROOT, mountinfo: str = "/proc/self/mountinfo"
) -> list[Hierarchy]:
    """The cgroup hierarchies mounted under ``root``, one per hierarchy.

    Unified host (``root`` is cgroup2): just that. Otherwise each v1 hierarchy (with
    its controllers, or a name=) plus, on a hybrid host, the cgroup2 mount.
    """
    root = root.rstrip("/") or "/"
    by_sb: dict[str, Hierarchy] = {}
    for m in read_mountinfo(mountinfo):
        dev, fsroot, mnt = m.dev, m.root, m.mountpoint
        if m.fstype not in ("cgroup", "cgroup2"):
            continue
        if mnt != root and not mnt.startswith(root + "/"):
            continue
        if fsroot != "/" and dev in by_sb:
            continue
        if m.fstype == "cgroup2":
            h = Hierarchy(mnt, 2)
        else:
            opts = m.super_options
            ctls = {o for o in opts if o in V1_CONTROLLERS or o.startswith("name=")}
            if not ctls:
                continue
            h = Hierarchy(mnt, 1, frozenset(ctls))
        prev = by_sb.get(dev)
        if prev is None or fsroot == "/":
            by_sb[dev] = h
    found = sorted(by_sb.values(), key=lambda h: h.mountpoint)
    for h in found:
        if h.version == 2 and h.mountpoint == root:
            return [h]
    return found


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(value)
    except OSError as exc:
        msg = f"write {value!r} to {path}: {exc.strerror or exc}"
        if exc.errno in (errno.EINVAL, errno.ERANGE, errno.EBUSY):
            raise errdefs.InvalidArgument(msg) from exc
        raise errdefs.Internal(msg) from exc


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read().strip()


def try_rmdir(directory: str) -> OSError | None:
    """rmdir ``directory``: None once it is gone (removed now, or already), else why not
    (EBUSY/ENOTEMPTY/EEXIST: a cgroup with tasks or children; callers decide)."""
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc
    return None


def kill_procs(directory: str) -> int:
    """SIGKILL every process listed in ``directory``'s ``cgroup.procs`` (that cgroup
    only, not its children); returns how many were listed."""
    try:
        with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as f:
            pids = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return 0
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def shares_to_weight(shares: int) -> int:
    """cgroup v1 ``cpu.shares`` [2, 262144] mapped linearly onto v2 ``cpu.weight``
    [1, 10000]."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


#: in the pod's state directory: the cgroup directories the host made (JSON list)
CGROUP_RECORD = "cgroups.json"


def record_cgroup_dirs(state_dir: str, dirs: list[str]) -> None:
    """Name the directories about to be made, for a crash cleanup (written atomically)."""
    tmp = os.path.join(state_dir, CGROUP_RECORD + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dirs, f)
    os.replace(tmp, os.path.join(state_dir, CGROUP_RECORD))


def recorded_cgroup_dirs(state_dir: str) -> list[str]:
    """What :func:`record_cgroup_dirs` left ([] when nothing or unreadable)."""
    try:
        with open(os.path.join(state_dir, CGROUP_RECORD), encoding="utf-8") as f:
            dirs = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(dirs, list):
        return []
    return [d for d in dirs if isinstance(d, str) and d.startswith("/")]


def own_cgroups(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """This process's cgroup per hierarchy, from ``/proc/self/cgroup``: each v1
    hierarchy keyed by its sorted controllers (``cpu,cpuacct``, ``name=systemd``),
    cgroup2 by ``""``."""
    own: dict[str, str] = {}
    with open(proc_cgroup, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) == 3:
                own[",".join(sorted(c for c in parts[1].split(",") if c))] = parts[2]
    return own


def hierarchy_key(h: Hierarchy) -> str:
    """``h``'s key in :func:`own_cgroups`."""
    return "" if h.version == 2 else ",".join(sorted(h.controllers))


class SandboxCgroup:
    """The sandbox cgroup at ``cgroups_path`` in every hierarchy under ``root`` (the
    cgroupfs driver; see :func:`validate_cgroups_path` for absolute and relative paths).

    Only directories this object made are removed, and :attr:`planned` names them
    before they are made, so the pod can record them for crash cleanup: a cgroup that
    existed before (adopted) is used but never emptied or removed.
    """

    def __init__(
        self,
        cgroups_path: str,
        *,
        root: str = DEFAULT_ROOT,
        pod_id: str = "",
        proc_cgroup: str = "/proc/self/cgroup",
    ) -> None:
        self.path = validate_cgroups_path(cgroups_path, pod_id)
        if not self.path:
            raise errdefs.InvalidArgument(f"no cgroupsPath for pod {pod_id}")
        self.root = root
        self.pod_id = pod_id
        self._hier = hierarchies(root)
        self._proc_cgroup = proc_cgroup
        #: leaf directory per hierarchy, once created
        self.dirs: list[tuple[Hierarchy, str]] = []
        #: every directory we made (ancestors included), in creation order
        self._made: list[str] = []
        #: the leaves that existed before create(): adopted, never removed by us
        self.adopted: list[str] = []

    @property
    def version(self) -> int:
        return 2 if len(self._hier) == 1 and self._hier[0].version == 2 else 1

    def chains(self) -> list[tuple[Hierarchy, list[str]]]:
        """Per hierarchy, the directories from the first below the start to the leaf.

        An absolute path starts at the hierarchy's root; a relative one at this
        process's own cgroup there (runc's cgroupfs driver starts at the cgroup of runc,
        a child of the shim: the same one). FailedPrecondition if a hierarchy is
        missing from ``/proc/self/cgroup``.
        """
        own = own_cgroups(self._proc_cgroup) if not self.path.startswith("/") else {}
        out = []
        for h in self._hier:
            start = h.mountpoint
            if own:
                mine = own.get(hierarchy_key(h))
                if mine is None:
                    raise errdefs.FailedPrecondition(
                        f"cgroup hierarchy {h.mountpoint} is not in {self._proc_cgroup}: "
                        f"cannot place the relative cgroupsPath {self.path!r} of pod "
                        f"{self.pod_id}"
                    )
                start = posixpath.join(h.mountpoint, mine.lstrip("/"))
            chain, cur = [], start
            for part in self.path.strip("/").split("/"):
                cur = posixpath.join(cur, part)
                chain.append(cur)
            out.append((h, chain))
        return out

    def planned(self) -> list[str]:
        """The directories create() will make (those not there now), parents first."""
        return [d for _h, chain in self.chains() for d in chain if not os.path.isdir(d)]

    async def create(self) -> None:
        """Make the cgroup in every hierarchy; on failure remove what was made and raise."""
        if not self._hier:
            raise errdefs.FailedPrecondition(f"no cgroup hierarchy is mounted under {self.root}")
        try:
            for h, chain in self.chains():
                leaf = self._mkdirs(h, chain)
                self.dirs.append((h, leaf))
        except BaseException:
            self._remove_made_once()
            raise

    def _mkdirs(self, h: Hierarchy, chain: list[str]) -> str:
        for cur in chain:
            parent = posixpath.dirname(cur)
            try:
                os.mkdir(cur, 0o755)
            except FileExistsError:
                if cur == chain[-1]:
                    self.adopted.append(cur)
            except OSError as exc:
                raise errdefs.Internal(f"mkdir cgroup {cur}: {exc.strerror or exc}") from exc
            else:
                self._made.append(cur)
            if h.version == 1 and "cpuset" in h.controllers:
                self._cpuset_from_parent(parent, cur)
            if h.version == 2:
                self._enable_v2(parent)
        return chain[-1]

    @staticmethod
    def _cpuset_from_parent(parent: str, child: str) -> None:
        for name in ("cpuset.cpus", "cpuset.mems"):
            try:
                if _read(os.path.join(child, name)):
                    continue
                _write(os.path.join(child, name), _read(os.path.join(parent, name)))
            except OSError as exc:
                raise errdefs.Internal(f"copy {name} into {child}: {exc}") from exc

    @staticmethod
    def _enable_v2(parent: str) -> None:
        try:
            available = set(_read(os.path.join(parent, "cgroup.controllers")).split())
            enabled = set(_read(os.path.join(parent, "cgroup.subtree_control")).split())
        except OSError as exc:
            raise errdefs.Internal(f"read controllers of {parent}: {exc}") from exc
        want = [c for c in V2_WANTED if c in available and c not in enabled]
        if not want:
            return
        try:
            _write(
                os.path.join(parent, "cgroup.subtree_control"),
                " ".join("+" + c for c in want),
            )
        except errdefs.ShimError as exc:
            # e.g. the parent has processes of its own (no internal processes rule):
            # the limits written later fail loudly if they needed one of these
            log.warning("cannot enable %s in %s: %s", want, parent, exc)

    def apply(self, res: Resources) -> None:
        """Write the limits. Raises InvalidArgument when the kernel refuses a value."""
        unified = self.version == 2
        for h, d in self.dirs:
            if h.version == 2:
                if unified:  # a hybrid host's cgroup2 has no controllers to set
                    self._apply_v2(d, res)
                continue
            if "cpu" in h.controllers:
                if res.cpu_shares is not None:
                    _write(os.path.join(d, "cpu.shares"), str(res.cpu_shares))
                if res.cpu_period is not None:
                    _write(os.path.join(d, "cpu.cfs_period_us"), str(res.cpu_period))
                if res.cpu_quota is not None:
                    _write(os.path.join(d, "cpu.cfs_quota_us"), str(res.cpu_quota))
            if "memory" in h.controllers and res.memory_limit is not None:
                _write(os.path.join(d, "memory.limit_in_bytes"), str(res.memory_limit))

    @staticmethod
    def _apply_v2(d: str, res: Resources) -> None:
        if res.cpu_shares is not None:
            _write(os.path.join(d, "cpu.weight"), str(shares_to_weight(res.cpu_shares)))
        if res.cpu_quota is not None or res.cpu_period is not None:
            quota = "max" if res.cpu_quota in (None, -1) else str(res.cpu_quota)
            period = res.cpu_period if res.cpu_period is not None else 100000
            _write(os.path.join(d, "cpu.max"), f"{quota} {period}")
        if res.memory_limit is not None:
            limit = "max" if res.memory_limit == -1 else str(res.memory_limit)
            _write(os.path.join(d, "memory.max"), limit)

    async def add(self, pid: int) -> None:
        """Move ``pid`` into the cgroup in every hierarchy."""
        for _h, d in self.dirs:
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def _remove_made_once(self) -> list[str]:
        """Kill what is left in the leaves we made (an adopted one is left alone), then
        rmdir what we made, deepest first; returns the leaf directories still there."""
        for _h, d in self.dirs:
            if d in self._made:
                kill_procs(d)
        left = []
        for d in reversed(self._made):
            exc = try_rmdir(d)
            if exc is not None:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.EEXIST):
                    log.warning("rmdir cgroup %s: %s", d, exc)
                left.append(d)
        leaves = {d for _h, d in self.dirs}
        # an ancestor still in use by other cgroups is not ours to worry about
        self._made = [d for d in self._made if d in left]
        return [d for d in left if d in leaves]

    async def remove(self, timeout: float = 10.0) -> list[str]:
        """Remove the cgroup (and the ancestors we made, when empty), killing what is
        left in a leaf we made and retrying while it still has tasks. Never raises;
        returns the leaf directories that are left. An adopted leaf (there before
        create) is left alone: neither emptied nor removed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.01
        while True:
            left = self._remove_made_once()
            if not left or loop.time() >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        if left:
            log.error("sandbox cgroup dirs still in use after %.0fs: %s", timeout, left)
        else:
            self.dirs = []
            self._made = []
        return left

    def exists(self) -> bool:
        return any(os.path.isdir(d) for _h, d in self.dirs)
