"""Where a pod's cgroup lands when kubelet names its parent, in both of kubelet's forms.

kubelet with the systemd cgroup driver (kubeadm's default) sends parents such as
``/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice``;
containerd's CRI turns a ``.slice`` parent into ``<last element>:cri-containerd:<id>``
even with ``SystemdCgroup = false``, and runc's cgroupfs driver puts that relative path
below its caller's cgroup. kubelet's cgroupfs driver sends ``/kubepods/besteffort/pod<uid>``.
Each test runs a runc pod (the reference: its pause process shows where runc put the
sandbox cgroup) and a podshim pod under the same parent, with and without a shared PID
namespace, and checks that podshim's sandbox cgroup (and its PID init) is exactly where
runc's is, and that the containers land alike.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from podshim.host.namespaces import cgroup
from podshim_lab import wait_for

if TYPE_CHECKING:
    from tests.integration import criprocs as cp
    from tests.integration import criutil as cu
else:
    import criprocs as cp
    import criutil as cu

cri_lab = cu.cri_lab
cri = cu.cri


def cgroups_of(pid: int) -> dict[str, str]:
    """{hierarchy mount point: directory of ``pid`` there}."""
    return {m: os.path.join(m, p.lstrip("/")) for m, p in cu.own_cgroup_dirs(pid).items()}


@pytest.fixture(params=["systemd", "cgroupfs"])
def parent(request: pytest.FixtureRequest) -> Iterator[str]:
    """A pod cgroup parent as kubelet sends it with its systemd or cgroupfs driver."""
    uid = f"{secrets.token_hex(4)}-{secrets.token_hex(2)}"
    if request.param == "systemd":
        yield (
            "/kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
        )
        return
    path = f"/kubepods/besteffort/pod{uid}"
    yield path
    # runc makes the parents and leaves them (kubelet owns them); remove them if empty
    for rel in (path, "/kubepods/besteffort", "/kubepods"):
        for h in cgroup.hierarchies():
            d = os.path.join(h.mountpoint, rel.lstrip("/"))
            if os.path.isdir(d):
                try:
                    os.rmdir(d)
                except OSError:
                    pass


@pytest.mark.parametrize("pid_mode", ["POD", "CONTAINER"])
def test_pod_cgroup_lands_where_runc_puts_it(cri: cu.CriLab, parent: str, pid_mode: str) -> None:
    host = f"cg-{secrets.token_hex(3)}"
    ref, _ = cri.pod("cg-runc", cu.RUNC, hostname=host, cgroup_parent=parent, pid_mode=pid_mode)
    pod, _ = cri.pod("cg-shim", cu.PODSHIM, hostname=host, cgroup_parent=parent, pid_mode=pid_mode)
    ref_c = cri.container(ref, "c", ["sleep", "3600"])
    pod_c = cri.container(pod, "c", ["sleep", "3600"])

    pause = cgroups_of(cri.sandbox_pid(ref))
    expected = {m: d.replace(ref, pod) for m, d in pause.items()}
    assert all(ref in d for d in pause.values()), pause  # runc's pause is in its own
    if parent.endswith(".slice"):
        # below containerd's own cgroup (the shims', hence runc's, caller's) as a relative path
        base = cgroups_of(cri.lab.pid or 0)
        leaf = f"{parent.rsplit('/', 1)[-1]}:cri-containerd:{pod}"
        assert expected == {m: os.path.join(base[m], leaf) for m in base}
    for d in expected.values():
        assert os.path.isdir(d), f"no sandbox cgroup {d}; runc's pause is in {pause}"
    assert sorted(cri.task_cgroup_dirs(cri.pods[pod], pod)) == sorted(expected.values())

    if pid_mode == "POD":
        shim = cri.shim_pid(pod)
        inits = wait_for(
            lambda: [s for s in cri.inits() if s.ppid == shim and s.state != "Z"] or None,
            timeout=cu.DEADLINE,
            message=f"the {cu.INIT_COMM} of pod {pod}",
        )
        assert len(inits) == 1, cp.describe(inits)
        assert cgroups_of(inits[0].pid) == expected
    else:
        assert not [s for s in cri.inits() if s.ppid == cri.shim_pid(pod)]

    # the containers' cgroups are runc's business in both pods, and alike
    got = cgroups_of(pod_c.pid)
    want = {m: d.replace(ref_c.id, pod_c.id) for m, d in cgroups_of(ref_c.pid).items()}
    assert got == want
