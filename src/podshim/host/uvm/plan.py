"""Validation of a pod sandbox spec for the ``uvm`` host: a pure function.

:func:`plan_from_spec` checks the whole sandbox spec before
:class:`~podshim.host.uvm.host.UvmHost` makes anything and returns what to make. The VM
*is* the pod's PID, IPC, UTS and network namespaces: a pod that asks to share one of
them with the machine (CRI leaves the namespace out of the spec for ``hostNetwork``,
``hostPID``, ``hostIPC``) cannot be honoured, nor can a user namespace (the guest has no
mapping of the machine's ids), a namespace it names by path other than CRI's network
namespace, or devices (microvm has no hot-plug). Each refusal is InvalidArgument naming
the spec field.

The network namespace: with CRI's path the VM gets the pod's IP (a tap device and tc
redirect in that namespace, :mod:`podshim.host.uvm.network`); a network namespace
without a path (a pod of its own with only ``lo``, as runc makes it) gets a VM without a
network device, whose guest has only ``lo``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from podshim import errors as errdefs

#: the guest's hostname goes on the kernel command line: RFC 1123 labels only
HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?$")
SYSCTL_KEY = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")
_IPC_SYSCTLS = frozenset({"kernel.sem", "kernel.sem_next_id"})
#: namespace types the guest gives the pod of its own; a spec must list them
REQUIRED = (
    ("network", "hostNetwork"),
    ("pid", "hostPID"),
    ("ipc", "hostIPC"),
    ("uts", "a UTS namespace shared with the host"),
)
#: types that are each container's own business in the guest
IGNORED = frozenset({"mount", "cgroup"})


@dataclass(slots=True)
class VmPlan:
    """What :meth:`UvmHost.create` will build, from a validated spec."""

    #: CRI's network namespace (None: a VM without a network device)
    netns: str | None = None
    hostname: str = ""
    #: (key, value): written in the guest through the agent once it answers
    sysctls: list[tuple[str, str]] = field(default_factory=list)


def _mapping(value: Any, what: str, pod_id: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise errdefs.InvalidArgument(f"{what} of pod {pod_id} must be an object")
    return value


def check_component(value: str, what: str) -> None:
    """InvalidArgument unless ``value`` can name one directory."""
    if not value or value in (".", "..") or "/" in value or "\0" in value or "," in value:
        raise errdefs.InvalidArgument(f"{what} {value!r} cannot name a directory of a VM")


def _sysctl(key: str, value: Any, pod_id: str) -> tuple[str, str]:
    """A sysctl the guest can set for the pod: one of the namespaces the VM is the
    pod's own of (net, IPC); the others are refused as runc refuses them."""
    where = f"linux.sysctl {key!r} of pod {pod_id}"
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise errdefs.InvalidArgument(f"{where}: bad value {value!r}")
    text = str(value)
    if "\0" in text or "\n" in text:
        raise errdefs.InvalidArgument(f"{where}: the value holds a NUL or a newline")
    if not SYSCTL_KEY.match(key):
        raise errdefs.InvalidArgument(f"{where} is not a valid sysctl name")
    namespaced = (
        key.startswith(("net.", "kernel.shm", "kernel.msg", "fs.mqueue."))
        or key in _IPC_SYSCTLS
        or key == "kernel.domainname"
    )
    if not namespaced:
        raise errdefs.InvalidArgument(f"{where} is not in a separate kernel namespace")
    return key, text


def plan_from_spec(spec: Mapping[str, Any], pod_id: str) -> VmPlan:
    """Validate the sandbox spec for a VM pod; raises InvalidArgument naming the field."""
    linux = _mapping(spec.get("linux"), "linux", pod_id)
    plan = VmPlan()
    namespaces = linux.get("namespaces") or []
    if not isinstance(namespaces, list):
        raise errdefs.InvalidArgument(f"linux.namespaces of pod {pod_id} must be a list")
    seen: set[str] = set()
    for entry in namespaces:
        ns = _mapping(entry, "a linux.namespaces entry", pod_id)
        t, path = ns.get("type"), ns.get("path") or ""
        if not isinstance(t, str) or not isinstance(path, str):
            raise errdefs.InvalidArgument(f"bad linux.namespaces entry {entry!r} of pod {pod_id}")
        if t in seen:
            raise errdefs.InvalidArgument(f"linux.namespaces lists {t} twice for pod {pod_id}")
        seen.add(t)
        if t in IGNORED:
            continue
        if t == "user":
            raise errdefs.InvalidArgument(
                f"linux.namespaces: a user namespace cannot be honoured by a VM pod ({pod_id})"
            )
        if t == "network":
            plan.netns = path or None
        elif t in ("pid", "ipc", "uts"):
            if path:
                raise errdefs.InvalidArgument(
                    f"linux.namespaces: a VM pod cannot join the {t} namespace {path} "
                    f"(pod {pod_id}): the VM is the pod's own"
                )
        else:
            raise errdefs.InvalidArgument(
                f"linux.namespaces: a {t} namespace cannot be honoured by a VM pod ({pod_id})"
            )
    for t, what in REQUIRED:
        if t not in seen:
            raise errdefs.InvalidArgument(
                f"linux.namespaces has no {t} namespace ({what}): a VM pod cannot share "
                f"it with the host (pod {pod_id})"
            )
    devices = linux.get("devices") or []
    if devices:
        raise errdefs.InvalidArgument(
            f"linux.devices: a VM pod cannot pass devices into its guest (pod {pod_id})"
        )
    hostname = spec.get("hostname") or ""
    if not isinstance(hostname, str) or (hostname and not HOSTNAME.match(hostname)):
        raise errdefs.InvalidArgument(f"hostname {hostname!r} of pod {pod_id} is invalid")
    plan.hostname = hostname
    sysctl = _mapping(linux.get("sysctl"), "linux.sysctl", pod_id)
    for key, value in sorted(sysctl.items()):
        if str(key) == "kernel.hostname":
            raise errdefs.InvalidArgument(
                f'linux.sysctl "kernel.hostname" of pod {pod_id} conflicts with "hostname"'
            )
        plan.sysctls.append(_sysctl(str(key), value, pod_id))
    return plan
