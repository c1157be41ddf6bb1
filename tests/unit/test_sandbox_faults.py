"""The sandbox task cannot be wedged: bad signals change nothing, signals pause never
sees do not end the pod, and a failing host teardown still releases Wait and Delete with
a ``/tasks/exit`` (each of these hung or ended the pod before)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

import pytest

from podshim import errors as errdefs
from podshim.api.events import task_pb2 as evpb
from podshim.api.task.v2 import shim_pb2 as pb
from podshim.linux.reaper import Reaper
from podshim.pod.pod import Pod
from podshim.service.tasks import TaskService
from podshim.task.contract import ExitInfo, ShimContext
from podshim.task.states import Status
from podshim.ttrpc.services import CallContext
from tests.unit.fakes import FakeHost, RecordingPublisher

CTX = CallContext("containerd.task.v2.Task", "x", {})
ANN = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod1"}


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 30))


class BrokenCloseHost(FakeHost):
    """A host whose teardown raises (a bug, a busy cgroup, an injected fault) until
    ``broken`` is cleared."""

    broken = True

    async def close(self) -> None:
        await super().close()
        if self.broken:
            raise RuntimeError("injected: host teardown failed")


async def shim(host: FakeHost) -> tuple[TaskService, RecordingPublisher]:
    pub = RecordingPublisher()
    svc = TaskService(ShimContext("k8s.io", Reaper(), pub), lambda: None)
    spec = {"annotations": ANN, "linux": {"namespaces": [{"type": "ipc"}]}}
    p = await Pod.create(svc.ctx, "pod1", "/b/pod1", spec, "fake", host=host)
    assert p.sandbox is not None
    await p.sandbox.start("")
    svc.pod, svc.tasks["pod1"] = p, p.sandbox
    return svc, pub


async def status(svc: TaskService) -> int:
    return svc.State(pb.StateRequest(id="pod1"), CTX).status


@pytest.mark.parametrize("sig", [0, 65, 2**32 - 128, 2**32 - 1])
def test_signals_outside_1_to_64_are_invalid_and_change_nothing(sig: int) -> None:
    async def main() -> None:
        svc, pub = await shim(FakeHost())
        with pytest.raises(errdefs.InvalidArgument, match="not in 1-64"):
            await svc.Kill(pb.KillRequest(id="pod1", signal=sig), CTX)
        with pytest.raises(errdefs.InvalidArgument):
            await svc.Kill(pb.KillRequest(id="pod1", signal=sig, all=True), CTX)
        assert await status(svc) == Status.RUNNING.value
        assert not [e for _t, e in pub.events if isinstance(e, evpb.TaskExit)]
        # and the pod still stops normally afterwards
        await svc.Kill(pb.KillRequest(id="pod1", signal=9), CTX)
        w = await asyncio.wait_for(svc.Wait(pb.WaitRequest(id="pod1"), CTX), 5)
        assert w.exit_status == 137
        await svc.Delete(pb.DeleteRequest(id="pod1"), CTX)

    run(main)


@pytest.mark.parametrize(
    "sig", [signal.SIGWINCH, signal.SIGCHLD, signal.SIGURG, signal.SIGHUP, signal.SIGUSR1]
)
def test_signals_pause_never_sees_do_not_end_the_sandbox(sig: int) -> None:
    async def main() -> None:
        svc, _ = await shim(FakeHost())
        await svc.Kill(pb.KillRequest(id="pod1", signal=sig), CTX)
        assert await status(svc) == Status.RUNNING.value
        await svc.Kill(pb.KillRequest(id="pod1", signal=signal.SIGTERM), CTX)
        w = await asyncio.wait_for(svc.Wait(pb.WaitRequest(id="pod1"), CTX), 5)
        assert w.exit_status == 128 + signal.SIGTERM
        await svc.Delete(pb.DeleteRequest(id="pod1"), CTX)

    run(main)


def test_a_failing_host_teardown_still_releases_wait_and_answers_delete() -> None:
    """Wait and /tasks/exit are not held up; Delete answers the failure at once (it
    used to answer success and leave the host's remains) and succeeds when retried
    once the host can be torn down."""

    async def main() -> None:
        host = BrokenCloseHost()
        svc, pub = await shim(host)
        waiter = asyncio.ensure_future(svc.Wait(pb.WaitRequest(id="pod1"), CTX))
        await svc.Kill(pb.KillRequest(id="pod1", signal=9), CTX)
        t0 = time.monotonic()
        w = await asyncio.wait_for(waiter, 1.0)
        assert w.exit_status == 137
        with pytest.raises(errdefs.Unavailable, match="injected: host teardown failed"):
            await asyncio.wait_for(svc.Delete(pb.DeleteRequest(id="pod1"), CTX), 1.0)
        assert time.monotonic() - t0 < 1.0
        assert "pod1" in svc.tasks and await status(svc) == Status.STOPPED.value
        host.broken = False
        d = await asyncio.wait_for(svc.Delete(pb.DeleteRequest(id="pod1"), CTX), 1.0)
        assert d.exit_status == 137 and "pod1" not in svc.tasks
        exits = [e for _t, e in pub.events if isinstance(e, evpb.TaskExit)]
        assert [e.exit_status for e in exits] == [137]
        assert pub.topics.count("/tasks/delete") == 1

    run(main)


def test_a_host_death_with_a_failing_teardown_is_an_exit_too() -> None:
    async def main() -> None:
        host = BrokenCloseHost()
        svc, pub = await shim(host)
        host.die(3)
        w = await asyncio.wait_for(svc.Wait(pb.WaitRequest(id="pod1"), CTX), 1.0)
        assert w.exit_status == 1  # the seed's status for a dead host
        assert [e.exit_status for _t, e in pub.events if isinstance(e, evpb.TaskExit)] == [1]
        with pytest.raises(errdefs.Unavailable):
            await asyncio.wait_for(svc.Delete(pb.DeleteRequest(id="pod1"), CTX), 1.0)
        host.broken = False
        await asyncio.wait_for(svc.Delete(pb.DeleteRequest(id="pod1"), CTX), 1.0)

    run(main)


def test_exit_statuses_fit_uint32() -> None:
    assert ExitInfo(2**40, 0.0).status == 2**32 - 1
    assert ExitInfo(-1, 0.0).status == 255
    assert ExitInfo(137, 0.0).status == 137
    pb.WaitResponse(exit_status=ExitInfo(2**33, 0.0).status)  # encodes
