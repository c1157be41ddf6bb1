"""The Sandbox API (``containerd.runtime.sandbox.v1.Sandbox``) over the shim's Task service,
with a fake pod host: the call order containerd 2.1's shim sandbox controller uses, the
bad input of issue 11, and the pod it drives being the Task API's pod."""

from __future__ import annotations

import asyncio
import json
import platform
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.api.cgroups.v1 import metrics_pb2 as v1pb
from podshim.api.cgroups.v2 import metrics_pb2 as v2pb
from podshim.api.cri.v1 import pod_pb2 as cri
from podshim.api.runtime.sandbox.v1 import sandbox_pb2 as pb
from podshim.api.task.v2 import shim_pb2
from podshim.linux.reaper import Reaper
from podshim.oci.runtime import RuntimeConfig
from podshim.oci.spec import Spec
from podshim.pod.pod import Pod
from podshim.service import sandbox_api
from podshim.service.router import NodeService
from podshim.service.sandbox_api import SandboxService
from podshim.service.tasks import TaskService
from podshim.task.contract import ShimContext
from podshim.ttrpc.client import Client
from podshim.ttrpc.server import Server
from podshim.ttrpc.services import CallContext

from .fakes import FakeHost, FakeTask, RecordingPublisher

SID = "pod1"
CTX = CallContext("containerd.runtime.sandbox.v1.Sandbox", "-", {})
T = "io.kubernetes.cri.container-type"
S = "io.kubernetes.cri.sandbox-id"


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 30))


class FakeContainer(FakeTask):
    """A workload made by the fake host: a Task with what the pod asks of a workload."""

    memory_cgroup = ""

    @property
    def running(self) -> bool:
        return bool(self.procs[""]["m"].state.name == "RUNNING")

    def metrics(self) -> Any:
        raise errdefs.NotFound("no cgroup")

    def fail(self, why: BaseException) -> None:
        self.exit("", 137)


async def make_container(ctx: ShimContext, req: Any, spec: dict[str, Any]) -> FakeContainer:
    return FakeContainer(req.id)


class Lab:
    """A Task service and the Sandbox service over it; pods get fake hosts."""

    def __init__(self) -> None:
        self.pub = RecordingPublisher()
        self.ctx = ShimContext("k8s.io", Reaper(), self.pub)
        self.hosts: list[FakeHost] = []
        self.specs: list[Spec] = []
        self.shutdowns = 0
        self.tasks = TaskService(self.ctx, self._shutdown, make_pod=self._make_pod)
        self.api = SandboxService(self.tasks, self._shutdown, make_pod=self._make_pod)

    def _shutdown(self) -> None:
        self.shutdowns += 1

    async def _make_pod(
        self, ctx: ShimContext, tid: str, bundle: str, spec: Spec, kind: str, **kw: Any
    ) -> Pod:
        host = FakeHost(make=make_container)
        self.hosts.append(host)
        self.specs.append(spec)
        return await Pod.create(ctx, tid, bundle, spec, kind, host=host, **kw)

    async def create(self, tmp: Path, sid: str = SID, **kw: Any) -> Path:
        bundle = tmp / sid
        bundle.mkdir(exist_ok=True)
        req = pb.CreateSandboxRequest(sandbox_id=sid, bundle_path=str(bundle), **kw)
        await self.api.CreateSandbox(req, CTX)
        return bundle


def pod_config(**ns: Any) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web", namespace="default", uid="u1"),
        hostname="web-0",
        log_directory="/var/log/pods/x",
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/podu1",
            sysctls={"net.ipv4.ip_forward": "1", "kernel.shmmax": "1000000"},
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(**ns)
            ),
        ),
    )


def options(config: cri.PodSandboxConfig) -> any_pb2.Any:
    return any_pb2.Any(type_url="runtime.v1.PodSandboxConfig", value=config.SerializeToString())


async def status(lab: Lab, sid: str = SID, verbose: bool = False) -> pb.SandboxStatusResponse:
    return await lab.api.SandboxStatus(
        pb.SandboxStatusRequest(sandbox_id=sid, verbose=verbose), CTX
    )


def test_the_call_order_of_containerd_drives_one_pod(tmp_path: Path) -> None:
    """Create, Start, Status, Metrics, Platform, Stop, Wait, Shutdown, as CRI calls them:
    the pod is the Task service's pod, its description comes from the PodSandboxConfig."""

    async def main() -> None:
        lab = Lab()
        bundle = await lab.create(tmp_path, options=options(pod_config()), netns_path="/run/ns1")
        spec = lab.specs[0]
        assert spec["hostname"] == "web-0"
        assert spec["linux"]["cgroupsPath"] == "/kubepods/podu1/pod1"
        assert spec["linux"]["resources"] == {"cpu": {"shares": 2}}  # as CRI's pause
        assert spec["linux"]["sysctl"] == {"kernel.shmmax": "1000000", "net.ipv4.ip_forward": "1"}
        assert spec["annotations"][T] == "sandbox" and spec["annotations"][S] == SID
        assert {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]} == {
            "mount": None, "network": "/run/ns1", "uts": None, "pid": None, "ipc": None,
        }  # fmt: skip
        # the description is in the bundle, for the `delete` action's crash cleanup
        assert json.loads((bundle / "config.json").read_text()) == spec
        pod = lab.tasks.pod
        assert pod is not None and pod.sandbox is lab.tasks.tasks[SID]
        assert lab.hosts[0].created
        st = await status(lab)
        assert (st.sandbox_id, st.state, st.pid) == (SID, "SANDBOX_NOTREADY", pod.sandbox.pid)

        started = await lab.api.StartSandbox(pb.StartSandboxRequest(sandbox_id=SID), CTX)
        assert started.pid == pod.sandbox.pid > 0
        assert started.created_at.seconds > 0
        st = await status(lab, verbose=True)
        assert (st.state, st.pid) == ("SANDBOX_READY", started.pid)
        info = json.loads(st.info["info"])
        assert info["pid"] == started.pid and info["host"]["kind"] == "fake"
        assert info["runtimeSpec"] == spec
        await lab.api.PingSandbox(pb.PingRequest(sandbox_id=SID), CTX)
        plat = (await lab.api.Platform(pb.PlatformRequest(sandbox_id=SID), CTX)).platform
        assert plat.os == "linux"
        if platform.machine() == "x86_64":
            assert plat.architecture == "amd64"
        m = (await lab.api.SandboxMetrics(pb.SandboxMetricsRequest(sandbox_id=SID), CTX)).metrics
        assert m.id == SID and m.timestamp.seconds > 0
        assert m.data.type_url.rsplit("/", 1)[-1] in (
            v1pb.Metrics.DESCRIPTOR.full_name,
            v2pb.Metrics.DESCRIPTOR.full_name,
        )

        wait = asyncio.ensure_future(
            lab.api.WaitSandbox(pb.WaitSandboxRequest(sandbox_id=SID), CTX)
        )
        await asyncio.sleep(0)
        assert not wait.done()
        await lab.api.StopSandbox(pb.StopSandboxRequest(sandbox_id=SID, timeout_secs=5), CTX)
        assert (await wait).exit_status == 137  # as runc.v2's pause after StopPodSandbox
        assert lab.hosts[0].closes == 1  # torn down by Stop
        st = await status(lab)
        assert (st.state, st.pid) == ("SANDBOX_NOTREADY", 0)
        assert st.exited_at.seconds > 0
        # a second Stop changes nothing
        await lab.api.StopSandbox(pb.StopSandboxRequest(sandbox_id=SID), CTX)
        assert lab.shutdowns == 0

        await lab.api.ShutdownSandbox(pb.ShutdownSandboxRequest(sandbox_id=SID), CTX)
        assert lab.tasks.empty
        await asyncio.sleep(0)
        assert lab.shutdowns == 1  # the shim exits: it holds nothing
        assert (bundle / "podshim-deleted").exists()
        assert lab.pub.topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
        with pytest.raises(errdefs.NotFound):
            await status(lab)
        # Shutdown is idempotent
        await lab.api.ShutdownSandbox(pb.ShutdownSandboxRequest(sandbox_id=SID), CTX)

    run(main)


def test_host_death_is_exit_1_and_not_ready(tmp_path: Path) -> None:
    async def main() -> None:
        lab = Lab()
        await lab.create(tmp_path)
        await lab.api.StartSandbox(pb.StartSandboxRequest(sandbox_id=SID), CTX)
        wait = asyncio.ensure_future(
            lab.api.WaitSandbox(pb.WaitSandboxRequest(sandbox_id=SID), CTX)
        )
        lab.hosts[0].die(9)
        assert (await wait).exit_status == 1
        st = await status(lab, verbose=True)
        assert (st.state, st.pid) == ("SANDBOX_NOTREADY", 0)
        assert json.loads(st.info["info"])["exitStatus"] == 1
        await lab.api.StopSandbox(pb.StopSandboxRequest(sandbox_id=SID), CTX)
        await lab.api.ShutdownSandbox(pb.ShutdownSandboxRequest(sandbox_id=SID), CTX)
        assert lab.tasks.empty

    run(main)


def test_workloads_are_task_api_creates_joining_the_pod(tmp_path: Path) -> None:
    """A container arrives as a Task API Create on the same shim and joins the pod;
    Stop kills it; Shutdown deletes what CRI did not remove, then the sandbox."""

    async def main() -> None:
        lab = Lab()
        await lab.create(tmp_path, options=options(pod_config()))
        pod = lab.tasks.pod
        assert pod is not None and pod.sandbox is not None
        cbundle = tmp_path / "c1"
        cbundle.mkdir()
        anchor = pod.sandbox.pid
        nss = [{"type": t, "path": f"/proc/{anchor}/ns/{t[:3]}"} for t in ("ipc", "uts")]
        cspec = {"process": {"args": ["sh"]}, "root": {"path": "rootfs"},
                 "annotations": {T: "container", S: SID}, "linux": {"namespaces": nss}}  # fmt: skip
        (cbundle / "config.json").write_text(json.dumps(cspec))
        create = shim_pb2.CreateTaskRequest(id="c1", bundle=str(cbundle))
        with pytest.raises(errdefs.FailedPrecondition, match="not running"):
            await lab.tasks.Create(create, CTX)  # before StartSandbox
        await lab.api.StartSandbox(pb.StartSandboxRequest(sandbox_id=SID), CTX)
        await lab.tasks.Create(create, CTX)
        await lab.tasks.Start(shim_pb2.StartRequest(id="c1"), CTX)
        assert set(pod.workloads) == {"c1"}
        rewritten = json.loads((cbundle / "config.json").read_text())["linux"]["namespaces"]
        assert {n["path"] for n in rewritten} == {"/run/fake/ipc", "/run/fake/uts"}

        await lab.api.ShutdownSandbox(pb.ShutdownSandboxRequest(sandbox_id=SID), CTX)
        assert lab.tasks.empty and not pod.workloads
        await asyncio.sleep(0)
        assert lab.shutdowns == 1

    run(main)


def test_unknown_sandbox_is_not_found(tmp_path: Path) -> None:
    async def main() -> None:
        lab = Lab()
        await lab.create(tmp_path)
        calls: list[Awaitable[Any]] = [
            lab.api.StartSandbox(pb.StartSandboxRequest(sandbox_id="nope"), CTX),
            lab.api.Platform(pb.PlatformRequest(sandbox_id="nope"), CTX),
            lab.api.StopSandbox(pb.StopSandboxRequest(sandbox_id="nope"), CTX),
            lab.api.WaitSandbox(pb.WaitSandboxRequest(sandbox_id="nope"), CTX),
            status(lab, "nope"),
            lab.api.PingSandbox(pb.PingRequest(sandbox_id="nope"), CTX),
            lab.api.SandboxMetrics(pb.SandboxMetricsRequest(sandbox_id="nope"), CTX),
            lab.api.ShutdownSandbox(pb.ShutdownSandboxRequest(sandbox_id="nope"), CTX),
        ]
        for call in calls:
            with pytest.raises(errdefs.NotFound, match="sandbox nope: not found"):
                await call
        assert lab.shutdowns == 0  # the shim still holds pod1
        st = await status(lab)
        assert st.sandbox_id == SID

    run(main)


def test_second_create_is_already_exists(tmp_path: Path) -> None:
    async def main() -> None:
        lab = Lab()
        await lab.create(tmp_path)
        with pytest.raises(errdefs.AlreadyExists, match="sandbox pod1: already exists"):
            await lab.create(tmp_path)
        with pytest.raises(errdefs.FailedPrecondition, match="already holds pod pod1"):
            await lab.create(tmp_path, sid="pod2")
        assert len(lab.hosts) == 1
        assert list(lab.tasks.tasks) == [SID]

    run(main)


@pytest.mark.parametrize(
    ("ns", "why"),
    [
        ({"userns_options": cri.UserNamespace(mode=cri.POD)}, "user namespace"),
        ({"userns_options": cri.UserNamespace(mode=cri.CONTAINER)}, "user namespace"),
        (
            {"userns_options": cri.UserNamespace.FromString(b"\x08\x09")},  # mode 9 on the wire
            "unknown user namespace mode 9",
        ),
        ({"network": 7}, "unknown network namespace mode 7"),
        ({"pid": 5}, "unknown pid namespace mode 5"),
        ({"ipc": 4}, "unknown ipc namespace mode 4"),
    ],
)
def test_spec_podshim_cannot_honour_is_invalid_with_nothing_left(
    tmp_path: Path, ns: dict[str, Any], why: str
) -> None:
    async def main() -> None:
        lab = Lab()
        bundle = tmp_path / SID
        with pytest.raises(errdefs.InvalidArgument, match=why):
            await lab.create(tmp_path, options=options(pod_config(**ns)), netns_path="/run/n")
        assert not lab.hosts and lab.tasks.pod is None and lab.tasks.empty
        assert sorted(p.name for p in bundle.iterdir()) == []
        with pytest.raises(errdefs.NotFound):
            await status(lab)
        # containerd's cleanup after a failed create: Shutdown, and the shim exits
        await lab.api.ShutdownSandbox(pb.ShutdownSandboxRequest(sandbox_id=SID), CTX)
        await asyncio.sleep(0)
        assert lab.shutdowns == 1

    run(main)


def test_failed_host_create_leaves_no_bundle_files(tmp_path: Path) -> None:
    """The description is written before the host is made; a host that fails to make
    the pod takes it away again, and the id can be shut down (nothing held)."""

    class Broken(FakeHost):
        async def create(self) -> None:
            raise errdefs.InvalidArgument("the host refuses this pod")

    async def main() -> None:
        lab = Lab()

        async def make(
            ctx: ShimContext, tid: str, bundle: str, spec: Spec, kind: str, **kw: Any
        ) -> Pod:
            assert Path(bundle, "config.json").exists()
            return await Pod.create(ctx, tid, bundle, spec, kind, host=Broken(), **kw)

        lab.api = SandboxService(lab.tasks, lab._shutdown, make_pod=make)
        with pytest.raises(errdefs.InvalidArgument, match="refuses"):
            await lab.create(tmp_path)
        assert list((tmp_path / SID).iterdir()) == []
        assert lab.tasks.empty and lab.tasks.pod is None
        await lab.api.ShutdownSandbox(pb.ShutdownSandboxRequest(sandbox_id=SID), CTX)

    run(main)


def test_bad_options_are_invalid(tmp_path: Path) -> None:
    async def main() -> None:
        lab = Lab()
        other = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"")
        with pytest.raises(errdefs.InvalidArgument, match=r"podshim reads runtime\.v1"):
            await lab.create(tmp_path, options=other)
        junk = any_pb2.Any(type_url="runtime.v1.PodSandboxConfig", value=b"\x0a\xff")
        with pytest.raises(errdefs.InvalidArgument, match=r"bad runtime\.v1\.PodSandboxConfig"):
            await lab.create(tmp_path, options=junk)
        with pytest.raises(errdefs.InvalidArgument, match="not a directory"):
            await lab.api.CreateSandbox(
                pb.CreateSandboxRequest(sandbox_id=SID, bundle_path="rel"), CTX
            )
        with pytest.raises(errdefs.InvalidArgument, match="invalid identifier"):
            await lab.create(tmp_path, sid="../x")
        assert not lab.hosts

    run(main)


def test_served_on_the_wire_under_containerds_name(tmp_path: Path) -> None:
    """The daemon's binding: containerd's service name, for a pod-scope shim only."""

    async def main() -> None:
        lab = Lab()
        node = NodeService("k8s.io", lambda ns, group: lab.tasks)
        assert sandbox_api.bindings(node, lab._shutdown) == []
        (binding,) = sandbox_api.bindings(lab.tasks, lab._shutdown, make_pod=lab._make_pod)
        assert binding.name == "containerd.runtime.sandbox.v1.Sandbox"
        assert set(binding.methods) == {
            "CreateSandbox", "StartSandbox", "Platform", "StopSandbox", "WaitSandbox",
            "SandboxStatus", "PingSandbox", "ShutdownSandbox", "SandboxMetrics",
        }  # fmt: skip
        server = Server([binding])
        path = str(tmp_path / "s.sock")
        await server.serve_path(path)
        bundle = tmp_path / SID
        bundle.mkdir()
        try:
            async with Client(path) as client:
                name = binding.name
                req = pb.CreateSandboxRequest(sandbox_id=SID, bundle_path=str(bundle))
                await client.call(name, "CreateSandbox", req, pb.CreateSandboxResponse)
                with pytest.raises(errdefs.AlreadyExists):
                    await client.call(name, "CreateSandbox", req, pb.CreateSandboxResponse)
                with pytest.raises(errdefs.NotFound):
                    await client.call(
                        name, "SandboxStatus", pb.SandboxStatusRequest(sandbox_id="x"),
                        pb.SandboxStatusResponse,
                    )  # fmt: skip
                start = pb.StartSandboxRequest(sandbox_id=SID)
                got = await client.call(name, "StartSandbox", start, pb.StartSandboxResponse)
                assert got.pid > 0
                down = pb.ShutdownSandboxRequest(sandbox_id=SID)
                await client.call(name, "ShutdownSandbox", down, pb.ShutdownSandboxResponse)
        finally:
            await server.shutdown(grace=0)

    run(main)


def test_pod_config_bytes_of_cri_parse() -> None:
    """The options Any holds CRI's own message: the test lab's runtime.v1 (CRI's field
    numbers) serialized, read as podshim's wire-compatible subset."""
    from podshim.pod.podconfig import parse_options, pod_spec
    from podshim_lab.cri.client import CriClient
    from podshim_lab.cri.client import api as criapi

    real = CriClient.pod_config(
        "web", "default", "u9", hostname="h1", host_network=True, pid_mode="POD",
        sysctls={"kernel.msgmax": "9000"}, cgroup_parent="/kubepods.slice",
    )  # fmt: skip
    assert real.DESCRIPTOR.full_name == "runtime.v1.PodSandboxConfig"
    wire = any_pb2.Any(type_url=real.DESCRIPTOR.full_name, value=real.SerializeToString())
    assert isinstance(criapi.PodSandboxConfig(), type(real))
    config = parse_options(wire, "s1")
    assert (config.hostname, config.metadata.uid) == ("h1", "u9")
    spec = pod_spec("s1", config, "")
    # host network: no network and no UTS namespace (as CRI's pause spec)
    assert [n["type"] for n in spec["linux"]["namespaces"]] == ["mount", "pid", "ipc"]
    assert spec["linux"]["cgroupsPath"] == "kubepods.slice:cri-containerd:s1"
    assert spec["linux"]["sysctl"] == {"kernel.msgmax": "9000"}
    with pytest.raises(errdefs.InvalidArgument, match="host network, yet"):
        pod_spec("s1", config, "/run/netns/x")


def test_runtime_config_default_when_no_create_came_first(tmp_path: Path) -> None:
    """The sandbox's Create carries no runtime options: the pod is made with the Task
    service's config if a Create fixed one, else the defaults."""

    async def main() -> None:
        lab = Lab()
        seen: list[Any] = []

        async def make(
            ctx: ShimContext, tid: str, bundle: str, spec: Spec, kind: str, **kw: Any
        ) -> Pod:
            seen.append((kind, kw["runtime"]))
            return await Pod.create(ctx, tid, bundle, spec, "fake", host=FakeHost(), **kw)

        lab.api = SandboxService(lab.tasks, lab._shutdown, make_pod=make)
        await lab.create(tmp_path)
        assert seen == [("namespaces", RuntimeConfig())]
        # no options: every namespace of the pod's own, no cgroup, nothing else
        spec = json.loads((tmp_path / SID / "config.json").read_text())
        assert {n["type"] for n in spec["linux"]["namespaces"]} == {
            "mount", "network", "uts", "pid", "ipc",
        }  # fmt: skip
        assert "cgroupsPath" not in spec["linux"] and "resources" not in spec["linux"]

    run(main)
