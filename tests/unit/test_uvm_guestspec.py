"""The guest spec (podshim.host.uvm.guestspec): what a CRI container spec becomes in a VM
pod, and what it cannot be (InvalidArgument naming the field)."""

from __future__ import annotations

from typing import Any

import pytest

from podshim import errors as errdefs
from podshim.host.uvm import guestspec
from podshim.host.uvm.agentapi import GUEST_SHM

SANDBOX = 4242


def cri_spec(**linux: Any) -> dict[str, Any]:
    return {
        "process": {"args": ["sh"], "cwd": "/", "apparmorProfile": "cri-containerd.apparmor.d"},
        "root": {"path": "/run/containerd/x/rootfs"},
        "hostname": "pod",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/sb/shm",
             "options": ["rbind", "ro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/c/hosts",
             "options": ["rbind", "rprivate", "rw"]},
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "mount"},
                {"type": "network", "path": f"/proc/{SANDBOX}/ns/net"},
                {"type": "ipc", "path": f"/proc/{SANDBOX}/ns/ipc"},
                {"type": "uts", "path": f"/proc/{SANDBOX}/ns/uts"},
            ],
            "cgroupsPath": "kubepods-besteffort-pod1.slice:cri-containerd:c1",
            "resources": {"memory": {"limit": 33554432, "swap": 33554432}},
            "sysctl": {"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1"},
            **linux,
        },
    }  # fmt: skip


def rewrite(spec: dict[str, Any]) -> guestspec.GuestSpec:
    return guestspec.rewrite(spec, cid="c1", guest_share="/run/podshim/share",
                             sandbox_pid=SANDBOX, shm={"/run/sb/shm"})  # fmt: skip


def test_a_cri_spec_in_the_guest() -> None:
    spec = cri_spec()
    g = rewrite(spec)
    out = g.spec
    assert out["root"]["path"] == "/run/podshim/share/c1/rootfs"
    # the pod's namespaces are the VM's own: only the container's new ones stay
    assert out["linux"]["namespaces"] == [{"type": "pid"}, {"type": "mount"}]
    assert "hostname" not in out  # the guest's is the pod's
    assert out["linux"]["sysctl"] == {}  # net/ipc sysctls are the pod's, set in the guest
    assert "apparmorProfile" not in out["process"]
    # systemd-form cgroup parent from kubelet -> a path in the guest's cgroup2 tree
    assert out["linux"]["cgroupsPath"] == "/podshim/c1"
    # the guest has no swap: runc would fail on memory.swap.max
    assert out["linux"]["resources"]["memory"] == {"limit": 33554432}
    # /dev/shm is the pod's shm in the guest; a bind source goes through the share
    assert out["mounts"][1]["source"] == GUEST_SHM
    assert out["mounts"][2]["source"] == "/run/podshim/share/c1/mounts/0"
    assert [(b.source, b.field, b.recursive, b.readonly) for b in g.binds] == [
        ("/var/lib/c/hosts", "mounts[2]", True, False)
    ]
    assert spec["linux"]["resources"]["memory"]["swap"] == 33554432  # input untouched


def test_drop_swap_of_an_update() -> None:
    res: dict[str, Any] = {"memory": {"limit": 1 << 26, "swap": 1 << 27}, "cpu": {"shares": 2}}
    guestspec.drop_swap(res)
    assert res == {"memory": {"limit": 1 << 26}, "cpu": {"shares": 2}}
    guestspec.drop_swap({"cpu": {}})  # nothing to drop


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s.update(hooks={"prestart": [{"path": "/bin/x"}]}), "hooks.prestart"),
        (lambda s: s["linux"].update(devices=[{"path": "/dev/kvm"}]), "linux.devices[0]"),
        (lambda s: s["linux"]["resources"].update(
            hugepageLimits=[{"pageSize": "2MB", "limit": 1}]), "linux.resources.hugepageLimits[0]"),
        (lambda s: s["linux"]["namespaces"].append({"type": "user"}), "linux.namespaces[5] (user)"),
        (lambda s: s["linux"]["namespaces"].__setitem__(
            2, {"type": "network", "path": "/proc/1/ns/net"}), "linux.namespaces[2] (network)"),
        (lambda s: s["mounts"].append({"destination": "/x", "type": "nfs", "source": "h:/x"}),
         "mounts[3].type"),
    ],
)  # fmt: skip
def test_what_a_vm_cannot_honour_is_refused_naming_the_field(edit: Any, field: str) -> None:
    spec = cri_spec()
    edit(spec)
    with pytest.raises(errdefs.InvalidArgument) as err:
        rewrite(spec)
    assert str(err.value).startswith(field), err.value
