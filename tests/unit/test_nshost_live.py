"""The namespaces pod host with real namespaces, cgroups and init (root); the pure spec
checks are in ``test_nshost.py``."""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from podshim import errors as errdefs
from podshim.host.namespaces import cgroup as cg
from podshim.host.namespaces.host import NamespacesHost
from podshim.linux.reaper import Reaper, set_child_subreaper

from .nshostutil import poll, run

ROOT = os.geteuid() == 0
CGROUP_ROOT = "/sys/fs/cgroup"

# -- with real namespaces (root) -------------------------------------------------------


def mounts_under(root: Path) -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount at or below ``root``."""
    out = []
    real = os.path.realpath(root)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = left.split()[4].replace("\\040", " ")
            if mnt == real or mnt.startswith(real + "/"):
                out.append((mnt, right.split()[0]))
    return out


def cgroup_mounts() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] in ("cgroup", "cgroup2"):
                mnt = left.split()[4]
                if mnt.startswith(CGROUP_ROOT):
                    out.append(mnt)
    return out


def cgroup_dirs(path: str) -> list[str]:
    return [m + path for m in cgroup_mounts() if os.path.isdir(m + path)]


def ino(path: str) -> int:
    return os.stat(path).st_ino


def status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            fields[k] = v.strip()
    return fields


def children_of(ppid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if status(int(name)).get("PPid") == str(ppid):
                kids.append(int(name))
        except OSError:
            continue
    return kids


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def gone(pid: int) -> bool:
    """True once ``pid`` is reaped (a zombie still counts as there)."""
    return not os.path.exists(f"/proc/{pid}")


@dataclass
class Env:
    tmp: Path
    netns: str
    cgroup_path: str
    pod_id: str
    pids: list[int] = field(default_factory=list)

    @property
    def state_root(self) -> Path:
        return self.tmp / "state"

    @property
    def state_dir(self) -> Path:
        return self.state_root / "k8s.io" / self.pod_id

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    def spec(self, **over: Any) -> dict[str, Any]:
        """A sandbox spec like CRI's (namespaces pid, ipc, uts, mount, network=path)."""
        spec: dict[str, Any] = {
            "hostname": "pod-host",
            "process": {"oomScoreAdj": 500},
            "annotations": {
                cg.ANN_CPU_SHARES: "512",
                cg.ANN_CPU_QUOTA: "50000",
                cg.ANN_CPU_PERIOD: "100000",
                cg.ANN_MEMORY: str(256 << 20),
            },
            "linux": {
                "namespaces": [
                    {"type": "pid"},
                    {"type": "ipc"},
                    {"type": "uts"},
                    {"type": "mount"},
                    {"type": "network", "path": self.netns_path},
                ],
                "sysctl": {
                    "net.ipv4.ip_unprivileged_port_start": "1000",
                    "kernel.shmmni": "1000",
                },
                "cgroupsPath": self.cgroup_path,
                "resources": {"cpu": {"shares": 2}},
            },
        }
        for k, v in over.items():
            if k in ("namespaces", "sysctl", "cgroupsPath", "resources"):
                spec["linux"][k] = v
            else:
                spec[k] = v
        return spec

    def host(self, reaper: Reaper, spec: dict[str, Any]) -> NamespacesHost:
        return NamespacesHost(self.pod_id, "k8s.io", spec, reaper, state_root=str(self.state_root))

    def assert_nothing_left(self) -> None:
        assert mounts_under(self.state_root) == []
        assert not self.state_dir.exists()
        assert cgroup_dirs(self.cgroup_path) == []


def _unset_child_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 0, 0, 0, 0)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    if not ROOT:
        pytest.skip("needs root")
    tag = secrets.token_hex(4)
    e = Env(tmp_path, f"podshim-t-{tag}", f"/podshim-t-{tag}", f"pod-{tag}")
    subprocess.run(["ip", "netns", "add", e.netns], check=True)
    # the shim is a child subreaper: the pod's init is reparented to it
    set_child_subreaper()
    try:
        yield e
    finally:
        _unset_child_subreaper()
        for pid in e.pids:  # an init a failed test left running
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for mnt, _ in sorted(mounts_under(e.state_root), reverse=True):
            subprocess.run(["umount", "-l", mnt], check=False)
        for d in sorted(cgroup_dirs(e.cgroup_path), reverse=True):
            try:
                os.rmdir(d)
            except OSError:
                pass
        subprocess.run(["ip", "netns", "delete", e.netns], check=False)


def read(path: str | Path) -> str:
    with open(path) as f:
        return f.read().strip()


@pytest.mark.integration
@pytest.mark.skipif(not ROOT, reason="needs root")
def test_create_pins_namespaces_sets_sysctls_and_cgroup(env: Env) -> None:
    host_port_start = read("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    host_shmmni = read("/proc/sys/kernel/shmmni")

    async def main() -> None:
        r = Reaper()
        r.start()
        host = env.host(r, env.spec())
        try:
            await host.create()
            ipc = await host.namespace_path("ipc")
            uts = await host.namespace_path("uts")
            assert ipc == str(env.state_dir / "ipc")
            assert uts == str(env.state_dir / "uts")
            assert await host.namespace_path("network") == env.netns_path
            assert await host.namespace_path("mount") is None
            assert host.init_pid == 0  # no init until someone asks for "pid"
            assert sorted(mounts_under(env.state_root)) == [(ipc, "nsfs"), (uts, "nsfs")]
            assert ino(uts) != ino("/proc/self/ns/uts")
            assert ino(ipc) != ino("/proc/self/ns/ipc")

            res = await r.run(["nsenter", f"--uts={uts}", "hostname"])
            assert (res.status, res.stdout) == (0, b"pod-host\n")
            res = await r.run(
                [
                    "nsenter",
                    f"--net={env.netns_path}",
                    "cat",
                    "/proc/sys/net/ipv4/ip_unprivileged_port_start",
                ]
            )
            assert (res.status, res.stdout) == (0, b"1000\n")
            res = await r.run(["nsenter", f"--ipc={ipc}", "cat", "/proc/sys/kernel/shmmni"])
            assert (res.status, res.stdout) == (0, b"1000\n")
            # ... and not on the host
            assert read("/proc/sys/net/ipv4/ip_unprivileged_port_start") == host_port_start
            assert read("/proc/sys/kernel/shmmni") == host_shmmni

            dirs = cgroup_dirs(env.cgroup_path)
            cpu = f"{CGROUP_ROOT}/cpu{env.cgroup_path}"
            mem = f"{CGROUP_ROOT}/memory{env.cgroup_path}"
            assert cpu in dirs and mem in dirs
            assert len(dirs) == len(cgroup_mounts())  # every hierarchy
            assert read(f"{cpu}/cpu.shares") == "512"
            assert read(f"{cpu}/cpu.cfs_quota_us") == "50000"
            assert read(f"{cpu}/cpu.cfs_period_us") == "100000"
            assert read(f"{mem}/memory.limit_in_bytes") == str(256 << 20)

            # without an init, wait() blocks until close() and then says 0
            waiter = asyncio.ensure_future(host.wait())
            await asyncio.sleep(0.2)
            assert not waiter.done()
            await host.close()
            assert await asyncio.wait_for(waiter, 30) == 0
            env.assert_nothing_left()
            await host.close()  # idempotent
            # CRI's network namespace is not ours to remove
            assert os.path.exists(env.netns_path)
            assert ino(env.netns_path) != ino("/proc/self/ns/net")
            with pytest.raises(errdefs.FailedPrecondition, match="closed"):
                await host.namespace_path("pid")
        finally:
            await host.close()
            r.stop()

    run(main)


@pytest.mark.integration
@pytest.mark.skipif(not ROOT, reason="needs root")
def test_invalid_specs_leave_nothing(env: Env) -> None:
    async def main() -> None:
        r = Reaper()
        r.start()
        cases: list[tuple[dict[str, Any], str]] = [
            (env.spec(sysctl={"kernel.panic": "1"}), '"kernel.panic" is not in a separate'),
            (
                env.spec(namespaces=[{"type": "user"}, {"type": "ipc"}]),
                f"podshim cannot pin a user namespace for pod {env.pod_id}",
            ),
            (env.spec(namespaces=[{"type": "ipc", "path": "/proc/1/ns/ipc"}]), "given ipc"),
            (
                env.spec(namespaces=[{"type": "network", "path": env.netns_path + "-gone"}]),
                "No such file",
            ),
            (env.spec(cgroupsPath="/a/b c"), "invalid component"),
            (
                env.spec(namespaces=[{"type": "ipc"}], hostname=""),
                "not allowed in host network namespace",
            ),
            # these fail only after pins, sysctls (and the cgroup) were made: undone
            (env.spec(sysctl={"net.ipv4.no_such_knob": "1"}), "net.ipv4.no_such_knob"),
            (
                env.spec(annotations={cg.ANN_CPU_QUOTA: str(1 << 60)}),
                "cpu.cfs_quota_us",
            ),
        ]
        try:
            for spec, message in cases:
                host = env.host(r, spec)
                try:
                    with pytest.raises(errdefs.InvalidArgument, match=message):
                        await host.create()
                    env.assert_nothing_left()
                finally:
                    await host.close()
            # a host-network pod (no network and no uts namespace) is fine
            host = env.host(
                r,
                env.spec(
                    namespaces=[{"type": "ipc"}, {"type": "pid"}],
                    hostname="",
                    sysctl={"kernel.shmmni": "1000"},
                ),
            )
            try:
                await host.create()
                assert await host.namespace_path("network") is None
                assert await host.namespace_path("uts") is None
                assert await host.namespace_path("ipc") == str(env.state_dir / "ipc")
            finally:
                await host.close()
            env.assert_nothing_left()
        finally:
            r.stop()

    run(main)


@pytest.mark.integration
@pytest.mark.skipif(not ROOT, reason="needs root")
def test_pid_init_is_hardened_reaps_orphans_and_its_death_ends_the_host(env: Env) -> None:
    async def main() -> None:
        r = Reaper()
        r.start()
        # the network namespace is the host's own this time (no path): made and pinned
        spec = env.spec(
            namespaces=[{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network"}]
        )
        host = env.host(r, spec)
        try:
            await host.create()
            net = await host.namespace_path("network")
            ipc = await host.namespace_path("ipc")
            uts = await host.namespace_path("uts")
            assert net == str(env.state_dir / "net")
            assert ipc is not None and uts is not None
            assert ino(net) != ino("/proc/self/ns/net")
            res = await r.run(["nsenter", f"--net={net}", "ip", "-o", "link", "show", "lo"])
            assert res.status == 0 and b",UP" in res.stdout, res.stdout
            waiter = asyncio.ensure_future(host.wait())  # pending before the init exists

            paths = await asyncio.gather(*(host.namespace_path("pid") for _ in range(4)))
            pid = host.init_pid
            assert pid > 0
            env.pids.append(pid)
            assert set(paths) == {f"/proc/{pid}/ns/pid"}
            assert await host.namespace_path("pid") == paths[0]
            inits = [p for p in children_of(os.getpid()) if comm(p) == "podshim-init"]
            assert inits == [pid]
            res = await r.run(["ps", "-e", "-o", "pid=,comm="])
            assert [ln.split()[0] for ln in res.stdout.decode().splitlines()].count(str(pid)) == 1

            # hardened: empty read-only root, no capabilities, no fds
            assert os.listdir(f"/proc/{pid}/root") == []
            mi = read(f"/proc/{pid}/mountinfo").splitlines()
            assert len(mi) == 1 and " / / ro," in mi[0] and " - tmpfs " in mi[0], mi
            st = status(pid)
            for cap in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
                assert int(st[cap], 16) == 0, (cap, st[cap])
            assert st["NoNewPrivs"] == "1"
            assert st["NSpid"].split() == [str(pid), "1"]
            assert os.listdir(f"/proc/{pid}/fd") == []
            # a short fixed command line, as pause has, and no environment
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert f.read().rstrip(b"\0") == b"podshim-init"
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert set(f.read()) <= {0}
            assert read(f"/proc/{pid}/oom_score_adj") == "500"

            # in the pod's namespaces and cgroup
            assert ino(f"/proc/{pid}/ns/net") == ino(net)
            assert ino(f"/proc/{pid}/ns/ipc") == ino(ipc)
            assert ino(f"/proc/{pid}/ns/uts") == ino(uts)
            assert ino(f"/proc/{pid}/ns/pid") != ino("/proc/self/ns/pid")
            assert ino(f"/proc/{pid}/ns/mnt") != ino("/proc/self/ns/mnt")
            groups = read(f"/proc/{pid}/cgroup").splitlines()
            assert groups and all(g.split(":", 2)[2] == env.cgroup_path for g in groups), groups

            # an orphan in its PID namespace is reparented to it and reaped by it
            res = await r.run(
                [
                    "nsenter",
                    "-t",
                    str(pid),
                    "-p",
                    "--",
                    "sh",
                    "-c",
                    "sleep 1000 </dev/null >/dev/null 2>&1 & exec true",
                ]
            )
            assert res.status == 0, res.stderr
            await poll(lambda: children_of(pid) != [], "the orphan to be the init's child")
            (orphan,) = children_of(pid)
            assert comm(orphan) == "sleep"
            os.kill(orphan, signal.SIGKILL)
            await poll(lambda: gone(orphan), "the init to reap the killed orphan")
            assert host.init_pid == pid and not waiter.done()

            # the init's death is the host's
            os.kill(pid, signal.SIGKILL)
            assert await asyncio.wait_for(waiter, 30) == 137
            assert await host.wait() == 137
            assert host.init_pid == 0
            with pytest.raises(errdefs.FailedPrecondition, match="exited"):
                await host.namespace_path("pid")
            await host.close()
            await host.close()
            env.assert_nothing_left()
            assert gone(pid)
        finally:
            await host.close()
            r.stop()

    run(main)


@pytest.mark.integration
@pytest.mark.skipif(not ROOT, reason="needs root")
def test_close_kills_a_live_init_and_removes_everything(env: Env) -> None:
    async def main() -> None:
        r = Reaper()
        r.start()
        host = env.host(r, env.spec())
        try:
            await host.create()
            path = await host.namespace_path("pid")
            pid = host.init_pid
            env.pids.append(pid)
            assert path == f"/proc/{pid}/ns/pid"
            waiter = asyncio.ensure_future(host.wait())
            await asyncio.gather(host.close(), host.close())
            assert await asyncio.wait_for(waiter, 30) == 137  # SIGKILLed by close
            assert gone(pid)
            assert all(comm(p) != "podshim-init" for p in children_of(os.getpid()))
            env.assert_nothing_left()
            assert os.path.exists(env.netns_path)
        finally:
            await host.close()
            r.stop()

    run(main)
