"""The namespaces pod host: spec checks (pure); real namespaces, cgroups and init (root)
are in ``test_nshost_live.py``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from podshim import errors as errdefs
from podshim.host.namespaces import cgroup as cg
from podshim.host.namespaces import plan as plan_mod
from podshim.host.namespaces.host import NamespacesHost
from podshim.host.namespaces.plan import classify_sysctl, plan_from_spec
from podshim.linux.reaper import Reaper

from .nshostutil import run

# -- pure checks ---------------------------------------------------------------------


def test_sysctl_classification() -> None:
    def own(key: str, pod_id: str = "") -> str:
        return classify_sysctl(key, net=True, ipc=True, uts=True, pod_id=pod_id)

    assert own("net.ipv4.ip_forward") == "network"
    assert own("net.core.somaxconn") == "network"
    for key in ("kernel.shmmni", "kernel.shmmax", "kernel.shm_rmid_forced", "kernel.msgmax"):
        assert own(key) == "ipc"
    assert own("kernel.sem") == "ipc"
    assert own("fs.mqueue.msg_max") == "ipc"
    assert own("kernel.domainname") == "uts"
    with pytest.raises(errdefs.InvalidArgument, match=r'"kernel.hostname".*hostname'):
        own("kernel.hostname")
    with pytest.raises(errdefs.InvalidArgument, match=r'"kernel\.panic" is not in a separate'):
        own("kernel.panic", "p1")
    with pytest.raises(errdefs.InvalidArgument, match="not in a separate kernel namespace"):
        own("vm.swappiness")
    with pytest.raises(errdefs.InvalidArgument, match="not in a separate kernel namespace"):
        own("kernel.semaphore_thing")
    with pytest.raises(errdefs.InvalidArgument, match="not allowed in host network namespace"):
        classify_sysctl("net.ipv4.ip_forward", net=False, ipc=True, uts=True)
    with pytest.raises(errdefs.InvalidArgument, match="not allowed in host IPC namespace"):
        classify_sysctl("kernel.shmmni", net=True, ipc=False, uts=True)
    with pytest.raises(errdefs.InvalidArgument, match="not allowed in host UTS namespace"):
        classify_sysctl("kernel.domainname", net=True, ipc=True, uts=False)
    for bad in ("net/ipv4/ip_forward", "NET.ipv4.x", "net..x", ".net", "net.x;rm", "", "a b"):
        with pytest.raises(errdefs.InvalidArgument, match="not a valid sysctl name"):
            own(bad)


def test_cgroups_path_validation() -> None:
    assert cg.validate_cgroups_path("") == ""
    assert cg.validate_cgroups_path("/k8s.io/abc") == "/k8s.io/abc"
    assert cg.validate_cgroups_path("//k8s.io//abc/") == "/k8s.io/abc"
    # relative paths (containerd's form of a .slice parent) join the shim's own cgroup
    # as runc's cgroupfs driver does: kept relative, cleaned like Go's filepath.Clean
    sd = "kubepods-burstable-pod1_2.slice:cri-containerd:abc"
    assert cg.validate_cgroups_path(sd, "p1") == sd
    assert cg.validate_cgroups_path("k8s.io/abc") == "k8s.io/abc"
    assert cg.validate_cgroups_path("../k8s.io/./x/../abc") == "k8s.io/abc"
    assert cg.validate_cgroups_path("/k8s.io/../etc") == "/etc"
    with pytest.raises(errdefs.InvalidArgument, match="root cgroup"):
        cg.validate_cgroups_path("/")
    with pytest.raises(errdefs.InvalidArgument, match="root cgroup"):
        cg.validate_cgroups_path("/a/..")
    for own in (".", "a/..", "../.."):  # never adopt the shim's (containerd's) own cgroup
        with pytest.raises(errdefs.InvalidArgument, match="shim's own cgroup"):
            cg.validate_cgroups_path(own)
    for bad in ("/a/b c", "/a/b\nc", "/a/$x"):
        with pytest.raises(errdefs.InvalidArgument, match="invalid component"):
            cg.validate_cgroups_path(bad)
    assert cg.shares_to_weight(2) == 1
    assert cg.shares_to_weight(262144) == 10000
    assert cg.shares_to_weight(1024) == 39


def test_resources_from_spec_annotations_override() -> None:
    spec: dict[str, Any] = {
        "linux": {"resources": {"cpu": {"shares": 2}, "memory": {"limit": 0}}},
        "annotations": {
            cg.ANN_CPU_SHARES: "512",
            cg.ANN_CPU_QUOTA: "50000",
            cg.ANN_CPU_PERIOD: "100000",
            cg.ANN_MEMORY: "268435456",
        },
    }
    assert cg.resources_from_spec(spec) == cg.Resources(512, 50000, 100000, 268435456)
    spec["annotations"] = {cg.ANN_CPU_SHARES: "0"}
    assert cg.resources_from_spec(spec) == cg.Resources(cpu_shares=2)
    assert cg.resources_from_spec({}).empty()
    with pytest.raises(errdefs.InvalidArgument, match="not an integer"):
        cg.resources_from_spec({"annotations": {cg.ANN_MEMORY: "lots"}}, "p1")
    with pytest.raises(errdefs.InvalidArgument, match="cpu period"):
        cg.resources_from_spec({"annotations": {cg.ANN_CPU_PERIOD: "10"}})


def test_plan_rejects_what_it_cannot_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def ns(*entries: dict[str, str]) -> dict[str, Any]:
        return {"linux": {"namespaces": list(entries)}}

    for t in ("user", "cgroup", "time", "bogus"):
        with pytest.raises(
            errdefs.InvalidArgument, match=f"podshim cannot pin a {t} namespace for pod p1"
        ):
            plan_from_spec(ns({"type": t}), "p1")
    for t in ("ipc", "uts", "pid"):
        with pytest.raises(errdefs.InvalidArgument, match=f"given {t} namespace"):
            plan_from_spec(ns({"type": t, "path": "/proc/1/ns/" + t}), "p1")
    missing = str(tmp_path / "no-such-netns")
    with pytest.raises(errdefs.InvalidArgument, match="No such file"):
        plan_from_spec(ns({"type": "network", "path": missing}), "p1")
    with pytest.raises(errdefs.InvalidArgument, match="is the host's"):
        plan_from_spec(ns({"type": "network", "path": "/proc/self/ns/net"}), "p1")
    # (which files are network namespaces: test_netns_must_be_a_network_namespace)
    monkeypatch.setattr(plan_mod, "check_netns", lambda path, pod_id: None)
    with pytest.raises(errdefs.InvalidArgument, match="listed twice"):
        plan_from_spec(ns({"type": "ipc"}, {"type": "ipc"}), "p1")
    with pytest.raises(errdefs.InvalidArgument, match="without a UTS namespace"):
        plan_from_spec({"hostname": "h", **ns({"type": "ipc"})}, "p1")
    with pytest.raises(errdefs.InvalidArgument, match="host network namespace"):
        plan_from_spec({"linux": {"namespaces": [], "sysctl": {"net.ipv4.ip_forward": "1"}}}, "p")

    plan = plan_from_spec(
        {
            "hostname": "h",
            "process": {"oomScoreAdj": -998},
            "linux": {
                "namespaces": [
                    {"type": "pid"},
                    {"type": "ipc"},
                    {"type": "uts"},
                    {"type": "mount"},
                    {"type": "network", "path": str(tmp_path)},
                ],
                "sysctl": {"kernel.shmmni": "1000", "net.ipv4.ip_forward": "1"},
                "cgroupsPath": "/k8s.io/x",
            },
        },
        "p1",
    )
    assert plan.pins == ["ipc", "uts"]
    assert plan.netns == str(tmp_path)
    assert plan.pid
    assert plan.oom_score_adj == -998
    assert plan.sysctls == [
        ("kernel.shmmni", "1000", "ipc"),
        ("net.ipv4.ip_forward", "1", "network"),
    ]
    # a netns without a path is made (and pinned) by the host
    assert plan_from_spec(ns({"type": "network"}), "p1").pins == ["network"]


def test_missing_init_binary_is_failed_precondition(tmp_path: Path) -> None:
    async def main() -> None:
        r = Reaper()
        r.start()
        spec: dict[str, Any] = {"linux": {"namespaces": [{"type": "pid"}]}}
        host = NamespacesHost(
            "p1",
            "ns",
            spec,
            r,
            state_root=str(tmp_path),
            init_binary=str(tmp_path / "no-podshim-init"),
        )
        try:
            await host.create()
            with pytest.raises(errdefs.FailedPrecondition, match="podshim-init not found"):
                await host.namespace_path("pid")
            assert host.init_pid == 0
            assert await host.namespace_path("ipc") is None
            assert await host.namespace_path("network") is None
            with pytest.raises(errdefs.FailedPrecondition, match="bind the path"):
                await host.share("/a", "/b", True)
            assert await host.exec_in_host(["true"], "", "", "", False) == 0
            assert await host.dump_stacks() == ""
            assert await host.stats() is None
        finally:
            await host.close()
            r.stop()
        assert not (tmp_path / "ns" / "p1").exists()

    run(main)


def test_cgroup_hierarchies_from_mountinfo(tmp_path: Path) -> None:
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "36 31 0:32 /sub /mnt/memory-again rw - cgroup cgroup rw,memory\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    hs = cg.hierarchies(mountinfo=str(hybrid))
    assert [(h.mountpoint, h.version, sorted(h.controllers)) for h in hs] == [
        ("/sys/fs/cgroup/cpu,cpuacct", 1, ["cpu", "cpuacct"]),
        ("/sys/fs/cgroup/memory", 1, ["memory"]),
        ("/sys/fs/cgroup/systemd", 1, ["name=systemd"]),
        ("/sys/fs/cgroup/unified", 2, []),
    ]
    unified = tmp_path / "unified"
    unified.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "31 23 0:28 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    assert [(h.mountpoint, h.version) for h in cg.hierarchies(mountinfo=str(unified))] == [
        ("/sys/fs/cgroup", 2)
    ]


def test_relative_cgroups_path_joins_own_cgroup_per_hierarchy(tmp_path: Path) -> None:
    """runc's cgroupfs driver puts a relative path below runc's own cgroup in each
    hierarchy (runc runs as the shim's child, in the shim's cgroup): so does podshim."""
    hs = cg.hierarchies()
    if not hs:
        pytest.skip("no cgroup hierarchy mounted")
    lines = []
    for i, h in enumerate(hs):
        ctl = cg.hierarchy_key(h)
        lines.append(f"{0 if h.version == 2 else i + 1}:{ctl}:/ctr-{i}/shim")
    proc = tmp_path / "cgroup"
    proc.write_text("\n".join(lines) + "\n")
    rel = "kubepods-besteffort-podab_cd.slice:cri-containerd:p1"
    sc = cg.SandboxCgroup(rel, pod_id="p1", proc_cgroup=str(proc))
    chains = sc.chains()
    assert [h for h, _ in chains] == hs
    for i, (h, chain) in enumerate(chains):
        assert chain == [f"{h.mountpoint}/ctr-{i}/shim/{rel}"]
    absolute = cg.SandboxCgroup("/k8s.io/p1", pod_id="p1", proc_cgroup=str(proc))
    assert [c for _h, c in absolute.chains()] == [
        [f"{h.mountpoint}/k8s.io", f"{h.mountpoint}/k8s.io/p1"] for h in hs
    ]
    # a hierarchy this process is not in: refused, never guessed
    proc.write_text(lines[0] + "\n")
    if len(hs) > 1:
        with pytest.raises(errdefs.FailedPrecondition, match="not in"):
            cg.SandboxCgroup(rel, pod_id="p1", proc_cgroup=str(proc)).chains()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ip netns add)")
def test_netns_must_be_a_network_namespace_not_the_hosts(tmp_path: Path) -> None:
    """A sandbox's network namespace path must name a network namespace, and never the
    host's (a pod asks for host networking by leaving the namespace out)."""
    regular = tmp_path / "file"
    regular.write_text("")
    refused = {
        str(regular): "not a network namespace",
        "/proc/self/ns/ipc": "not a network namespace",
        # (PID 1's namespace files are not ours to open on some machines: refused anyway)
        "/proc/1/ns/net": "is the host's|Permission denied",
        "/proc/self/ns/net": "is the host's",
        str(tmp_path): "not a network namespace",
        "relative/netns": "network namespace path",
    }
    for path, why in refused.items():
        with pytest.raises(errdefs.InvalidArgument, match=why):
            plan_mod.check_netns(path, "p1")
    name = f"podshim-t-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        plan_mod.check_netns(f"/run/netns/{name}", "p1")  # a pod's own: fine
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)
