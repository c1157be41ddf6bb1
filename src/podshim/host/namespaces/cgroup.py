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

The systemd driver's ``slice:prefix:name`` form is rejected for now.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
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

_COMPONENT = re.compile(r"^[A-Za-z0-9_.@+=-]+$")


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
    """``linux.cgroupsPath`` checked and normalised for the cgroupfs driver.

    Returns ``""`` when the spec names no cgroup. Raises InvalidArgument for the systemd
    form (``slice:prefix:name``), a relative path, the root cgroup itself, or a path with
    ``.``/``..`` or odd characters in a component.
    """
    who = f" for pod {pod_id}" if pod_id else ""
    if not path:
        return ""
    if not isinstance(path, str):
        raise errdefs.InvalidArgument(f"cgroupsPath{who} must be a string, not {path!r}")
    if ":" in path:
        raise errdefs.InvalidArgument(
            f"cgroupsPath {path!r}{who} is in the systemd form (slice:prefix:name); "
            "podshim's namespaces host only supports the cgroupfs driver for now"
        )
    if not path.startswith("/"):
        raise errdefs.InvalidArgument(f"cgroupsPath {path!r}{who} must be absolute")
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise errdefs.InvalidArgument(f"cgroupsPath {path!r}{who} names the root cgroup")
    for p in parts:
        if p in (".", "..") or not _COMPONENT.match(p):
            raise errdefs.InvalidArgument(
                f"cgroupsPath {path!r}{who} has an invalid component {p!r}"
            )
    if len(path) > 4096:
        raise errdefs.InvalidArgument(f"cgroupsPath{who} is too long")
    return "/" + "/".join(parts)


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


def shares_to_weight(shares: int) -> int:
    """cgroup v1 ``cpu.shares`` [2, 262144] mapped linearly onto v2 ``cpu.weight``
    [1, 10000]."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


class SandboxCgroup:
    """The sandbox cgroup at ``cgroups_path`` in every hierarchy under ``root``."""

    def __init__(self, cgroups_path: str, *, root: str = DEFAULT_ROOT, pod_id: str = "") -> None:
        self.path = validate_cgroups_path(cgroups_path, pod_id)
        if not self.path:
            raise errdefs.InvalidArgument(f"no cgroupsPath for pod {pod_id}")
        self.root = root
        self.pod_id = pod_id
        self._hier = hierarchies(root)
        #: leaf directory per hierarchy, once created
        self.dirs: list[tuple[Hierarchy, str]] = []
        #: every directory we made (ancestors included), in creation order
        self._made: list[str] = []

    @property
    def version(self) -> int:
        return 2 if len(self._hier) == 1 and self._hier[0].version == 2 else 1

    def create(self) -> None:
        """Make the cgroup in every hierarchy; on failure remove what was made and raise."""
        if not self._hier:
            raise errdefs.FailedPrecondition(f"no cgroup hierarchy is mounted under {self.root}")
        try:
            for h in self._hier:
                leaf = self._mkdirs(h)
                self.dirs.append((h, leaf))
        except BaseException:
            self._remove_made_once()
            raise

    def _mkdirs(self, h: Hierarchy) -> str:
        cur = h.mountpoint
        for part in self.path.strip("/").split("/"):
            parent, cur = cur, os.path.join(cur, part)
            try:
                os.mkdir(cur, 0o755)
            except FileExistsError:
                pass
            except OSError as exc:
                raise errdefs.Internal(f"mkdir cgroup {cur}: {exc.strerror or exc}") from exc
            else:
                self._made.append(cur)
            if h.version == 1 and "cpuset" in h.controllers:
                self._cpuset_from_parent(parent, cur)
            if h.version == 2:
                self._enable_v2(parent)
        return cur

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

    def add(self, pid: int) -> None:
        """Move ``pid`` into the cgroup in every hierarchy."""
        for _h, d in self.dirs:
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def _remove_made_once(self) -> list[str]:
        """rmdir what we made, deepest first; returns the directories still there."""
        left = []
        for d in reversed(self._made):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno in (errno.EBUSY, errno.ENOTEMPTY, errno.EEXIST):
                    left.append(d)
                else:
                    log.warning("rmdir cgroup %s: %s", d, exc)
                    left.append(d)
        leaves = {d for _h, d in self.dirs}
        # an ancestor still in use by other cgroups is not ours to worry about
        self._made = [d for d in self._made if d in left]
        return [d for d in left if d in leaves]

    async def remove(self, timeout: float = 10.0) -> list[str]:
        """Remove the cgroup (and the ancestors we made, when empty), retrying while it
        still has tasks. Never raises; returns the leaf directories that are left."""
        for _h, d in self.dirs:
            if d not in self._made:  # it existed already: still ours to remove
                self._made.append(d)
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
