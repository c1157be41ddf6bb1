"""The node daemon's router: tasks keyed by (containerd namespace, id), one pod-scope
service per (namespace, group); and the service's deleted mark for the ``delete`` action."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from podshim import errors as errdefs
from podshim.api.task.v2 import shim_pb2 as pb
from podshim.linux.reaper import Reaper
from podshim.oci import bundle as files
from podshim.oci.ids import GROUP_ANNOTATION, SANDBOX_ID_ANNOTATION
from podshim.service.router import NAMESPACE_KEY, NodeService, group_of
from podshim.service.tasks import TaskService
from podshim.task.contract import ShimContext
from podshim.ttrpc.services import CallContext
from tests.unit.fakes import FakeTask, RecordingPublisher


def cctx(namespace: str | None) -> CallContext:
    md = {NAMESPACE_KEY: (namespace,)} if namespace is not None else {}
    return CallContext("containerd.task.v2.Task", "x", md)


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 30))


def bundle(tmp: Path, tid: str, annotations: dict[str, str] | None = None) -> str:
    b = tmp / tid
    b.mkdir(parents=True)
    (b / files.CONFIG).write_text(json.dumps({"process": {"args": ["x"]}, "root": {"path": "rootfs"}, "annotations": annotations or {}}))
    return str(b)


class Node:
    """A router whose services make FakeTasks (bundle set from the request)."""

    def __init__(self) -> None:
        self.made: list[tuple[str, str]] = []
        self.node = NodeService("default", self.make)

    def make(self, namespace: str, group: str) -> TaskService:
        self.made.append((namespace, group))

        async def task(_: ShimContext, req: pb.CreateTaskRequest, *__: Any) -> FakeTask:
            t = FakeTask(req.id)
            t.bundle = req.bundle
            return t

        ctx = ShimContext(namespace, Reaper(), RecordingPublisher())
        return TaskService(ctx, lambda: None, make_task=task)


def test_group_is_the_group_annotation_then_the_sandbox_id_then_the_task() -> None:
    assert group_of("t", {GROUP_ANNOTATION: "g", SANDBOX_ID_ANNOTATION: "s"}) == "g"
    assert group_of("t", {SANDBOX_ID_ANNOTATION: "s"}) == "s"
    assert group_of("t", {SANDBOX_ID_ANNOTATION: "../x"}) == "t"  # never an invalid id
    assert group_of("t", {}) == "t"


def test_same_id_in_two_namespaces_are_two_tasks_in_two_services(tmp_path: Path) -> None:
    async def main() -> None:
        n = Node()
        for ns in ("a", "b"):
            req = pb.CreateTaskRequest(id="t", bundle=bundle(tmp_path / ns, "t"))
            await n.node.Create(req, cctx(ns))
            await n.node.Start(pb.StartRequest(id="t"), cctx(ns))
        assert sorted(n.made) == [("a", "t"), ("b", "t")]
        with pytest.raises(errdefs.AlreadyExists):
            await n.node.Create(pb.CreateTaskRequest(id="t", bundle="/x"), cctx("a"))
        with pytest.raises(errdefs.NotFound, match="namespace c"):
            n.node.State(pb.StateRequest(id="t"), cctx("c"))
        await n.node.Kill(pb.KillRequest(id="t", signal=9), cctx("a"))
        assert (await n.node.Wait(pb.WaitRequest(id="t"), cctx("a"))).exit_status == 137
        st = n.node.State(pb.StateRequest(id="t"), cctx("b"))
        assert st.status == 2  # b's t is still RUNNING
        await n.node.Delete(pb.DeleteRequest(id="t"), cctx("a"))
        assert list(n.node.services) == [("b", "t")]  # a's service held nothing: dropped
        assert not n.node.empty
        await n.node.Shutdown(pb.ShutdownRequest(id="t"), cctx("b"))  # never ends a node
        # a call without namespace metadata belongs to the daemon's own namespace
        with pytest.raises(errdefs.NotFound, match="namespace default"):
            n.node.State(pb.StateRequest(id="t"), cctx(None))

    run(main)


def test_tasks_of_one_pod_share_a_service_and_pods_do_not(tmp_path: Path) -> None:
    async def main() -> None:
        n = Node()
        for tid, sid in (("p1", "p1"), ("c1", "p1"), ("p2", "p2")):
            b = bundle(tmp_path, tid, {SANDBOX_ID_ANNOTATION: sid})
            await n.node.Create(pb.CreateTaskRequest(id=tid, bundle=b), cctx("k8s.io"))
        assert sorted(n.made) == [("k8s.io", "p1"), ("k8s.io", "p2")]
        assert sorted(n.node.services[("k8s.io", "p1")].tasks) == ["c1", "p1"]
        assert sorted(n.node.tasks) == ["c1", "p1", "p2"]

    run(main)


def test_a_failed_create_leaves_no_route(tmp_path: Path) -> None:
    async def main() -> None:
        n = Node()
        with pytest.raises(errdefs.InvalidArgument):  # not a directory: the service says so
            await n.node.Create(pb.CreateTaskRequest(id="t", bundle="/no/such"), cctx("a"))
        assert n.node.services == {} and n.node.empty
        b = bundle(tmp_path, "t")
        await n.node.Create(pb.CreateTaskRequest(id="t", bundle=b), cctx("a"))  # retry works

    run(main)


def test_delete_marks_the_bundle_for_the_delete_action(tmp_path: Path) -> None:
    async def main() -> None:
        n = Node()
        b = bundle(tmp_path, "t")
        await n.node.Create(pb.CreateTaskRequest(id="t", bundle=b), cctx("a"))
        mark = Path(b) / files.DELETED
        await n.node.Start(pb.StartRequest(id="t"), cctx("a"))
        await n.node.Exec(pb.ExecProcessRequest(id="t", exec_id="e"), cctx("a"))
        await n.node.Kill(pb.KillRequest(id="t", signal=9), cctx("a"))
        with pytest.raises(errdefs.ShimError):  # a refused Delete marks nothing
            await n.node.Delete(pb.DeleteRequest(id="t", exec_id="nope"), cctx("a"))
        assert not mark.exists()
        d = await n.node.Delete(pb.DeleteRequest(id="t"), cctx("a"))
        assert mark.read_text() == f"{d.pid} {d.exit_status}\n"

    run(main)
