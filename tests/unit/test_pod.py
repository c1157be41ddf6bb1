"""The pod's workload checks and the namespace rewrite, with fakes for host and containers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from podshim import errors as errdefs
from podshim.jobs import JobGroup
from podshim.linux.reaper import Reaper
from podshim.oci.runtime import RuntimeConfig
from podshim.pod.pod import Pod
from podshim.task.contract import ShimContext
from podshim.task.states import Status
from tests.unit.fakes import RecordingPublisher

from .fakes import FakeHost

T = "io.kubernetes.cri.container-type"
S = "io.kubernetes.cri.sandbox-id"


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 30))


def sandbox_spec(pod: str = "pod1", **ann: str) -> dict[str, Any]:
    nss = [{"type": t} for t in ("pid", "ipc", "uts", "mount")] + [
        {"type": "network", "path": "/var/run/netns/cni-x"}
    ]
    return {"annotations": {T: "sandbox", S: pod, **ann}, "linux": {"namespaces": nss}}


def workload(
    tmp: Path, anchor: int, pod: str = "pod1", kind: str = "container", **extra: Any
) -> str:
    nss = [
        {"type": "pid"},
        {"type": "ipc", "path": f"/proc/{anchor}/ns/ipc"},
        {"type": "uts", "path": f"/proc/{anchor}/ns/uts"},
        {"type": "mount"},
        {"type": "network", "path": f"/proc/{anchor}/ns/net"},
    ]
    spec = {"process": {"args": ["sh"]}, "root": {"path": "rootfs"},
            "annotations": {T: kind, S: pod}, "linux": {"namespaces": nss}, **extra}  # fmt: skip
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(spec))
    return str(tmp)


async def make_pod(host: FakeHost | None = None) -> tuple[Pod, RecordingPublisher]:
    pub = RecordingPublisher()
    ctx = ShimContext("k8s.io", Reaper(), pub)
    pod = await Pod.create(ctx, "pod1", "/b/pod1", sandbox_spec(), "fake", host=host or FakeHost())
    return pod, pub


async def create(pod: Pod, tid: str, bundle: str) -> Any:
    spec = json.loads(Path(bundle, "config.json").read_text())
    return await pod.create_workload(
        tid, bundle, spec, RuntimeConfig(), [], (False, "", "", ""), lambda t: t in pod.workloads
    )


def test_sandbox_annotations_are_checked() -> None:
    async def main() -> None:
        ctx = ShimContext("k8s.io", Reaper(), RecordingPublisher())
        for spec in (sandbox_spec(pod="other"), {"annotations": {T: "container", S: "pod1"}}):
            with pytest.raises(errdefs.FailedPrecondition, match="annotations"):
                await Pod.create(ctx, "pod1", "/b", spec, "fake", host=FakeHost())

    run(main)


def test_workload_before_the_sandbox_runs_is_failed_precondition(tmp_path: Path) -> None:
    async def main() -> None:
        pod, _ = await make_pod()
        assert pod.sandbox is not None
        with pytest.raises(errdefs.FailedPrecondition, match="is created, not running"):
            await create(pod, "c1", workload(tmp_path / "c1", pod.sandbox.pid))
        await pod.release()

    run(main)


def test_rewrite_is_written_to_the_bundle_and_checks_order(tmp_path: Path) -> None:
    async def main() -> None:
        pod, _ = await make_pod()
        sb = pod.sandbox
        assert sb is not None
        await sb.start("")
        b1 = workload(tmp_path / "c1", sb.pid)
        c1 = await create(pod, "c1", b1)
        written = json.loads(Path(b1, "config.json").read_text())["linux"]["namespaces"]
        assert {n["type"]: n.get("path") for n in written} == {
            "pid": None, "ipc": "/run/fake/ipc", "uts": "/run/fake/uts", "mount": None, "network": "/run/fake/network",
        }  # fmt: skip
        assert c1.spec["linux"]["namespaces"] == written
        with pytest.raises(errdefs.AlreadyExists):
            await create(pod, "c1", workload(tmp_path / "c1b", sb.pid))
        with pytest.raises(errdefs.AlreadyExists):
            await create(pod, "pod1", workload(tmp_path / "p", sb.pid))
        with pytest.raises(errdefs.FailedPrecondition, match="annotations"):
            await create(pod, "c2", workload(tmp_path / "c2", sb.pid, pod="pod2"))
        with pytest.raises(errdefs.FailedPrecondition, match="annotations"):
            await create(pod, "c3", workload(tmp_path / "c3", sb.pid, kind="sandbox"))
        await pod.release()

    run(main)


def test_foreign_namespace_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    async def main() -> None:
        pod, _ = await make_pod()
        sb = pod.sandbox
        assert sb is not None
        await sb.start("")
        b = workload(tmp_path / "evil", 1)  # CRI paths naming pid 1: the host's
        with pytest.raises(errdefs.InvalidArgument, match="not in this pod"):
            await create(pod, "evil", b)
        assert "evil" not in pod.workloads
        await pod.release()

    run(main)


def test_debug_target_and_replacement_join_the_same_pod(tmp_path: Path) -> None:
    async def main() -> None:
        pod, _ = await make_pod()
        sb = pod.sandbox
        assert sb is not None
        await sb.start("")
        c1 = await create(pod, "c1", workload(tmp_path / "c1", sb.pid))
        dbg = workload(tmp_path / "dbg", sb.pid)
        spec = json.loads(Path(dbg, "config.json").read_text())
        spec["linux"]["namespaces"][0] = {"type": "pid", "path": f"/proc/{c1.pid}/ns/pid"}
        Path(dbg, "config.json").write_text(json.dumps(spec))
        d = await create(pod, "dbg", dbg)
        assert d.spec["linux"]["namespaces"][0]["path"] == f"/proc/{c1.pid}/ns/pid"
        pod.forget("c1")  # the first container exited and was deleted
        r = await create(pod, "c1-attempt1", workload(tmp_path / "r", sb.pid))
        assert r.spec["linux"]["namespaces"][1]["path"] == "/run/fake/ipc"
        assert sb.state("").status is Status.RUNNING  # the pod lives on
        await pod.release()

    run(main)


def test_kill_all_on_the_sandbox_reaches_every_workload(tmp_path: Path) -> None:
    async def main() -> None:
        pod, pub = await make_pod()
        sb = pod.sandbox
        assert sb is not None
        await sb.start("")
        cs = [await create(pod, f"c{i}", workload(tmp_path / f"c{i}", sb.pid)) for i in range(3)]
        await sb.kill("", 9, True)
        assert all(c.killed == [(9, True)] for c in cs)
        await sb.wait("")
        assert pub.topics[-1] == "/tasks/exit"
        await pod.release()

    run(main)


def test_pid_namespace_init_only_when_shared(tmp_path: Path) -> None:
    async def main() -> None:
        host = FakeHost()
        pod, _ = await make_pod(host)
        sb = pod.sandbox
        assert sb is not None
        await sb.start("")
        await create(pod, "c1", workload(tmp_path / "c1", sb.pid))
        assert host.init_pid == 0  # own pid namespace: no pod init
        shared = workload(tmp_path / "c2", sb.pid)
        spec = json.loads(Path(shared, "config.json").read_text())
        spec["linux"]["namespaces"][0] = {"type": "pid", "path": f"/proc/{sb.pid}/ns/pid"}
        Path(shared, "config.json").write_text(json.dumps(spec))
        c2 = await create(pod, "c2", shared)
        assert host.init_pid == 4321
        assert c2.spec["linux"]["namespaces"][0]["path"] == "/run/fake/pid"
        assert await sb.pids() == [(4321, "")]
        await pod.release()

    run(main)


def test_a_failed_job_of_a_pod_fails_that_pod_only(tmp_path: Path) -> None:
    """An unexpected error in one of the pod's background jobs stops the pod (its
    workloads report exited, its sandbox exits 1 and closes its host); it never reaches
    the daemon's own group, whose failures are the shim's crash path."""

    async def main() -> None:
        daemon_failures: list[BaseException] = []
        daemon = JobGroup("daemon", on_failure=lambda exc, _job: daemon_failures.append(exc))
        pub = RecordingPublisher()
        host = FakeHost()
        ctx = ShimContext("k8s.io", Reaper(), pub, jobs=daemon)
        pod = await Pod.create(ctx, "pod1", "/b/pod1", sandbox_spec(), "fake", host=host)
        sb = pod.sandbox
        assert sb is not None
        await sb.start("")
        c1 = await create(pod, "c1", workload(tmp_path / "c1", sb.pid))

        async def bug() -> None:
            raise RuntimeError("a bug in a pod's job")

        pod.jobs.spawn(bug(), "bug")
        ex = await asyncio.wait_for(sb.wait(""), 10)
        assert ex.status == 1 and host.closes == 1
        assert [str(e) for e in c1.failed] == ["a bug in a pod's job"] and not c1.running
        assert pub.topics[-1] == "/tasks/exit"
        assert daemon_failures == []
        await pod.release()
        assert len(daemon) == 0  # the pod's jobs ended with it

    run(main)
