"""``podshim.diag.v1.Diag``: a shim's diagnostics, served next to its Task service.

Everything acts on the shim's pod (ExecInHost, Share) or on the shim itself (Stacks,
Tasks, Pid, Stats). A shim that holds no pod answers the pod RPCs with
FailedPrecondition("no pod host"); so does a pod whose host kind cannot do it (the
``none`` host has nowhere to exec and nothing to share into).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import sys
import threading
import traceback
from typing import TYPE_CHECKING

from google.protobuf import any_pb2, empty_pb2

from podshim import errors as errdefs
from podshim.api.cgroups.v1 import metrics_pb2 as v1
from podshim.api.cgroups.v2 import metrics_pb2 as v2
from podshim.api.diag.v1 import diag_pb2 as pb
from podshim.cgroups.stats import pack, sum_metrics, unpack
from podshim.host.control import ExecControl
from podshim.task.contract import Task
from podshim.ttrpc.services import CallContext

if TYPE_CHECKING:
    from podshim.pod.pod import Pod
    from podshim.service.router import NodeService
    from podshim.service.tasks import TaskService

    Shim = TaskService | NodeService  # one pod's service, or a node daemon's

log = logging.getLogger("podshim.diag")

SERVICE = pb.DESCRIPTOR.services_by_name["Diag"].full_name  # "podshim.diag.v1.Diag"


def format_stacks() -> str:
    """Every asyncio task's stack (of the running loop) and every thread's stack."""
    out = io.StringIO()
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    out.write(f"=== {len(tasks)} asyncio tasks ===\n")
    for task in tasks:
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", type(coro).__name__)
        out.write(f"\n--- task {task.get_name()} ({name})\n")
        task.print_stack(file=out)
    frames = sys._current_frames()
    threads = {t.ident: t for t in threading.enumerate()}
    out.write(f"\n=== {len(frames)} threads ===\n")
    for ident, frame in sorted(frames.items()):
        t = threads.get(ident)
        label = f"{t.name}{' (daemon)' if t.daemon else ''}" if t else "?"
        out.write(f"\n--- thread {ident} {label}\n")
        out.write("".join(traceback.format_stack(frame)))
    return out.getvalue()


def task_kind(pod: Pod | None, tid: str) -> str:
    return "sandbox" if pod is not None and tid == pod.id else "container"


def _exec_ids(task: Task) -> list[str]:
    """A container's exec ids (``Container.execs``); none for other kinds of task."""
    execs = getattr(task, "execs", None)
    return sorted(execs) if isinstance(execs, dict) else []


def describe_task(tid: str, task: Task, kind: str, execs: bool) -> pb.DiagTask:
    st = task.state("")
    out = pb.DiagTask(id=tid, kind=kind, state=st.status.name.lower(), pid=max(st.pid, 0),
                      bundle=task.bundle)  # fmt: skip
    if st.exit is not None:
        out.exit_status = st.exit.status
    for eid in _exec_ids(task) if execs else []:
        try:
            es = task.state(eid)
        except errdefs.NotFound:
            continue  # deleted meanwhile
        item = out.execs.add(id=eid, state=es.status.name.lower(), pid=max(es.pid, 0))
        if es.exit is not None:
            item.exit_status = es.exit.status
    return out


def describe_host(pod: Pod) -> dict[str, str]:
    """The pod host's kind and, where the kind reports more (an optional
    ``describe() -> dict`` of the host, e.g. a VM's accelerator), that."""
    out = {"kind": str(pod.host.kind)}
    describe = getattr(pod.host, "describe", None)
    if callable(describe):
        out.update({str(k): str(v) for k, v in describe().items()})
    return out


def pod_total(items: list[any_pb2.Any]) -> any_pb2.Any | None:
    """The sum of metrics of one cgroup version, or None when there is nothing to add
    up (or versions are mixed)."""
    try:
        metrics = [unpack(a) for a in items]
    except errdefs.InvalidArgument:
        return None
    m1 = [m for m in metrics if isinstance(m, v1.Metrics)]
    m2 = [m for m in metrics if isinstance(m, v2.Metrics)]
    if m1 and not m2:
        return pack(sum_metrics(m1))
    if m2 and not m1:
        return pack(sum_metrics(m2))
    return None


async def collect_stats(service: Shim) -> pb.StatsResponse:
    """Each task's Stats (tasks without a live process are skipped) and the pod-level
    figure: the sandbox's Stats (the whole pod's), else, in a shim without a pod, the
    sum of its tasks'."""
    resp = pb.StatsResponse()
    for tid, task in sorted(service.tasks.items()):
        try:
            resp.tasks.add(id=tid, stats=await task.stats())
        except (errdefs.NotFound, errdefs.NotImplemented):
            continue
    pod = service.pod
    sandbox = next((t for t in resp.tasks if pod is not None and t.id == pod.id), None)
    total = sandbox.stats if sandbox is not None else pod_total([t.stats for t in resp.tasks])
    if total is not None:
        resp.stats.CopyFrom(total)
    return resp


class DiagService:
    """The Diag API of one shim; ``shim`` is its Task service (tasks and pod)."""

    def __init__(self, shim: Shim) -> None:
        self.shim = shim
        #: running ExecInHost calls by exec id ("#n" for calls without one)
        self.execs: dict[str, ExecControl] = {}
        self._anon = itertools.count(1)

    def _pod(self) -> Pod:
        pod = self.shim.pod
        if pod is None:
            raise errdefs.FailedPrecondition("no pod host: this shim holds no pod sandbox")
        return pod

    def _exec(self, exec_id: str) -> ExecControl:
        control = self.execs.get(exec_id) if exec_id else None
        if control is None:
            raise errdefs.NotFound(f"exec {exec_id!r} in the pod host: not found")
        return control

    async def ExecInHost(self, req: pb.ExecInHostRequest, _: CallContext) -> pb.ExecInHostResponse:
        pod = self._pod()
        if not req.args:
            raise errdefs.InvalidArgument("exec in the pod host: no command")
        if req.exec_id in self.execs:
            raise errdefs.AlreadyExists(f"exec {req.exec_id} in the pod host: already exists")
        control = ExecControl(req.exec_id, workdir=req.workdir, env=tuple(req.env),
                              width=req.width, height=req.height)  # fmt: skip
        key = req.exec_id or f"#{next(self._anon)}"
        self.execs[key] = control
        log.info("pod %s: exec in host %s (%s)", pod.id, list(req.args), key)
        try:
            code = await pod.host.exec_in_host(
                list(req.args), req.stdin, req.stdout, req.stderr, req.terminal, control
            )
        finally:
            del self.execs[key]
        return pb.ExecInHostResponse(exit_code=code)

    async def SignalExecInHost(
        self, req: pb.SignalExecInHostRequest, _: CallContext
    ) -> empty_pb2.Empty:
        if not 0 <= req.signal < 65:
            raise errdefs.InvalidArgument(f"signal {req.signal}: out of range")
        self._exec(req.exec_id).signal(req.signal)
        return empty_pb2.Empty()

    async def ResizeExecInHost(
        self, req: pb.ResizeExecInHostRequest, _: CallContext
    ) -> empty_pb2.Empty:
        self._exec(req.exec_id).resize(req.width, req.height)
        return empty_pb2.Empty()

    async def Stacks(self, req: pb.StacksRequest, _: CallContext) -> pb.StacksResponse:
        pod = self.shim.pod
        host = await pod.host.dump_stacks() if pod is not None else ""
        return pb.StacksResponse(
            stacks=format_stacks(), host_stacks=host, modules=sorted(sys.modules)
        )

    async def Tasks(self, req: pb.TasksRequest, _: CallContext) -> pb.TasksResponse:
        pod = self.shim.pod
        resp = pb.TasksResponse()
        for tid, task in sorted(self.shim.tasks.items()):
            item = describe_task(tid, task, task_kind(pod, tid), req.execs)
            if pod is not None and tid == pod.id:
                item.host.update(describe_host(pod))
            resp.tasks.append(item)
        return resp

    async def Share(self, req: pb.ShareRequest, _: CallContext) -> pb.ShareResponse:
        if not req.host_path or not req.pod_path:
            raise errdefs.InvalidArgument("share: host path and pod path are both needed")
        pod = self._pod()
        pid = 0
        if req.container:
            found = [c for cid, c in pod.workloads.items() if cid.startswith(req.container)]
            if len(found) != 1:
                raise errdefs.NotFound(
                    f"share: {len(found) or 'no'} containers of pod {pod.id} match "
                    f"{req.container!r}"
                )
            if not found[0].running or not found[0].pid:
                raise errdefs.FailedPrecondition(f"share: container {req.container} is not running")
            pid = found[0].pid
        await pod.host.share(req.host_path, req.pod_path, req.read_only, pid)
        return pb.ShareResponse()

    async def Pid(self, req: pb.PidRequest, _: CallContext) -> pb.PidResponse:
        return pb.PidResponse(pid=os.getpid())

    async def Stats(self, req: pb.StatsRequest, _: CallContext) -> pb.StatsResponse:
        return await collect_stats(self.shim)
