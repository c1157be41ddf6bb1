"""The Diag service's handlers with fakes (host, containers), and over a real ttrpc
server; the daemon glue (registry entry following the pod)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.api.cgroups.v1 import metrics_pb2 as v1
from podshim.api.diag.v1 import diag_pb2 as pb
from podshim.api.task.v2 import shim_pb2
from podshim.cgroups.stats import pack, unpack
from podshim.diag.registry import entry_name
from podshim.diag.service import SERVICE, DiagService
from podshim.diag.shim import ShimDiag
from podshim.host.contract import Host
from podshim.host.control import ExecControl
from podshim.host.none import NoneHost
from podshim.linux.reaper import Reaper
from podshim.pod.pod import Pod
from podshim.service.tasks import TaskService
from podshim.task.contract import ExitInfo, ProcessState, ShimContext
from podshim.task.states import Status
from podshim.ttrpc.client import Client
from podshim.ttrpc.server import Server
from podshim.ttrpc.services import CallContext, bind
from tests.unit.fakes import RecordingPublisher

from .fakes import FakeHost

CTX = CallContext("podshim.diag.v1.Diag", "X", {})
ANN = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod1"}


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 30))


def metrics(memory: int, pids: int) -> any_pb2.Any:
    m = v1.Metrics()
    m.memory.usage.usage = memory
    m.pids.current = pids
    return pack(m)


class StatsHost(FakeHost):
    """A fake host with stacks and v1 metrics of its own."""

    async def dump_stacks(self) -> str:
        return "guest stacks here"

    async def stats(self) -> any_pb2.Any | None:
        return metrics(1 << 20, 1)


class FakeTask:
    """A container as the Diag service sees it: init state, execs, stats."""

    def __init__(self, tid: str, status: Status, pid: int, exit: int | None = None) -> None:
        self.id, self.bundle = tid, f"/b/{tid}"
        self.procs: dict[str, tuple[Status, int, int | None]] = {"": (status, pid, exit)}
        self.execs: dict[str, object] = {}
        self.stats_value: any_pb2.Any | None = None

    @property
    def pid(self) -> int:
        return self.procs[""][1]

    def add_exec(self, eid: str, status: Status, pid: int, exit: int | None = None) -> None:
        self.procs[eid] = (status, pid, exit)
        self.execs[eid] = object()

    def state(self, exec_id: str) -> ProcessState:
        if exec_id not in self.procs:
            raise errdefs.NotFound(exec_id)
        status, pid, code = self.procs[exec_id]
        ex = ExitInfo(code, 1.0) if code is not None else None
        return ProcessState(self.id, exec_id, self.bundle, pid, status, "", "", "", False, ex)

    async def stats(self) -> any_pb2.Any:
        if self.stats_value is None:
            raise errdefs.NotFound(f"task {self.id}: no running process")
        return self.stats_value


async def shim(host: Host | None = None, pod: bool = True) -> TaskService:
    svc = TaskService(ShimContext("k8s.io", Reaper(), RecordingPublisher()), lambda: None)
    if pod:
        spec = {"annotations": ANN, "linux": {"namespaces": [{"type": "ipc"}]}}
        p = await Pod.create(svc.ctx, "pod1", "/b/pod1", spec, "fake", host=host or FakeHost())
        assert p.sandbox is not None
        await p.sandbox.start("")
        svc.pod, svc.tasks["pod1"] = p, p.sandbox
    return svc


def add(svc: TaskService, task: FakeTask) -> FakeTask:
    svc.tasks[task.id] = task  # type: ignore[assignment]
    return task


async def release(svc: TaskService) -> None:
    if svc.pod is not None:
        await svc.pod.release()


def test_tasks_is_the_shims_own_view_with_execs() -> None:
    async def main() -> None:
        svc = await shim()
        c1 = add(svc, FakeTask("c1", Status.RUNNING, 501))
        c1.add_exec("e1", Status.RUNNING, 601)
        c1.add_exec("e2", Status.STOPPED, 602, exit=3)
        add(svc, FakeTask("c2", Status.STOPPED, 502, exit=137))
        diag = DiagService(svc)

        resp = await diag.Tasks(pb.TasksRequest(), CTX)
        got = [(t.id, t.kind, t.state, t.pid, t.exit_status, len(t.execs)) for t in resp.tasks]
        assert got == [
            ("c1", "container", "running", 501, 0, 0),
            ("c2", "container", "stopped", 502, 137, 0),
            ("pod1", "sandbox", "running", svc.tasks["pod1"].pid, 0, 0),
        ]
        assert resp.tasks[0].bundle == "/b/c1"
        resp = await diag.Tasks(pb.TasksRequest(execs=True), CTX)
        execs = [(x.id, x.state, x.pid, x.exit_status) for x in resp.tasks[0].execs]
        assert execs == [("e1", "running", 601, 0), ("e2", "stopped", 602, 3)]
        await release(svc)

    run(main)


async def sleeper_coroutine(ev: asyncio.Event) -> None:
    await ev.wait()


def parked_thread(ev: threading.Event) -> None:
    ev.wait(30)


def test_stacks_show_every_asyncio_task_thread_and_the_host() -> None:
    async def main() -> None:
        svc = await shim(StatsHost())
        ev, tev = asyncio.Event(), threading.Event()
        task = asyncio.create_task(sleeper_coroutine(ev), name="diag-test-sleeper")
        thread = threading.Thread(target=parked_thread, args=(tev,), name="diag-test-thread")
        thread.start()
        await asyncio.sleep(0)
        try:
            resp = await DiagService(svc).Stacks(pb.StacksRequest(), CTX)
        finally:
            ev.set()
            tev.set()
            thread.join()
            await task
        assert "--- task diag-test-sleeper (sleeper_coroutine)" in resp.stacks
        assert "in sleeper_coroutine" in resp.stacks
        assert "podSandboxTask::waitHostExit" in resp.stacks  # the pod's own tasks
        assert "diag-test-thread" in resp.stacks and "in parked_thread" in resp.stacks
        assert "MainThread" in resp.stacks
        assert resp.host_stacks == "guest stacks here"
        await release(svc)

    run(main)


def test_pod_rpcs_need_a_pod_and_a_host_that_can() -> None:
    async def main() -> None:
        svc = await shim(pod=False)
        diag = DiagService(svc)
        for call in (
            diag.ExecInHost(pb.ExecInHostRequest(args=["true"]), CTX),
            diag.Share(pb.ShareRequest(host_path="/a", pod_path="/b"), CTX),
        ):
            with pytest.raises(errdefs.FailedPrecondition, match="no pod host"):
                await call
        assert (await diag.Stacks(pb.StacksRequest(), CTX)).host_stacks == ""
        assert (await diag.Pid(pb.PidRequest(), CTX)).pid == os.getpid()
        assert not (await diag.Tasks(pb.TasksRequest(), CTX)).tasks

        svc = await shim(NoneHost())
        diag = DiagService(svc)
        with pytest.raises(errdefs.FailedPrecondition, match="nowhere to exec"):
            await diag.ExecInHost(pb.ExecInHostRequest(args=["true"]), CTX)
        with pytest.raises(errdefs.FailedPrecondition, match="nothing to share"):
            await diag.Share(pb.ShareRequest(host_path="/a", pod_path="/b", read_only=True), CTX)
        with pytest.raises(errdefs.InvalidArgument):
            await diag.Share(pb.ShareRequest(host_path="/a"), CTX)
        await release(svc)

    run(main)


class ExecHost(FakeHost):
    """Records each exec's control, attaches to it and runs until released."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []
        self.signals: list[int] = []
        self.sizes: list[tuple[int, int]] = []
        self.release = asyncio.Event()

    async def exec_in_host(
        self,
        args: list[str],
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        control: ExecControl | None = None,
    ) -> int:
        assert control is not None  # the Diag service always passes its control
        self.controls.append(control)
        self.calls.append((args, stdin, stdout, stderr, terminal))
        control.attach(4242, self.signals.append, lambda w, h: self.sizes.append((w, h)))
        try:
            await self.release.wait()
        finally:
            control.detach()
        return 42


def test_exec_in_host_options_signal_and_resize_reach_the_host() -> None:
    async def main() -> None:
        host = ExecHost()
        svc = await shim(host)
        diag = DiagService(svc)
        req = pb.ExecInHostRequest(args=["sh", "-c", "x"], stdin="/i", stdout="/o", terminal=True,
                                   env=["A=1"], workdir="/tmp", exec_id="x1", width=80, height=24)  # fmt: skip
        call = asyncio.create_task(diag.ExecInHost(req, CTX))
        while not host.controls:
            await asyncio.sleep(0.01)
        c = host.controls[0]
        assert (c.exec_id, c.workdir, c.env, c.width, c.height, c.pid) == (
            "x1", "/tmp", ("A=1",), 80, 24, 4242,
        )  # fmt: skip
        assert host.calls == [(["sh", "-c", "x"], "/i", "/o", "", True)]
        with pytest.raises(errdefs.AlreadyExists):
            await diag.ExecInHost(req, CTX)
        await diag.SignalExecInHost(pb.SignalExecInHostRequest(exec_id="x1", signal=2), CTX)
        await diag.ResizeExecInHost(
            pb.ResizeExecInHostRequest(exec_id="x1", width=9, height=3), CTX
        )
        assert (host.signals, host.sizes) == ([2], [(9, 3)])
        with pytest.raises(errdefs.NotFound):
            await diag.SignalExecInHost(pb.SignalExecInHostRequest(exec_id="x2", signal=2), CTX)
        with pytest.raises(errdefs.InvalidArgument):
            await diag.SignalExecInHost(pb.SignalExecInHostRequest(exec_id="x1", signal=99), CTX)
        host.release.set()
        assert (await call).exit_code == 42
        with pytest.raises(errdefs.NotFound):  # gone with its call
            await diag.SignalExecInHost(pb.SignalExecInHostRequest(exec_id="x1", signal=2), CTX)
        with pytest.raises(errdefs.InvalidArgument, match="no command"):
            await diag.ExecInHost(pb.ExecInHostRequest(), CTX)
        assert not diag.execs
        await release(svc)

    run(main)


def test_control_keeps_early_signals_and_refuses_after_exit() -> None:
    c = ExecControl("e")
    c.signal(2)  # the process is starting: kept for it
    c.signal(15)
    c.resize(10, 5)
    c.resize(80, 24)
    signals: list[int] = []
    sizes: list[tuple[int, int]] = []
    c.attach(7, signals.append, lambda w, h: sizes.append((w, h)))
    assert (c.pid, signals, sizes) == (7, [2, 15], [(80, 24)])
    c.signal(9)
    assert signals == [2, 15, 9]
    c.detach()
    with pytest.raises(errdefs.FailedPrecondition, match="exec e in the pod host is not running"):
        c.signal(2)
    with pytest.raises(errdefs.FailedPrecondition):
        c.resize(1, 1)
    assert c.pid == 0


def test_stats_per_task_and_the_pods_figure() -> None:
    async def main() -> None:
        svc = await shim(StatsHost())
        add(svc, FakeTask("c1", Status.RUNNING, 501)).stats_value = metrics(10 << 20, 2)
        add(svc, FakeTask("c2", Status.STOPPED, 502, exit=0))  # no process: skipped
        resp = await DiagService(svc).Stats(pb.StatsRequest(), CTX)
        assert [t.id for t in resp.tasks] == ["c1", "pod1"]
        assert resp.stats == resp.tasks[1].stats  # the sandbox's Stats is the pod's
        await release(svc)

        svc = await shim(pod=False)  # a shim of standalone containers: their sum
        add(svc, FakeTask("c1", Status.RUNNING, 501)).stats_value = metrics(10 << 20, 2)
        add(svc, FakeTask("c3", Status.RUNNING, 503)).stats_value = metrics(1 << 20, 1)
        resp = await DiagService(svc).Stats(pb.StatsRequest(), CTX)
        total = unpack(resp.stats)
        assert isinstance(total, v1.Metrics)
        assert (total.memory.usage.usage, total.pids.current) == (11 << 20, 3)

    run(main)


def test_diag_over_ttrpc_and_the_entry_follows_the_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PODSHIM_RUN_DIR", str(tmp_path))
    sock = str(tmp_path / "shim.sock")

    async def main() -> None:
        svc = await shim(pod=False)
        tasks = bind(shim_pb2.DESCRIPTOR.services_by_name["Task"], svc)
        diag = ShimDiag(svc, tasks, address="/run/c.sock", namespace="k8s.io",
                        first_id="pod1", socket_path=sock)  # fmt: skip
        server = Server([tasks, diag.binding])
        await server.serve_path(sock)
        diag.register()
        entry = tmp_path / "shims" / entry_name(sock)
        assert json.loads(entry.read_text())["pod_id"] == ""
        async with Client(sock) as client:
            got = await client.call(SERVICE, "Pid", pb.PidRequest(), pb.PidResponse)
            assert got.pid == os.getpid()
            # a Create (here a failing one) after which the shim holds a pod
            other = await shim(FakeHost())
            svc.pod = other.pod
            with pytest.raises(errdefs.ShimError):
                req = shim_pb2.CreateTaskRequest(id="pod1", bundle="/nonexistent")
                await client.call(
                    "containerd.task.v2.Task", "Create", req, shim_pb2.CreateTaskResponse
                )
            assert json.loads(entry.read_text())["pod_id"] == "pod1"
            resp = await client.call(SERVICE, "Tasks", pb.TasksRequest(), pb.TasksResponse)
            assert not resp.tasks
        diag.unregister()
        assert not entry.exists()
        await server.shutdown(grace=0)
        await release(other)

    run(main)


def test_stacks_of_a_busy_loop_return_promptly() -> None:
    async def main() -> None:
        svc = await shim(pod=False)
        tasks = [asyncio.create_task(asyncio.sleep(5), name=f"t{i}") for i in range(200)]
        t0 = time.monotonic()
        resp = await DiagService(svc).Stacks(pb.StacksRequest(), CTX)
        assert time.monotonic() - t0 < 5
        assert "=== 202 asyncio tasks ===" in resp.stacks  # and the test's wait_for + main
        for t in tasks:
            t.cancel()

    run(main)
