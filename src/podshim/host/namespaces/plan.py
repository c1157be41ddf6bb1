"""Validation of a pod sandbox spec for the namespaces host: pure functions.

:func:`plan_from_spec` checks the whole sandbox spec (namespaces, hostname, sysctls,
cgroupsPath, resources) before :class:`~podshim.host.namespaces.host.NamespacesHost` makes anything,
and returns what to make; :func:`classify_sysctl` places a sysctl in the pod namespace it
belongs to, refusing the others the way runc does.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from podshim import errors as errdefs
from podshim.host.namespaces.cgroup import Resources, resources_from_spec, validate_cgroups_path

log = logging.getLogger("podshim.host.namespaces.host")

#: namespaces the host pins itself -> their pin file in the pod's state directory
PIN_FILES = {"network": "net", "ipc": "ipc", "uts": "uts"}

#: ioctl(2) on a namespace file: its type (linux/nsfs.h)
NS_GET_NSTYPE = 0xB703
CLONE_NEWNET = 0x40000000
#: the host's network namespace, as seen by PID 1 and by the shim itself
HOST_NETNS = ("/proc/1/ns/net", "/proc/self/ns/net")


def check_netns(path: str, pod_id: str, host: tuple[str, ...] = HOST_NETNS) -> None:
    """InvalidArgument unless ``path`` is a network namespace that is not the host's.

    A pod gets the host's network namespace only by leaving the namespace out of its
    spec (CRI's host networking), never by naming it: a path such as ``/proc/1/ns/net``
    would put the pod, and its ``net.*`` sysctls, on the host."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise errdefs.InvalidArgument(f"network namespace path {path!r} of pod {pod_id}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise errdefs.InvalidArgument(
            f"network namespace {path} of pod {pod_id}: {exc.strerror or exc}"
        ) from None
    try:
        st = os.fstat(fd)
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            kind = -1
    finally:
        os.close(fd)
    if kind != CLONE_NEWNET:
        raise errdefs.InvalidArgument(f"{path} of pod {pod_id} is not a network namespace")
    for ref in host:
        try:
            h = os.stat(ref)
        except OSError:
            continue
        if (h.st_dev, h.st_ino) == (st.st_dev, st.st_ino):
            raise errdefs.InvalidArgument(
                f"network namespace {path} of pod {pod_id} is the host's: a pod uses the "
                "host network by leaving the network namespace out of its spec"
            )


SYSCTL_KEY = re.compile(r"^[a-z0-9_.]+$")

#: IPC sysctls (besides the kernel.shm*/kernel.msg* families and fs.mqueue.*)
_IPC_SYSCTLS = frozenset({"kernel.sem", "kernel.sem_next_id"})


def classify_sysctl(key: str, *, net: bool, ipc: bool, uts: bool, pod_id: str = "") -> str:
    """The namespace type ("network", "ipc" or "uts") a sysctl belongs to, given which
    namespaces the pod has of its own. Raises InvalidArgument (with runc's wording) for
    a badly formed key, a sysctl of a namespace the pod shares with the host, or one
    that is not namespaced at all."""
    who = f" (pod {pod_id})" if pod_id else ""
    parts = key.split(".")
    if not SYSCTL_KEY.match(key) or "" in parts:
        raise errdefs.InvalidArgument(f'sysctl "{key}" is not a valid sysctl name{who}')
    if (
        key in _IPC_SYSCTLS
        or key.startswith(("kernel.shm", "kernel.msg"))
        or key.startswith("fs.mqueue.")
    ):
        if ipc:
            return "ipc"
        raise errdefs.InvalidArgument(f'sysctl "{key}" not allowed in host IPC namespace{who}')
    if key.startswith("net."):
        if net:
            return "network"
        raise errdefs.InvalidArgument(f'sysctl "{key}" not allowed in host network namespace{who}')
    if key in ("kernel.domainname", "kernel.hostname"):
        if not uts:
            raise errdefs.InvalidArgument(f'sysctl "{key}" not allowed in host UTS namespace{who}')
        if key == "kernel.hostname":
            raise errdefs.InvalidArgument(
                f'sysctl "{key}" is not allowed as it conflicts with the OCI "hostname" field{who}'
            )
        return "uts"
    raise errdefs.InvalidArgument(f'sysctl "{key}" is not in a separate kernel namespace{who}')


@dataclass(slots=True)
class Plan:
    """What :meth:`NamespacesHost.create` will build, from a validated spec."""

    pins: list[str] = field(default_factory=list)  # namespace types to create and pin
    netns: str | None = None  # CRI's network namespace (joined, never removed)
    pid: bool = False  # the pod has a PID namespace of its own
    hostname: str = ""
    sysctls: list[tuple[str, str, str]] = field(default_factory=list)  # key, value, ns type
    cgroups_path: str = ""
    resources: Resources = field(default_factory=Resources)
    oom_score_adj: int | None = None


def _mapping(value: Any, what: str, pod_id: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise errdefs.InvalidArgument(f"{what} of pod {pod_id} must be an object")
    return value


def plan_from_spec(spec: Mapping[str, Any], pod_id: str) -> Plan:
    """Validate the sandbox spec for the namespaces host; raises InvalidArgument."""
    linux = _mapping(spec.get("linux"), "linux", pod_id)
    plan = Plan()
    namespaces = linux.get("namespaces") or []
    if not isinstance(namespaces, list):
        raise errdefs.InvalidArgument(f"linux.namespaces of pod {pod_id} must be a list")
    seen: set[str] = set()
    for ns in namespaces:
        ns = _mapping(ns, "a linux.namespaces entry", pod_id)
        t = ns.get("type")
        path = ns.get("path") or ""
        if not isinstance(t, str) or not isinstance(path, str):
            raise errdefs.InvalidArgument(f"bad linux.namespaces entry {ns!r} for pod {pod_id}")
        if t in seen:
            raise errdefs.InvalidArgument(f"{t} namespace listed twice for pod {pod_id}")
        seen.add(t)
        if t == "mount":  # the pod's mount namespace is each workload's own business
            continue
        if t in ("ipc", "uts", "pid"):
            if path:
                raise errdefs.InvalidArgument(
                    f"podshim cannot join the given {t} namespace {path} for pod {pod_id}: "
                    "the namespaces host makes the pod's own"
                )
            if t == "pid":
                plan.pid = True
            else:
                plan.pins.append(t)
        elif t == "network":
            if path:
                check_netns(path, pod_id)
                plan.netns = path
            else:
                plan.pins.append("network")
        else:  # user, cgroup, time, or something we do not know
            raise errdefs.InvalidArgument(f"podshim cannot pin a {t} namespace for pod {pod_id}")

    hostname = spec.get("hostname") or ""
    if not isinstance(hostname, str):
        raise errdefs.InvalidArgument(f"hostname of pod {pod_id} must be a string")
    if hostname:
        if "uts" not in plan.pins:
            raise errdefs.InvalidArgument(
                f"pod {pod_id} sets hostname {hostname!r} without a UTS namespace of its own"
            )
        if len(hostname.encode()) > 64 or "\0" in hostname:
            raise errdefs.InvalidArgument(f"hostname {hostname!r} of pod {pod_id} is invalid")
    plan.hostname = hostname

    has_net = plan.netns is not None or "network" in plan.pins
    sysctl = _mapping(linux.get("sysctl"), "linux.sysctl", pod_id)
    for key, value in sorted(sysctl.items()):
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise errdefs.InvalidArgument(f'sysctl "{key}" of pod {pod_id}: bad value {value!r}')
        value = str(value)
        if "\0" in value:
            raise errdefs.InvalidArgument(f'sysctl "{key}" of pod {pod_id}: value has a NUL')
        ns_type = classify_sysctl(
            str(key), net=has_net, ipc="ipc" in plan.pins, uts="uts" in plan.pins, pod_id=pod_id
        )
        plan.sysctls.append((str(key), value, ns_type))

    cg = linux.get("cgroupsPath") or ""
    if not isinstance(cg, str):
        raise errdefs.InvalidArgument(f"cgroupsPath of pod {pod_id} must be a string")
    plan.cgroups_path = validate_cgroups_path(cg, pod_id)
    plan.resources = resources_from_spec(spec, pod_id)
    if not plan.cgroups_path and not plan.resources.empty():
        log.warning("pod %s: resources without a cgroupsPath are ignored", pod_id)

    process = _mapping(spec.get("process"), "process", pod_id)
    oom = process.get("oomScoreAdj")
    if oom is not None:
        if isinstance(oom, bool) or not isinstance(oom, int) or not -1000 <= oom <= 1000:
            raise errdefs.InvalidArgument(f"oomScoreAdj {oom!r} of pod {pod_id} is invalid")
        plan.oom_score_adj = oom
    return plan
