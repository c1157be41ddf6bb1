"""The Task service routes calls to tasks and owns the shim's shutdown rule."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import pytest

from podshim import errors as errdefs
from podshim.api.task.v2 import shim_pb2 as pb
from podshim.linux.reaper import Reaper
from podshim.service.tasks import TaskService
from podshim.task.contract import ShimContext
from podshim.ttrpc.services import CallContext
from tests.unit.fakes import RecordingPublisher

from .fakes import FakeTask

CTX = CallContext("containerd.task.v2.Task", "x", {})


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 30))


def service() -> tuple[TaskService, list[bool]]:
    asked: list[bool] = []
    svc = TaskService(ShimContext("ns", Reaper(), RecordingPublisher()), lambda: asked.append(True))
    return svc, asked


@pytest.mark.parametrize("bad", ["a/b", "..", "../x", ""])
def test_invalid_ids_are_invalid_argument(bad: str) -> None:
    async def main() -> None:
        svc, _ = service()
        with pytest.raises(errdefs.InvalidArgument):
            svc.State(pb.StateRequest(id=bad), CTX)
        with pytest.raises(errdefs.InvalidArgument):
            await svc.Create(pb.CreateTaskRequest(id=bad, bundle="/tmp"), CTX)

    run(main)


def test_routing_connect_delete_and_the_shutdown_rule() -> None:
    async def main() -> None:
        svc, asked = service()
        with pytest.raises(errdefs.NotFound, match="task t1: not found"):
            svc.State(pb.StateRequest(id="t1"), CTX)
        task = FakeTask("t1")
        svc.tasks["t1"] = task
        assert (await svc.Start(pb.StartRequest(id="t1"), CTX)).pid == task.pid
        conn = await svc.Connect(pb.ConnectRequest(id="t1"), CTX)
        assert (conn.shim_pid, conn.task_pid) == (os.getpid(), task.pid)
        st = svc.State(pb.StateRequest(id="t1"), CTX)
        assert (st.id, st.pid, st.status) == ("t1", task.pid, 2)  # RUNNING
        await svc.Shutdown(pb.ShutdownRequest(id="t1"), CTX)
        await asyncio.sleep(0)
        assert asked == []  # a task remains: a successful no-op
        with pytest.raises(errdefs.NotImplemented, match="CRIU"):
            await svc.Checkpoint(pb.CheckpointTaskRequest(id="t1"), CTX)
        await svc.Kill(pb.KillRequest(id="t1", signal=9), CTX)
        w = await svc.Wait(pb.WaitRequest(id="t1"), CTX)
        assert w.exit_status == 137
        d = await svc.Delete(pb.DeleteRequest(id="t1"), CTX)
        assert d.exit_status == 137 and "t1" not in svc.tasks
        await svc.Shutdown(pb.ShutdownRequest(id="t1"), CTX)
        await asyncio.sleep(0)
        assert asked == [True]  # no task left: the shim ends

    run(main)


def test_create_refuses_duplicates_and_bad_bundles(tmp_path: object) -> None:
    async def main() -> None:
        svc, _ = service()
        svc.tasks["t1"] = FakeTask("t1")
        with pytest.raises(errdefs.AlreadyExists):
            await svc.Create(pb.CreateTaskRequest(id="t1", bundle="/tmp"), CTX)
        with pytest.raises(errdefs.InvalidArgument, match="is not a directory"):
            await svc.Create(pb.CreateTaskRequest(id="t2", bundle="relative/path"), CTX)
        with pytest.raises(errdefs.InvalidArgument, match=r"missing config\.json"):
            await svc.Create(pb.CreateTaskRequest(id="t3", bundle=str(tmp_path)), CTX)
        assert set(svc.tasks) == {"t1"}

    run(main)
