"""The OCI spec of a workload container, rewritten for runc in the pod's utility VM.

Pure functions: :func:`rewrite` takes the spec containerd wrote (CRI's, whose namespace
paths name the sandbox's ``/proc/<pid>/ns/<t>`` on the host) and returns the spec runc
runs in the guest, plus the host paths to bind-mount into the pod's share directory
(:class:`BindPlan`). The workload (:mod:`podshim.host.uvm.workload`) does the I/O.

* ``root.path`` -> ``<guest share>/<cid>/rootfs`` (mounted there on the host).
* a bind mount's host source -> ``<guest share>/<cid>/mounts/<n>`` (the host bind-mounts
  the source there, read-only when the mount is); the pod's ``/dev/shm`` (a bind of the
  sandbox's shm, or of anything onto ``/dev/shm``) -> :data:`GUEST_SHM`; the kernel
  filesystems runc mounts itself (proc, sysfs, tmpfs, devpts, mqueue, cgroup) are kept.
* namespaces: the sandbox's network, IPC and UTS namespaces are the VM's own, so those
  entries are dropped; the sandbox's PID namespace is the guest's root one (shared by
  the pod's containers): dropped too; a PID namespace of another running container of
  the pod (``kubectl debug --target``, a guest pid) is kept; no PID entry, or one without
  a path -> a new one. A user namespace (or id mappings) is refused.
* what needs a namespace the container no longer has of its own goes: ``hostname``
  and ``domainname`` (the guest's is the pod's), sysctls runc would refuse outside
  their namespace (the pod's sysctls are the guest's, set by the host), the AppArmor
  profile (the guest kernel has no LSM; the VM is the boundary), the memory swap limit
  (the guest has no swap).
* ``linux.cgroupsPath`` -> ``<parent>/<cid>`` in the guest's cgroup2 hierarchy.
* refused with InvalidArgument naming the field: hooks (host programs), devices beyond
  the default set, other filesystem types, non-zero hugepage limits, net_cls/net_prio
  resources, Intel RDT, a namespace path that is not the pod's.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from podshim import errors as errdefs
from podshim.host.rewrite import NS_FILE
from podshim.host.uvm.agentapi import GUEST_SHM

#: the devices every container gets anyway (runc makes these nodes itself)
DEFAULT_DEVICES = frozenset({
    "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty",
    "/dev/console", "/dev/ptmx",
})  # fmt: skip
#: filesystem types runc mounts in the guest without a host source
KERNEL_FS = frozenset({"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2"})
#: namespace types whose sandbox instance is the VM's own (the entry is dropped)
VM_NAMESPACES = frozenset({"network", "ipc", "uts", "pid"})
#: sysctls of the IPC namespace (as runc lists them)
_IPC_SYSCTLS = frozenset({
    "kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
    "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced",
})  # fmt: skip
_UTS_SYSCTLS = frozenset({"kernel.hostname", "kernel.domainname"})
_PROC_NS = re.compile(r"^/proc/(\d+)/ns/([a-z_]+)$")


@dataclass(frozen=True, slots=True)
class BindPlan:
    """A host path to bind-mount at ``<share>/<cid>/mounts/<index>``."""

    index: int
    source: str
    #: the spec's field, for error messages (``mounts[3]``)
    field: str
    recursive: bool
    readonly: bool


@dataclass(frozen=True, slots=True)
class GuestSpec:
    spec: dict[str, Any]
    binds: tuple[BindPlan, ...]


def guest_dir(guest_share: str, cid: str) -> str:
    """The container's directory in the guest (its bundle: config.json, rootfs)."""
    return f"{guest_share.rstrip('/')}/{cid}"


def shm_sources(sandbox_spec: Mapping[str, Any]) -> frozenset[str]:
    """Host sources the sandbox's spec binds onto ``/dev/shm`` (the pod's shm)."""
    out = set()
    for m in sandbox_spec.get("mounts") or []:
        if isinstance(m, dict) and m.get("destination") == "/dev/shm" and _is_bind(m):
            out.add(str(m.get("source") or ""))
    out.discard("")
    return frozenset(out)


def _is_bind(m: Mapping[str, Any]) -> bool:
    opts = m.get("options") or []
    return m.get("type") == "bind" or "bind" in opts or "rbind" in opts


def _refuse(field: str, why: str) -> errdefs.InvalidArgument:
    return errdefs.InvalidArgument(f"{field}: {why} (not possible in a VM pod)")


def rewrite(
    spec: Mapping[str, Any],
    *,
    cid: str,
    guest_share: str,
    sandbox_pid: int,
    pod_pids: Collection[int] = (),
    shm: Collection[str] = (),
    cgroup_parent: str = "/podshim",
) -> GuestSpec:
    """The guest spec of container ``cid`` (see the module docstring).

    Args:
        sandbox_pid: the pid CRI names in ``/proc/<it>/ns/<t>`` (the sandbox task's).
        pod_pids: guest pids of the pod's running containers (PID namespace targets).
        shm: host sources of the pod's ``/dev/shm`` (:func:`shm_sources`).

    Raises:
        InvalidArgument: naming the first field the VM cannot honour.
    """
    out = copy.deepcopy(dict(spec))
    gdir = guest_dir(guest_share, cid)
    if out.get("hooks"):
        kinds = sorted(k for k, v in out["hooks"].items() if v) or sorted(out["hooks"])
        raise _refuse(f"hooks.{kinds[0]}", "hooks would run in the guest, where the host's "
                      "programs are not")  # fmt: skip
    out.pop("hooks", None)
    root = dict(out.get("root") or {})
    root["path"] = f"{gdir}/rootfs"
    out["root"] = root
    linux = out.setdefault("linux", {})
    if not isinstance(linux, dict):
        raise errdefs.InvalidArgument("linux: not an object")
    kept = _namespaces(linux, sandbox_pid, pod_pids)
    binds = _mounts(out, gdir, frozenset(shm))
    _devices(linux)
    _resources(linux)
    if linux.get("intelRdt"):
        raise _refuse("linux.intelRdt", "the guest has no Intel RDT")
    for field in ("uidMappings", "gidMappings"):
        if linux.get(field):
            raise _refuse(f"linux.{field}", "user namespaces are not supported")
    if "uts" not in kept:
        out.pop("hostname", None)
        out.pop("domainname", None)
    sysctl = linux.get("sysctl")
    if isinstance(sysctl, dict):
        linux["sysctl"] = {k: v for k, v in sysctl.items() if _sysctl_kept(str(k), kept)}
    process = out.get("process")
    if isinstance(process, dict):
        process.pop("apparmorProfile", None)
    linux["cgroupsPath"] = f"/{cgroup_parent.strip('/')}/{cid}"
    return GuestSpec(out, binds)


def _namespaces(linux: dict[str, Any], sandbox_pid: int, pod_pids: Collection[int]) -> set[str]:
    """Rewrite ``linux.namespaces`` in place; the types the container still has of its
    own (not the VM's)."""
    kept: list[dict[str, Any]] = []
    pid_seen = False
    for i, ns in enumerate(linux.get("namespaces") or []):
        field = f"linux.namespaces[{i}]"
        if not isinstance(ns, dict) or "type" not in ns:
            raise errdefs.InvalidArgument(f"{field}: invalid namespace entry {ns!r}")
        ns_type, path = str(ns["type"]), str(ns.get("path") or "")
        if ns_type == "user":
            raise _refuse(f"{field} (user)", "user namespaces are not supported")
        if ns_type not in NS_FILE:
            raise errdefs.InvalidArgument(f"{field}: unknown namespace type {ns_type!r}")
        pid_seen = pid_seen or ns_type == "pid"
        if not path:
            kept.append(ns)
            continue
        m = _PROC_NS.match(path)
        if m is None or NS_FILE[ns_type] != m.group(2):
            raise _refuse(f"{field} ({ns_type})", f"{path!r} is not one of this pod's")
        pid = int(m.group(1))
        if pid == sandbox_pid and ns_type in VM_NAMESPACES:
            continue  # the VM's own is the pod's
        if ns_type == "pid" and pid in pod_pids:
            kept.append(ns)  # another container of the pod (a guest pid)
            continue
        raise _refuse(f"{field} ({ns_type})", f"{path!r} is not one of this pod's")
    if not pid_seen:
        kept.append({"type": "pid"})
    linux["namespaces"] = kept
    return {str(ns["type"]) for ns in kept}


def _mounts(out: dict[str, Any], gdir: str, shm: frozenset[str]) -> tuple[BindPlan, ...]:
    binds: list[BindPlan] = []
    mounts = out.get("mounts") or []
    for i, m in enumerate(mounts):
        field = f"mounts[{i}]"
        if not isinstance(m, dict):
            raise errdefs.InvalidArgument(f"{field}: not an object")
        dest, typ = str(m.get("destination") or ""), str(m.get("type") or "")
        opts = [str(o) for o in m.get("options") or []]
        if _is_bind(m):
            src = str(m.get("source") or "")
            if dest == "/dev/shm" or src in shm:
                m["source"] = GUEST_SHM
                continue
            if not src.startswith("/"):
                raise _refuse(f"{field}.source", f"bind source {src!r} is not an absolute path")
            n = len(binds)
            binds.append(BindPlan(n, src, field, "rbind" in opts, "ro" in opts))
            m["source"] = f"{gdir}/mounts/{n}"
        elif typ not in KERNEL_FS:
            raise _refuse(f"{field}.type", f"{typ!r} on {dest} has no source in the guest")
    return tuple(binds)


def _devices(linux: dict[str, Any]) -> None:
    for i, dev in enumerate(linux.get("devices") or []):
        path = str(dev.get("path") if isinstance(dev, dict) else dev)
        if path not in DEFAULT_DEVICES:
            raise _refuse(f"linux.devices[{i}]", f"the host's device {path} cannot be passed")


def drop_swap(res: dict[str, Any]) -> None:
    """The guest kernel has no swap (and so no memory.swap.max, which runc would fail to
    write): ``memory.swap`` goes from a resources object (a spec's or an update's)."""
    memory = res.get("memory")
    if isinstance(memory, dict):
        memory.pop("swap", None)


def _resources(linux: dict[str, Any]) -> None:
    res = linux.get("resources")
    if not isinstance(res, dict):
        return
    drop_swap(res)
    pages = res.get("hugepageLimits")
    if pages:
        for i, p in enumerate(pages):
            if isinstance(p, dict) and p.get("limit"):
                raise _refuse(f"linux.resources.hugepageLimits[{i}]", "the guest has no "
                              "huge pages")  # fmt: skip
        res.pop("hugepageLimits")  # only zero limits: nothing to honour
    if res.get("network"):
        raise _refuse("linux.resources.network", "net_cls/net_prio do not exist in cgroup v2")


def _sysctl_kept(key: str, kept: set[str]) -> bool:
    """Whether runc may set sysctl ``key`` for a container with namespaces ``kept``."""
    if key.startswith("net."):
        return "network" in kept
    if key in _IPC_SYSCTLS or key.startswith("fs.mqueue."):
        return "ipc" in kept
    if key in _UTS_SYSCTLS:
        return "uts" in kept
    return True  # not namespaced: runc refuses it, as it would anywhere
