"""Execs in a namespaces pod host are tracked by a cgroup of their own, not by their
process group: a process an exec started that called ``setsid`` (a new session and
process group) dies with the exec, with the host's close and with the crash cleanup
(it used to escape all three). Root, real cgroups and namespaces."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest

from podshim.host.control import ExecControl
from podshim.host.namespaces import cgroup as cg
from podshim.host.namespaces import execcg
from podshim.host.namespaces.cleanup import cleanup_sandbox
from podshim.host.namespaces.host import NamespacesHost
from podshim.linux.reaper import Reaper

from . import test_nshost_live as live
from .nshostutil import poll, run
from .test_nshost_live import ROOT, Env, cgroup_dirs, cgroup_mounts, gone

env = live.env  # the fixture

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not ROOT, reason="needs root")]

#: an exec that starts ``sleep`` in a session of its own, writing that pid to $1 first
SETSID = (
    'setsid sh -c \'echo $$ > "$1"; exec sleep 1000\' sh "$1" </dev/null >/dev/null 2>&1 & '
    'while [ ! -s "$1" ]; do sleep 0.05; done; '
)


def spec(e: Env) -> dict[str, object]:
    return e.spec(namespaces=[{"type": "ipc"}, {"type": "uts"}, {"type": "network"}])


def session(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[3])


def cgroup_of(pid: int) -> dict[str, str]:
    return cg.own_cgroups(f"/proc/{pid}/cgroup")


def adopt(e: Env) -> list[str]:
    """Make the pod's cgroup before the pod: the host adopts it (never empties it)."""
    dirs = [os.path.join(m, e.cgroup_path.lstrip("/")) for m in cgroup_mounts()]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        if os.path.exists(os.path.join(d, "cpuset.cpus")):  # cannot take tasks while empty
            cg.SandboxCgroup._cpuset_from_parent(os.path.dirname(d), d)
    return dirs


def exec_dirs(e: Env) -> list[str]:
    return [
        os.path.join(d, name)
        for d in cgroup_dirs(e.cgroup_path)
        for name in os.listdir(d)
        if name.startswith(execcg.PREFIX)
    ]


async def started(pidfile: Path) -> int:
    await poll(lambda: pidfile.exists() and pidfile.read_text().strip() != "", "the setsid child")
    return int(pidfile.read_text())


def kill_left(pidfile: Path) -> None:
    """After a failed check: the sleep must not outlive the test."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_a_setsid_child_dies_with_its_exec(env: Env, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"

    async def main() -> None:
        r = Reaper()
        r.start()
        host = NamespacesHost(env.pod_id, "k8s.io", spec(env), r, state_root=str(env.state_root))
        try:
            await host.create()
            c = ExecControl("s1")
            call = asyncio.ensure_future(host.exec_in_host(
                ["sh", "-c", SETSID + "exec sleep 1000", "sh", str(pidfile)], "", "", "", False, c
            ))  # fmt: skip
            child = await started(pidfile)
            leader = c.pid
            assert session(child) == child != session(leader)  # out of the exec's group
            own = cgroup_of(child)["pids"]
            assert own == cgroup_of(leader)["pids"]
            assert own.startswith(env.cgroup_path + "/" + execcg.PREFIX), own
            assert len(exec_dirs(env)) == len(cgroup_mounts())
            os.kill(leader, signal.SIGTERM)  # the exec ends: what it started goes too
            assert await asyncio.wait_for(call, 30) == 128 + signal.SIGTERM
            await poll(lambda: gone(child), "the setsid child to die with its exec")
            assert exec_dirs(env) == []
            assert not (env.state_dir / execcg.EXEC_RECORD).exists()
            await host.close()
            env.assert_nothing_left()
        finally:
            kill_left(pidfile)
            with contextlib.suppress(Exception):
                await host.close()
            r.stop()

    run(main)


def test_host_close_kills_a_setsid_child_in_an_adopted_cgroup(env: Env, tmp_path: Path) -> None:
    """The sandbox cgroup existed before the pod, so the host never empties it: the
    exec's own cgroup below it is what finds the setsid child."""
    pidfile = tmp_path / "child.pid"
    adopted = adopt(env)

    async def main() -> None:
        r = Reaper()
        r.start()
        host = NamespacesHost(env.pod_id, "k8s.io", spec(env), r, state_root=str(env.state_root))
        try:
            await host.create()
            c = ExecControl("s2")
            call = asyncio.ensure_future(host.exec_in_host(
                ["sh", "-c", SETSID + "exec sleep 1000", "sh", str(pidfile)], "", "", "", False, c
            ))  # fmt: skip
            child = await started(pidfile)
            assert session(child) == child != session(c.pid)
            await asyncio.wait_for(host.close(), 60)  # no error: nothing is left
            assert await asyncio.wait_for(call, 30) == 128 + signal.SIGKILL
            await poll(lambda: gone(child), "the setsid child to die with the host")
            assert exec_dirs(env) == []
            assert all(os.path.isdir(d) for d in adopted)  # adopted: left alone
            assert not env.state_dir.exists()
        finally:
            kill_left(pidfile)
            with contextlib.suppress(Exception):
                await host.close()
            r.stop()

    run(main)


def test_crash_cleanup_kills_a_setsid_child_of_an_exec(env: Env, tmp_path: Path) -> None:
    """The shim died with an exec running (the test calls the ``delete`` action's
    cleanup instead of killing itself): the recorded exec cgroups are emptied and
    removed, the adopted sandbox cgroup is not."""
    pidfile = tmp_path / "child.pid"
    adopted = adopt(env)

    async def main() -> None:
        r = Reaper()
        r.start()
        host = NamespacesHost(env.pod_id, "k8s.io", spec(env), r, state_root=str(env.state_root))
        try:
            await host.create()
            c = ExecControl("s3")
            call = asyncio.ensure_future(host.exec_in_host(
                ["sh", "-c", SETSID + "exec sleep 1000", "sh", str(pidfile)], "", "", "", False, c
            ))  # fmt: skip
            child = await started(pidfile)
            leader = c.pid
            assert set(execcg.recorded(str(env.state_dir))) == set(exec_dirs(env))
            problems = cleanup_sandbox("k8s.io", env.pod_id, {}, str(env.state_root))
            assert problems == []
            await poll(lambda: gone(child), "the setsid child to be killed by the cleanup")
            assert await asyncio.wait_for(call, 30) == 128 + signal.SIGKILL
            assert gone(leader)
            assert exec_dirs(env) == []
            assert all(os.path.isdir(d) for d in adopted)
            assert not env.state_dir.exists()
        finally:
            kill_left(pidfile)
            with contextlib.suppress(Exception):
                await host.close()
            r.stop()

    run(main)
