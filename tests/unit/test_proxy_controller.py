"""The proxy-plugin sandbox controller (``containerd.services.sandbox.v1.Controller``) over
the node router, with fake pod hosts: containerd 2.1's call order, Task v3 creates joining
the pod, the records a successor daemon reads, lost pods, the bad input of issue 11, and
the front door's peer check."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.api.cri.v1 import pod_pb2 as cri
from podshim.api.services.sandbox.v1 import sandbox_pb2 as pb
from podshim.api.task.v2 import shim_pb2
from podshim.linux.reaper import Reaper
from podshim.oci.spec import Spec
from podshim.pod.pod import Pod
from podshim.service import taskv3
from podshim.service.controller import Controller
from podshim.service.proxystate import LOST_RECORD, ProxyState
from podshim.service.router import NAMESPACE_KEY, NodeService
from podshim.service.tasks import TaskService
from podshim.shim import frontdoor, proxyd
from podshim.task.contract import ShimContext
from podshim.ttrpc.services import CallContext, InlineHandler

from .fakes import FakeHost, RecordingPublisher
from .test_sandbox_api import make_container

NS = "k8s.io"
SID = "pod1"
ADDRESS = "ttrpc+unix:///run/podshim/proxy/x/task.sock"


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 30))


class Lab:
    """A node router, the Controller over it, the Task v3 binding; fake pod hosts."""

    def __init__(self, home: Path) -> None:
        self.pub = RecordingPublisher()
        self.hosts: list[FakeHost] = []
        self.state = ProxyState(str(home))
        self.node = NodeService("default", self.service)
        self.ctl = Controller(
            self.node, self.service, self.state, ADDRESS, name="podshim", make_pod=self._make_pod
        )
        self.tasks = taskv3.RecordingTasks(self.node, self.state)

    def service(self, ns: str, group: str) -> TaskService:
        return TaskService(ShimContext(ns, Reaper(), self.pub), lambda: None)

    async def _make_pod(
        self, ctx: ShimContext, tid: str, bundle: str, spec: Spec, kind: str, **kw: Any
    ) -> Pod:
        host = FakeHost(make=make_container)
        self.hosts.append(host)
        return await Pod.create(ctx, tid, bundle, spec, kind, host=host, **kw)

    async def create(self, sid: str = SID, **kw: Any) -> None:
        await self.ctl.Create(pb.ControllerCreateRequest(sandbox_id=sid, **kw), NS)


def options(**ns: Any) -> any_pb2.Any:
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web", namespace="default", uid="u1"),
        hostname="web-0",
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(**ns)
            )
        ),
    )
    return any_pb2.Any(type_url="runtime.v1.PodSandboxConfig", value=config.SerializeToString())


def cctx() -> CallContext:
    return CallContext(taskv3.TASK_V3, "-", {NAMESPACE_KEY: (NS,)})


def workload_bundle(tmp: Path, cid: str, sid: str = SID) -> Path:
    bundle = tmp / "bundles" / cid
    bundle.mkdir(parents=True)
    ann = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": sid}
    spec = {"ociVersion": "1.0.2", "process": {"args": ["sleep", "1"]}, "root": {"path": "rootfs"},
            "annotations": ann}  # fmt: skip
    (bundle / "config.json").write_text(json.dumps(spec))
    (bundle / "podshim-runtime.json").write_text(json.dumps({"binary": "runc", "root": "/r"}))
    return bundle


def test_containerd_call_order_drives_one_pod_and_its_tasks_join_it(tmp_path: Path) -> None:
    async def main() -> None:
        lab = Lab(tmp_path / "home")
        await lab.create(options=options(), netns_path="/run/ns1")
        bundle = Path(lab.state.sandbox_dir(NS, SID))
        assert json.loads((bundle / "config.json").read_text())["hostname"] == "web-0"
        svc = lab.node.services[(NS, SID)]  # the pod's group in the router
        assert svc.pod is not None and svc.pod.id == SID

        started = await lab.ctl.Start(pb.ControllerStartRequest(sandbox_id=SID), NS)
        assert (started.address, started.version) == (ADDRESS, 3)
        assert started.pid == svc.pod.sandbox.pid > 0  # type: ignore[union-attr]

        # containerd's Task v3 Create of a container joins the pod, and is recorded
        wl = workload_bundle(tmp_path, "c1")
        req = shim_pb2.CreateTaskRequest(id="c1", bundle=str(wl))
        await lab.tasks.Create(req, cctx())
        assert "c1" in svc.tasks
        (rec,) = lab.state.tasks()
        assert (rec.namespace, rec.id, rec.bundle, rec.runtime, rec.runtime_root) == (
            NS, "c1", str(wl), "runc", "/r",
        )  # fmt: skip
        st = await lab.ctl.Status(pb.ControllerStatusRequest(sandbox_id=SID, verbose=True), NS)
        assert (st.state, st.address, st.version) == ("SANDBOX_READY", ADDRESS, 3)
        assert json.loads(st.info["info"])["sandboxer"] == "podshim"
        m = (await lab.ctl.Metrics(pb.ControllerMetricsRequest(sandbox_id=SID), NS)).metrics
        assert m.id == SID
        plat = await lab.ctl.Platform(pb.ControllerPlatformRequest(sandbox_id=SID), NS)
        assert plat.platform.os == "linux"

        wait = asyncio.ensure_future(lab.ctl.Wait(pb.ControllerWaitRequest(sandbox_id=SID), NS))
        await lab.ctl.Stop(pb.ControllerStopRequest(sandbox_id=SID), NS)
        assert (await wait).exit_status == 137
        await lab.tasks.Delete(shim_pb2.DeleteRequest(id="c1"), cctx())
        assert lab.state.tasks() == []
        await lab.ctl.Shutdown(pb.ControllerShutdownRequest(sandbox_id=SID), NS)
        assert not bundle.exists() and (NS, SID) not in lab.node.services
        assert lab.ctl.empty and lab.node.empty
        # idempotent, as CRI expects; then unknown
        await lab.ctl.Stop(pb.ControllerStopRequest(sandbox_id=SID), NS)
        await lab.ctl.Shutdown(pb.ControllerShutdownRequest(sandbox_id=SID), NS)
        with pytest.raises(errdefs.NotFound):
            await lab.ctl.Status(pb.ControllerStatusRequest(sandbox_id=SID), NS)
        assert lab.state.remove_if_empty(keep=("daemon.lock",))

    run(main)


def test_shutdown_with_a_workload_left_forgets_its_record(tmp_path: Path) -> None:
    """RemovePodSandbox with a container containerd did not delete first: the pod's
    Shutdown deletes it, and its record goes too (no stale exit after a restart)."""

    async def main() -> None:
        lab = Lab(tmp_path / "home")
        await lab.create()
        await lab.ctl.Start(pb.ControllerStartRequest(sandbox_id=SID), NS)
        wl = workload_bundle(tmp_path, "c1")
        await lab.tasks.Create(shim_pb2.CreateTaskRequest(id="c1", bundle=str(wl)), cctx())
        assert [r.id for r in lab.state.tasks()] == ["c1"]
        await lab.ctl.Shutdown(pb.ControllerShutdownRequest(sandbox_id=SID), NS)
        assert lab.state.tasks() == [] and lab.node.empty

    run(main)


def test_bad_input(tmp_path: Path) -> None:
    async def main() -> None:
        lab = Lab(tmp_path / "home")
        with pytest.raises(errdefs.NotFound):
            await lab.ctl.Start(pb.ControllerStartRequest(sandbox_id="nope"), NS)
        with pytest.raises(errdefs.InvalidArgument):
            await lab.ctl.Create(pb.ControllerCreateRequest(sandbox_id="../x"), NS)
        with pytest.raises(errdefs.InvalidArgument):
            await lab.ctl.Create(pb.ControllerCreateRequest(sandbox_id=SID), "a/b")
        userns = cri.UserNamespace(mode=cri.POD)
        with pytest.raises(errdefs.InvalidArgument, match="user namespace"):
            await lab.create(options=options(userns_options=userns))
        with pytest.raises(errdefs.InvalidArgument, match="unknown ipc namespace mode 7"):
            await lab.create(options=options(ipc=7))
        assert lab.state.sandboxes() == [] and not lab.node.services and not lab.hosts
        await lab.ctl.Shutdown(pb.ControllerShutdownRequest(sandbox_id=SID), NS)  # undoing
        await lab.create()
        with pytest.raises(errdefs.AlreadyExists):
            await lab.create()
        await lab.ctl.Shutdown(pb.ControllerShutdownRequest(sandbox_id=SID), NS)

    run(main)


def test_a_lost_pod_is_exited_and_shutdown_removes_it(tmp_path: Path) -> None:
    async def main() -> None:
        state = ProxyState(str(tmp_path / "home"))
        state.make_sandbox_dir(NS, SID)
        state.mark_lost(NS, SID, 137, [])
        state.make_sandbox_dir(NS, "pod2")
        state.mark_lost(NS, "pod2", 137, ["cgroup busy"])
        lab = Lab(tmp_path / "home")
        lab.ctl.load_lost()
        st = await lab.ctl.Status(pb.ControllerStatusRequest(sandbox_id=SID, verbose=True), NS)
        assert (st.state, st.pid) == ("SANDBOX_NOTREADY", 0) and st.exited_at.seconds > 0
        assert json.loads(st.info["info"])["lost"] is True
        w = await lab.ctl.Wait(pb.ControllerWaitRequest(sandbox_id=SID), NS)
        assert w.exit_status == 137
        await lab.ctl.Stop(pb.ControllerStopRequest(sandbox_id=SID), NS)
        await lab.ctl.Shutdown(pb.ControllerShutdownRequest(sandbox_id=SID), NS)
        assert not os.path.exists(state.sandbox_dir(NS, SID))
        with pytest.raises(errdefs.FailedPrecondition, match="cgroup busy"):
            await lab.ctl.Shutdown(pb.ControllerShutdownRequest(sandbox_id="pod2"), NS)
        assert os.path.exists(os.path.join(state.sandbox_dir(NS, "pod2"), LOST_RECORD))

    run(main)


def test_recovery_deletes_lost_containers_and_reports_their_exit(tmp_path: Path) -> None:
    """The successor of a killed daemon: the lost task's bundle is gone (containerd
    removed it), its runtime state is not: ``<runtime> delete --force`` runs; /tasks/exit
    (137) is due; the lost pod is marked lost."""
    calls = tmp_path / "calls"
    fake_runc = tmp_path / "fake-runc"
    fake_runc.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake_runc.chmod(0o755)
    root = tmp_path / "runc-root"
    (root / NS / "c1").mkdir(parents=True)
    state = ProxyState(str(tmp_path / "home"))
    bundle = workload_bundle(tmp_path, "c1")
    (bundle / "podshim-runtime.json").write_text(
        json.dumps({"binary": str(fake_runc), "root": str(root)})
    )
    state.record_task(NS, "c1", str(bundle), 4242)
    (bundle / "config.json").unlink()
    (bundle / "podshim-runtime.json").unlink()
    bundle.rmdir()
    state.make_sandbox_dir(NS, SID)
    exits = proxyd.recover(state, "/run/containerd-test.sock")
    ((ns, ev),) = exits
    assert (ns, ev.container_id, ev.id, ev.pid, ev.exit_status) == (NS, "c1", "c1", 4242, 137)
    assert calls.read_text().split() == ["--root", str(root / NS), "delete", "--force", "c1"]
    assert state.tasks() == []
    assert state.lost(NS, SID)["exit_status"] == 137


def test_task_v3_is_the_routers_task_api_under_its_own_name(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "home")
    (binding,) = taskv3.bindings(lab.node, lab.state)
    assert binding.name == "containerd.task.v3.Task"
    assert set(binding.methods) == {
        m.name for m in shim_pb2.DESCRIPTOR.services_by_name["Task"].methods
    }
    assert type(binding.methods["State"]) is InlineHandler  # still answered inline


def test_front_door_relays_to_the_backend_and_refuses_who_it_must(tmp_path: Path) -> None:
    async def main() -> None:
        backend_path = str(tmp_path / "backend.sock")

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read(100))
            await writer.drain()
            writer.close()

        backend = await asyncio.start_unix_server(echo, backend_path)
        seen: list[tuple[int, int, int]] = []

        def allow_once(pid: int, uid: int, gid: int) -> bool:
            seen.append((pid, uid, gid))
            return len(seen) == 1

        door = frontdoor.FrontDoor(str(tmp_path / "front.sock"), backend_path, allow_once)
        await door.start()
        assert os.stat(door.path).st_mode & 0o777 == 0o600
        reader, writer = await asyncio.open_unix_connection(door.path)
        writer.write(b"hello")
        assert await reader.read(100) == b"hello"  # relayed both ways
        writer.close()
        assert seen[0] == (os.getpid(), os.getuid(), os.getgid())
        reader, writer = await asyncio.open_unix_connection(door.path)
        writer.write(b"hello")
        try:
            answer = await reader.read(100)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # refused: closed, nothing relayed
        writer.close()
        assert door.refused == 1
        await door.close()
        assert not os.path.exists(door.path)
        backend.close()

    run(main)
    assert frontdoor.root_only(1, 0, 0) and not frontdoor.root_only(1, 65534, 65534)
    a, b = socket.socketpair()
    with a, b:
        assert frontdoor.peer_ids(a) == (os.getpid(), os.getuid(), os.getgid())
