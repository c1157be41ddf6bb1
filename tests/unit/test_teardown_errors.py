"""A namespaces pod host whose teardown cannot finish says so (it used to log and answer
success, leaving the remains unrecorded): close() raises Unavailable naming what is
left, keeps it recorded, and finishes on a later call; after a shim crash the
``delete`` action fails while something is left (containerd keeps the bundle and runs
it again) and finishes once it can. Root, real cgroups and namespaces; the sandbox
task's side (Delete answers the error, a retried Delete succeeds) is in
``test_sandbox_faults.py``."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim import rundir
from podshim.host.namespaces import host as nshost
from podshim.host.namespaces.cgroup import CGROUP_RECORD
from podshim.host.namespaces.host import NamespacesHost
from podshim.linux.reaper import Reaper
from podshim.oci import bundle as files
from podshim.shim import delete
from podshim.shim.flags import Flags

from . import test_nshost_live as live
from .nshostutil import run
from .test_nshost_live import ROOT, Env, cgroup_dirs

env = live.env  # the fixture

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not ROOT, reason="needs root")]


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy cgroup is waited for 0.5 s, not 10 s."""
    monkeypatch.setattr(nshost, "CGROUP_TIMEOUT", 0.5)
    monkeypatch.setattr(nshost, "RETRY_TIMEOUT", 0.5)


def spec(e: Env) -> dict[str, object]:
    return e.spec(namespaces=[{"type": "ipc"}, {"type": "uts"}, {"type": "network"}])


def busy(e: Env) -> Path:
    """A child cgroup in the pod's pids cgroup: its rmdir is EBUSY until this goes."""
    (pids,) = [d for d in cgroup_dirs(e.cgroup_path) if "/pids/" in d]
    child = Path(pids) / "busy"
    child.mkdir()
    return child


def test_a_busy_cgroup_fails_close_until_it_is_free(env: Env) -> None:
    async def main() -> None:
        r = Reaper()
        r.start()
        host = NamespacesHost(env.pod_id, "k8s.io", spec(env), r, state_root=str(env.state_root))
        child = None
        try:
            await host.create()
            child = busy(env)
            waiter = asyncio.ensure_future(host.wait())
            for _ in range(2):  # the first attempt and a retry
                with pytest.raises(errdefs.Unavailable) as err:
                    await host.close()
                assert "sandbox cgroup still busy" in str(err.value), err.value
                assert str(child.parent) in str(err.value) and env.pod_id in str(err.value)
                # recorded for the next attempt, or the crash cleanup
                made = json.loads((env.state_dir / CGROUP_RECORD).read_text())
                assert str(child.parent) in made
                assert await asyncio.wait_for(waiter, 5) == 0  # dead all the same
            child.rmdir()
            child = None
            await host.close()
            env.assert_nothing_left()
            await host.close()  # idempotent once it succeeded
        finally:
            if child is not None:
                child.rmdir()
            await host.close()
            r.stop()

    run(main)


def test_a_state_dir_with_a_stranger_fails_close(env: Env) -> None:
    async def main() -> None:
        r = Reaper()
        r.start()
        host = NamespacesHost(env.pod_id, "k8s.io", spec(env), r, state_root=str(env.state_root))
        stranger = env.state_dir / "not-podshims"
        try:
            await host.create()
            stranger.write_text("x")
            with pytest.raises(errdefs.Unavailable, match="not-podshims"):
                await host.close()
            assert mounts_left(env) == [] and cgroup_dirs(env.cgroup_path) == []
            stranger.unlink()
            await host.close()
            env.assert_nothing_left()
        finally:
            if stranger.exists():
                stranger.unlink()
            await host.close()
            r.stop()

    run(main)


def mounts_left(e: Env) -> list[tuple[str, str]]:
    return live.mounts_under(e.state_root)


def test_delete_action_fails_until_the_crash_cleanup_finishes(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The shim died after a teardown that did not finish: containerd's ``delete`` of
    the sandbox exits 1 naming what is left (containerd keeps the bundle and runs it
    again), and 0 once the crash cleanup could remove everything."""
    monkeypatch.setenv("PODSHIM_RUN_DIR", str(tmp_path / "run"))
    address = str(tmp_path / "containerd.sock")
    state_root = rundir.pods_dir(address)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    ann = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "x"}
    (bundle / files.CONFIG).write_text(json.dumps({"annotations": ann}))
    (bundle / files.HOST_RECORD).write_text(json.dumps({"kind": "namespaces"}))
    flags = Flags()
    flags.namespace, flags.id, flags.bundle, flags.address = (
        "k8s.io", env.pod_id, str(bundle), address)  # fmt: skip
    state = Path(state_root) / "k8s.io" / env.pod_id
    child: Path | None = None

    async def crashed_teardown() -> None:
        nonlocal child
        r = Reaper()
        r.start()
        host = NamespacesHost(env.pod_id, "k8s.io", spec(env), r, state_root=state_root)
        try:
            await host.create()
            child = busy(env)
            with pytest.raises(errdefs.Unavailable):
                await host.close()
        finally:
            r.stop()  # the shim "dies" here, its host half torn down

    try:
        run(crashed_teardown)
        assert child is not None
        capfd.readouterr()
        assert delete.delete(flags) == 1
        err = capfd.readouterr().err
        assert "still busy" in err and str(child.parent) in err, err
        assert state.is_dir() and (state / CGROUP_RECORD).exists()
        assert delete.delete(flags) == 1  # run again: still there, still said
        assert "still busy" in capfd.readouterr().err
        child.rmdir()
        child = None
        assert delete.delete(flags) == 0
        assert capfd.readouterr().err == ""
        assert not state.exists() and cgroup_dirs(env.cgroup_path) == []
        assert live.mounts_under(tmp_path / "run") == []
        assert delete.delete(flags) == 0  # and again: nothing to do
    finally:
        rundir.bind_instance("")
        if child is not None:
            child.rmdir()
        for mnt, _ in sorted(live.mounts_under(tmp_path / "run"), reverse=True):
            subprocess.run(["umount", "-l", mnt], check=False)
