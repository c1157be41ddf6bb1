"""A pod host kind that lives only in this test file, plugged in through the host
registry (nothing under src/ names it), runs a pod with two containers through the real
Task service and ttrpc server, with a real ttrpc client; config validation accepts it
and the ``delete`` action's crash cleanup reaches it through the sandbox's bundle.

The containers are real ``Container`` objects whose OCI driver is the fake one (real
processes, exits through the reaper), made by the host's local workload factory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2

from podshim.api.runtimeoptions.v1 import api_pb2 as ro_pb2
from podshim.api.task.v2 import shim_pb2 as pb
from podshim.host import registry
from podshim.host.local import create_container
from podshim.linux.reaper import Reaper
from podshim.oci.runtime import RuntimeConfig
from podshim.oci.spec import Spec
from podshim.service.tasks import TaskService
from podshim.shim import delete
from podshim.shim.flags import Flags
from podshim.task.contract import ShimContext
from podshim.ttrpc.client import Client
from podshim.ttrpc.server import Server
from podshim.ttrpc.services import bind

from .fakeoci import FakeOci, fake_oci_factory
from .fakes import FakeHost, RecordingPublisher

TASK = "containerd.task.v2.Task"
T = "io.kubernetes.cri.container-type"
S = "io.kubernetes.cri.sandbox-id"
KIND = "test-only"


class OnlyHereHost(FakeHost):
    kind = KIND


class OnlyHereKind:
    name = KIND

    def __init__(self) -> None:
        self.hosts: list[OnlyHereHost] = []
        self.cleanups: list[tuple[str, str]] = []

    def make(
        self,
        pod_id: str,
        ctx: ShimContext,
        spec: Spec,
        runtime: RuntimeConfig,
        options: Mapping[str, object] | None = None,
    ) -> OnlyHereHost:
        host = OnlyHereHost(make=create_container)  # real Containers, the context's driver
        self.hosts.append(host)
        return host

    def cleanup(self, namespace: str, pod_id: str, spec: Spec) -> list[str]:
        self.cleanups.append((namespace, pod_id))
        return []


@pytest.fixture
def kind() -> Iterator[OnlyHereKind]:
    k = OnlyHereKind()
    registry.register(k)
    try:
        yield k
    finally:
        registry.unregister(KIND)


def bundle(tmp: Path, tid: str, ann: dict[str, str], args: list[str], sandbox_pid: int = 0) -> str:
    nss: list[dict[str, Any]] = [{"type": "pid"}, {"type": "mount"}]
    for t, f in (("ipc", "ipc"), ("uts", "uts"), ("network", "net")):
        nss.append({"type": t, "path": f"/proc/{sandbox_pid}/ns/{f}"} if sandbox_pid else
                   {"type": t})  # fmt: skip
    spec = {"process": {"args": args}, "root": {"path": "rootfs"}, "annotations": ann,
            "linux": {"namespaces": nss}}  # fmt: skip
    d = tmp / tid
    d.mkdir()
    (d / "config.json").write_text(json.dumps(spec))
    return str(d)


def test_a_test_only_host_kind_runs_a_pod_with_two_containers(
    tmp_path: Path, kind: OnlyHereKind, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    config = tmp_path / "podshim.toml"
    config.write_text(f'default_host = "{KIND}"\n')
    options = ro_pb2.Options(config_path=str(config))
    drivers: list[FakeOci] = []

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        pub = RecordingPublisher()
        ctx = ShimContext("k8s.io", reaper, pub, oci=fake_oci_factory(drivers))
        service = TaskService(ctx, lambda: None)
        server = Server([bind(pb.DESCRIPTOR.services_by_name["Task"], service)])
        sock = str(tmp_path / "shim.sock")
        await server.serve_path(sock)
        client = Client(sock)
        try:
            sb = bundle(tmp_path, "pod1", {T: "sandbox", S: "pod1"}, ["pause"])
            req = pb.CreateTaskRequest(id="pod1", bundle=sb)
            req.options.Pack(options)
            created = await client.call(TASK, "Create", req, pb.CreateTaskResponse)
            await client.call(TASK, "Start", pb.StartRequest(id="pod1"), pb.StartResponse)
            for cid in ("c1", "c2"):
                b = bundle(tmp_path, cid, {T: "container", S: "pod1"}, ["sleep", "1000"],
                           sandbox_pid=created.pid)  # fmt: skip
                await client.call(TASK, "Create", pb.CreateTaskRequest(id=cid, bundle=b),
                                  pb.CreateTaskResponse)  # fmt: skip
                await client.call(TASK, "Start", pb.StartRequest(id=cid), pb.StartResponse)
            states = [await client.call(TASK, "State", pb.StateRequest(id=t), pb.StateResponse)
                      for t in ("pod1", "c1", "c2")]  # fmt: skip
            assert [s.status for s in states] == [2, 2, 2]  # all RUNNING
            assert states[1].pid == drivers[0].inits["c1"] != states[2].pid
            # the host's namespaces replaced CRI's /proc/<sandbox pid>/ns paths
            written = json.loads((tmp_path / "c1" / "config.json").read_text())
            paths = {n["type"]: n.get("path") for n in written["linux"]["namespaces"]}
            assert paths["network"] == "/run/fake/network" and paths["ipc"] == "/run/fake/ipc"
            # StopPodSandbox: kill all on the sandbox reaches both containers
            await client.call(TASK, "Kill", pb.KillRequest(id="pod1", signal=9, all=True),
                              empty_pb2.Empty)  # fmt: skip
            for cid in ("c1", "c2"):
                w = await client.call(TASK, "Wait", pb.WaitRequest(id=cid), pb.WaitResponse)
                assert w.exit_status == 137
                await client.call(TASK, "Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
            await client.call(TASK, "Wait", pb.WaitRequest(id="pod1"), pb.WaitResponse)
            await client.call(TASK, "Delete", pb.DeleteRequest(id="pod1"), pb.DeleteResponse)
            assert service.empty and len(ctx.jobs) == 0
        finally:
            await client.close()
            await server.shutdown(grace=0)
            reaper.stop()
        assert pub.topics.count("/tasks/exit") == 3 and pub.topics[-1] == "/tasks/delete"

    asyncio.run(asyncio.wait_for(main(), 60))
    (host,) = kind.hosts
    assert host.created and host.closes >= 1
    assert [c[0] for c in drivers[0].calls] == ["create", "start", "kill", "delete"]
    record = json.loads((tmp_path / "pod1" / "podshim-host.json").read_text())
    assert record == {"kind": KIND}
    # the clean Delete marked the bundle: containerd's `delete` then has nothing to do;
    # after a crash (no Delete, no mark) it runs the kind's cleanup
    assert (tmp_path / "pod1" / "podshim-deleted").is_file()
    (tmp_path / "pod1" / "podshim-deleted").unlink()
    flags = Flags()
    flags.namespace, flags.id, flags.bundle = "k8s.io", "pod1", str(tmp_path / "pod1")
    assert delete.delete(flags) == 0
    assert kind.cleanups == [("k8s.io", "pod1")]
    assert capfdbinary.readouterr().out  # the DeleteResponse
