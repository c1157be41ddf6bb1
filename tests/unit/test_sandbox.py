"""The sandbox task's contracts: the seed's state machine, its defects fixed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from google.protobuf.message import Message

from podshim import errors as errdefs
from podshim.api.events import task_pb2 as ev
from podshim.host.none import NoneHost
from podshim.linux.reaper import Reaper
from podshim.pod.sandbox import SandboxTask
from podshim.task.contract import ExecRequest, ShimContext
from podshim.task.states import Status
from tests.unit.fakes import RecordingPublisher

from .fakes import FakeHost

P = 4242


class Harness:
    def __init__(self, host: FakeHost | NoneHost | None = None) -> None:
        self.pub = RecordingPublisher()
        self.host = host or FakeHost()
        self.killed: list[int] = []
        self.order: list[str] = []

        async def kill_workloads(sig: int) -> None:
            self.killed.append(sig)
            self.order.append(f"workloads:{sig}")

        ctx = ShimContext("k8s.io", Reaper(), self.pub)
        self.task = SandboxTask(ctx, "pod1", "/b/pod1", self.host, P, kill_workloads)

    async def begin(self) -> SandboxTask:
        await self.host.create()
        self.task.begin()
        return self.task

    def events(self) -> list[tuple[str, Message]]:
        return list(self.pub.events)

    def topics(self) -> list[str]:
        return [t for t, _ in self.pub.events]


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 30))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_pid_is_the_anchor_everywhere_and_create_start_events() -> None:
    async def main() -> None:
        h = Harness()
        t = await h.begin()
        assert t.state("").pid == P and t.state("").status is Status.CREATED
        assert await t.start("") == P
        assert t.state("").status is Status.RUNNING
        (_, create), (_, start) = h.events()
        assert (
            isinstance(create, ev.TaskCreate) and create.pid == P and create.container_id == "pod1"
        )
        assert isinstance(start, ev.TaskStart) and start.pid == P
        with pytest.raises(errdefs.FailedPrecondition, match="cannot start a running"):
            await t.start("")

    run(main)


def test_execs_do_not_exist_on_a_sandbox() -> None:
    async def main() -> None:
        t = await Harness().begin()
        await t.start("")
        req = ExecRequest(
            "e1", False, "", "", "", __import__("google.protobuf.any_pb2").protobuf.any_pb2.Any()
        )
        with pytest.raises(errdefs.NotImplemented):
            await t.exec(req)
        for call in (lambda: t.state("e1"), lambda: t.close_io("e1")):
            with pytest.raises(errdefs.NotFound):
                call()
        with pytest.raises(errdefs.NotFound):
            await t.start("e1")
        with pytest.raises(errdefs.NotFound):
            await t.wait("e1")
        with pytest.raises(errdefs.FailedPrecondition):  # all with an exec id: checked first
            await t.kill("e1", 9, True)
        with pytest.raises(errdefs.FailedPrecondition, match="not a tty"):
            t.resize("", 80, 24)

    run(main)


def test_kill_exit_event_fields_and_wait_after_close() -> None:
    async def main() -> None:
        h = Harness()
        t = await h.begin()
        await t.start("")
        waiter = asyncio.create_task(t.wait(""))
        await settle()
        assert not waiter.done()  # Wait blocks until the task is closed
        await t.kill("", 9, False)
        ex = await waiter
        assert ex.status == 137
        assert h.host.closes == 1  # type: ignore[union-attr]
        topic, exit_ev = h.events()[-1]
        assert topic == "/tasks/exit"
        assert isinstance(exit_ev, ev.TaskExit)
        assert (exit_ev.container_id, exit_ev.id, exit_ev.pid, exit_ev.exit_status) == (
            "pod1",
            "pod1",
            P,
            137,
        )
        assert abs(exit_ev.exited_at.ToNanoseconds() / 1e9 - ex.at) < 1e-3
        assert (await t.wait("")).status == 137  # any number of times
        with pytest.raises(errdefs.NotFound, match="already finished"):
            await t.kill("", 9, False)

    run(main)


def test_close_is_idempotent() -> None:
    async def main() -> None:
        h = Harness()
        t = await h.begin()
        await t.start("")
        t.force_exit(3)
        t.force_exit(4)  # ignored: already exited
        await asyncio.gather(t.close(), t.close(), t.wait(""))
        await settle()
        assert h.topics().count("/tasks/exit") == 1
        assert h.host.closes == 1  # type: ignore[union-attr]
        assert (await t.wait("")).status == 3  # ForceExit's status is honoured

    run(main)


def test_delete_in_each_state() -> None:
    async def main() -> None:
        # Running: refused
        h = Harness()
        t = await h.begin()
        await t.start("")
        with pytest.raises(errdefs.FailedPrecondition, match="cannot delete a running"):
            await t.delete("")
        # Exited: exit published before delete
        await t.kill("", 15, False)
        pid, ex = await t.delete("")
        assert (pid, ex.status) == (P, 143)
        assert h.topics()[-2:] == ["/tasks/exit", "/tasks/delete"]
        _, d = h.events()[-1]
        assert isinstance(d, ev.TaskDelete) and (d.pid, d.exit_status) == (P, 143)
        with pytest.raises(errdefs.NotFound):
            await t.delete("")
        # Created: force-exited first, still exit before delete
        h2 = Harness()
        t2 = await h2.begin()
        pid, ex = await t2.delete("")
        assert ex.status == 0
        assert h2.topics() == ["/tasks/create", "/tasks/exit", "/tasks/delete"]

    run(main)


def test_host_death_kills_workloads_exits_1_and_closes() -> None:
    async def main() -> None:
        host = FakeHost()
        h = Harness(host)
        t = await h.begin()
        await t.start("")
        host.die(137)
        ex = await t.wait("")
        assert ex.status == 1
        assert h.killed == [9]
        assert h.topics()[-1] == "/tasks/exit"
        assert t.state("").status is Status.STOPPED

    run(main)


def test_kill_all_reaches_workloads_first_and_after_the_sandbox_exited() -> None:
    async def main() -> None:
        h = Harness()
        t = await h.begin()
        await t.start("")
        await t.kill("", 9, True)
        assert h.killed == [9]
        await t.wait("")
        with pytest.raises(errdefs.NotFound):
            await t.kill("", 9, True)
        assert h.killed == [9, 9]  # the workloads were still signalled

    run(main)


def test_stats_with_no_host_does_not_crash() -> None:
    async def main() -> None:
        h = Harness(NoneHost())
        t = await h.begin()
        got = await t.stats()
        assert got.type_url in (
            "io.containerd.cgroups.v1.Metrics",
            "io.containerd.cgroups.v2.Metrics",
        )
        assert await t.pids() == [(t.pid, "")]  # no PID init: the anchor, never []

    run(main)


def test_pause_update_are_not_implemented() -> None:
    async def main() -> None:
        t = await Harness().begin()
        with pytest.raises(errdefs.NotImplemented):
            await t.pause()
        with pytest.raises(errdefs.NotImplemented):
            await t.resume()

    run(main)
