"""Where the namespaces host puts the pod's cgroup, and what its crash cleanup may touch
(root, real cgroups): kubelet's systemd-form parents placed as runc's cgroupfs driver
places them, adopted cgroups never emptied or removed."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from podshim.host.namespaces import cgroup as cg
from podshim.host.namespaces.cleanup import cleanup_sandbox
from podshim.host.namespaces.host import NamespacesHost
from podshim.linux.reaper import Reaper

from . import test_nshost_live as live
from .nshostutil import poll, run
from .test_nshost_live import ROOT, Env, cgroup_mounts, gone

env = live.env  # the fixture

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not ROOT, reason="needs root")]


def own_cgroup_lines(pid: int | str = "self") -> dict[str, str]:
    """The cgroup of ``pid`` per hierarchy (keyed as :func:`cg.hierarchy_key`)."""
    return cg.own_cgroups(f"/proc/{pid}/cgroup")


def pid_spec(e: Env, cgroups_path: str) -> dict[str, object]:
    return e.spec(
        cgroupsPath=cgroups_path,
        namespaces=[{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network"}],
    )


@pytest.fixture
def rel(env: Env) -> Iterator[str]:
    """containerd's form of kubelet's ``/kubepods.slice/...-pod<uid>.slice`` parent."""
    path = f"kubepods-besteffort-pod{secrets.token_hex(4)}.slice:cri-containerd:{env.pod_id}"
    yield path
    for h in cg.hierarchies():
        d = os.path.join(
            h.mountpoint, own_cgroup_lines().get(cg.hierarchy_key(h), "/").lstrip("/"), path
        )
        if os.path.isdir(d):
            os.rmdir(d)


def test_systemd_form_parent_lands_below_the_shims_own_cgroup(env: Env, rel: str) -> None:
    mine = own_cgroup_lines()

    async def main() -> None:
        r = Reaper()
        r.start()
        host = NamespacesHost(
            env.pod_id, "k8s.io", pid_spec(env, rel), r, state_root=str(env.state_root)
        )
        try:
            await host.create()
            await host.namespace_path("pid")
            pid = host.init_pid
            env.pids.append(pid)
            # the init's cgroup in every hierarchy: this process's own, then the path
            for ctl, path in own_cgroup_lines(pid).items():
                assert path == os.path.join(mine[ctl], rel), (ctl, path, mine[ctl])
            mem = [
                os.path.join(h.mountpoint, mine["memory"].lstrip("/"), rel)
                for h in cg.hierarchies()
                if "memory" in h.controllers
            ]
            assert len(mem) == 1 and os.path.isdir(mem[0])
            with open(os.path.join(mem[0], "memory.limit_in_bytes")) as f:
                assert f.read().strip() == str(256 << 20)
            assert await host.stats() is not None
            await host.close()
            assert not os.path.exists(mem[0])
            env.assert_nothing_left()
        finally:
            await host.close()
            r.stop()

    run(main)


def test_crash_cleanup_kills_only_what_the_pod_made(env: Env) -> None:
    """The sandbox cgroup existed before the pod (adopted): crash cleanup kills the pod's
    init (recorded with its start time) but neither the cgroup's other processes nor the
    cgroup; a cgroup the pod made is emptied and removed."""
    adopted = [os.path.join(m, env.cgroup_path.lstrip("/")) for m in cgroup_mounts()]
    for d in adopted:
        os.makedirs(d, exist_ok=True)
        if os.path.exists(os.path.join(d, "cpuset.cpus")):  # cannot take tasks while empty
            cg.SandboxCgroup._cpuset_from_parent(os.path.dirname(d), d)
    bystander = subprocess.Popen(["sleep", "1000"])
    made_path = env.cgroup_path + "/made"
    try:
        for d in adopted:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(bystander.pid))

        problems: list[str] = []

        async def one(path: str) -> None:
            r = Reaper()
            r.start()
            host = NamespacesHost(
                env.pod_id, "k8s.io", pid_spec(env, path), r, state_root=str(env.state_root)
            )
            try:
                await host.create()
                await host.namespace_path("pid")
                pid = host.init_pid
                env.pids.append(pid)
                # the shim "died": containerd's delete runs the kind's crash cleanup
                problems[:] = cleanup_sandbox("k8s.io", env.pod_id, {}, str(env.state_root))
                await poll(lambda: gone(pid), "the recorded init to be killed")
                assert await asyncio.wait_for(host.wait(), 30) == 128 + signal.SIGKILL
            finally:
                await host.close()
                r.stop()

        run(lambda: one(env.cgroup_path))
        assert problems == []
        assert bystander.poll() is None, "a process of the adopted cgroup was killed"
        assert all(os.path.isdir(d) for d in adopted)
        assert not env.state_dir.exists()

        run(lambda: one(made_path))
        assert problems == []
        assert bystander.poll() is None
        assert not any(os.path.exists(os.path.join(d, "made")) for d in adopted)
    finally:
        bystander.kill()
        bystander.wait()
        for d in adopted:
            made = os.path.join(d, "made")
            if os.path.isdir(made):
                os.rmdir(made)


def test_cleanup_without_records_touches_no_cgroup(tmp_path: Path) -> None:
    """A state directory without records (an older shim's, or a crash before the host
    wrote them) makes crash cleanup kill and remove nothing."""
    state = tmp_path / "k8s.io" / "p1"
    state.mkdir(parents=True)
    assert cleanup_sandbox("k8s.io", "p1", {"linux": {"cgroupsPath": "/"}}, str(tmp_path)) == []
    assert not state.exists()
