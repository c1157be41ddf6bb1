"""``containerd.task.v2.Task``: routes each call to its task; all behaviour lives in
the tasks (see the contracts in :mod:`podshim.task.contract`).

Like runhcs's service.go, every method is thin: look the task up, call it, translate the
answer to protobuf. Errors propagate as :mod:`podshim.errors` kinds; the ttrpc server
turns them into status codes in its one place.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence

from google.protobuf import any_pb2, empty_pb2

from podshim import __version__, logs
from podshim import errors as errdefs
from podshim.api.runc.options import oci_pb2
from podshim.api.task.v2 import shim_pb2 as pb
from podshim.oci import bundle as files
from podshim.oci.ids import CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION, valid_id
from podshim.oci.spec import Spec, load_spec, spec_annotations
from podshim.pod.pod import Pod
from podshim.service.config import Config, from_options
from podshim.task import container
from podshim.task.contract import (
    ExecRequest,
    ExitInfo,
    ShimContext,
    Task,
    check_signal,
    timestamp,
)
from podshim.ttrpc.services import CallContext

log = logging.getLogger("podshim.service")

#: makes a standalone task (not part of a pod) from its Create
TaskFactory = Callable[[ShimContext, pb.CreateTaskRequest, Config, Spec], Awaitable[Task]]
#: makes a pod from its sandbox's Create: (context, id, bundle, spec, host kind)
#: ``(ctx, id, bundle, spec, host kind, runtime=...)``: :meth:`Pod.create`
PodFactory = Callable[..., Awaitable[Pod]]
#: called after each successful Create with (service, task id, spec): the composition
#: root's extension point (diagnostics, the tests' fault hooks)
CreateObserver = Callable[["TaskService", str, Spec], None]


async def create_container(
    ctx: ShimContext, req: pb.CreateTaskRequest, cfg: Config, spec: Spec
) -> Task:
    """The default :data:`TaskFactory`: a local OCI container with the context's driver."""
    stdio = (req.terminal, req.stdin, req.stdout, req.stderr)
    return await container.create_container(
        ctx, req.id, req.bundle, spec, req.rootfs, cfg.runtime, stdio
    )


def check_id(tid: str) -> None:
    if not valid_id(tid):
        raise errdefs.InvalidArgument(f"task id {tid!r}: invalid identifier")


def _mark_deleted(bundle: str, pid: int, status: int) -> None:
    """Tell the ``delete`` action that containerd runs next that nothing is left of this
    task (see :data:`podshim.oci.bundle.DELETED`); without the mark it looks for itself."""
    try:
        with open(os.path.join(bundle, files.DELETED), "w") as f:
            f.write(f"{pid} {status}\n")
    except OSError as exc:
        log.debug("cannot mark %s deleted: %s", bundle, exc)


class TaskService:
    """The Task API of one shim process, for every task it holds.

    Collaborators are injected by the composition root (``podshim.shim.daemon``): the
    context (reaper, publisher, OCI driver factory, job group), the factories of
    standalone tasks and of pods, and observers of Create.
    """

    def __init__(
        self,
        ctx: ShimContext,
        request_shutdown: Callable[[], None],
        *,
        make_task: TaskFactory = create_container,
        make_pod: PodFactory = Pod.create,
        observers: Sequence[CreateObserver] = (),
    ) -> None:
        self.ctx = ctx
        self.tasks: dict[str, Task] = {}
        self._creating: set[str] = set()
        self._request_shutdown = request_shutdown
        self._make_task = make_task
        self._make_pod = make_pod
        self.observers = list(observers)
        #: shim-wide settings: fixed by the first Create
        self.config: Config | None = None
        #: the pod this shim serves, once a sandbox was created
        self.pod: Pod | None = None
        #: set whenever a task is added or removed (the daemon's idle watch clears it)
        self.activity = asyncio.Event()

    def _task(self, tid: str) -> Task:
        task = self.tasks.get(tid)
        if task is None:
            check_id(tid)  # a held task's id was checked by its Create
            raise errdefs.NotFound(f"task {tid}: not found")
        return task

    @property
    def empty(self) -> bool:
        """No task held (and none being created): the shim may exit."""
        return not self.tasks and not self._creating

    async def _create(self, req: pb.CreateTaskRequest, cfg: Config, spec: Spec) -> Task:
        """A sandbox makes this shim's pod; a CRI container joins it; else standalone."""
        ann = spec_annotations(spec)
        kind = ann.get(CONTAINER_TYPE_ANNOTATION)
        stdio = (req.terminal, req.stdin, req.stdout, req.stderr)
        if kind == "sandbox":
            if self.pod is not None:
                raise errdefs.FailedPrecondition(
                    f"sandbox {req.id}: this shim already holds pod {self.pod.id}"
                )
            pod = await self._make_pod(
                self.ctx, req.id, req.bundle, spec, cfg.default_host, runtime=cfg.runtime,
                host_options=cfg.host_options.get(cfg.default_host),
            )  # fmt: skip
            assert pod.sandbox is not None
            self.pod = pod
            return pod.sandbox
        if kind == "container":
            sid = ann.get(SANDBOX_ID_ANNOTATION, "")
            if self.pod is None or self.pod.id != sid:
                raise errdefs.FailedPrecondition(
                    f"task {req.id}: pod sandbox {sid!r} is not held by this shim"
                )
            return await self.pod.create_workload(
                req.id, req.bundle, spec, cfg.runtime, req.rootfs, stdio, self._known
            )
        return await self._make_task(self.ctx, req, cfg, spec)

    def _known(self, tid: str) -> bool:
        return tid in self.tasks

    def _fields(self, tid: str, eid: str = "") -> dict[str, str]:
        """Log fields of a task: ``pod-id`` (once this shim holds a pod), ``tid``, ``eid``."""
        return logs.task_fields(self.pod.id if self.pod is not None else "", tid, eid)

    # -- RPCs --------------------------------------------------------------------------
    async def Create(
        self, req: pb.CreateTaskRequest, _: CallContext, *, spec: Spec | None = None
    ) -> pb.CreateTaskResponse:
        """``spec``: the bundle's spec when the caller (the node router) already read it."""
        check_id(req.id)
        if req.id in self.tasks or req.id in self._creating:
            raise errdefs.AlreadyExists(f"task {req.id}: already exists")
        if req.checkpoint:
            raise errdefs.NotImplemented("restoring from a checkpoint is not supported (no CRIU)")
        if not os.path.isabs(req.bundle) or not os.path.isdir(req.bundle):
            raise errdefs.InvalidArgument(
                f"task {req.id}: bundle {req.bundle!r} is not a directory"
            )
        self._creating.add(req.id)
        try:
            cfg = from_options(req.options if req.HasField("options") else None, self.config)
            if self.config is None:
                self.config = cfg
                logs.apply_config(cfg.log_level, cfg.log_format)
            if spec is None:
                spec = load_spec(req.bundle)
            task = await self._create(req, cfg, spec)
            self.tasks[req.id] = task
            self.activity.set()
        except Exception as exc:
            log.info("create task %s failed: %s", req.id, exc, extra=self._fields(req.id))
            raise
        finally:
            self._creating.discard(req.id)
        log.info("created task %s pid %d", req.id, task.pid, extra=self._fields(req.id))
        for observe in self.observers:
            observe(self, req.id, spec)
        return pb.CreateTaskResponse(pid=task.pid)

    async def Start(self, req: pb.StartRequest, _: CallContext) -> pb.StartResponse:
        pid = await self._task(req.id).start(req.exec_id)
        # an exec's lines are debug: kubelet's exec probes would fill containerd's log
        (log.debug if req.exec_id else log.info)(
            "started pid %d", pid, extra=self._fields(req.id, req.exec_id)
        )
        return pb.StartResponse(pid=pid)

    def State(self, req: pb.StateRequest, _: CallContext) -> pb.StateResponse:
        """Plain, not ``async``: it only reads, so the ttrpc server answers it inline."""
        st = self._task(req.id).state(req.exec_id)
        resp = pb.StateResponse(
            id=st.exec_id or st.id,
            bundle=st.bundle,
            pid=st.pid,
            status=st.status.wire,  # type: ignore[arg-type]
            stdin=st.stdin,
            stdout=st.stdout,
            stderr=st.stderr,
            terminal=st.terminal,
            exec_id=st.exec_id,
        )
        if st.exit is not None:
            resp.exit_status = st.exit.status
            resp.exited_at.CopyFrom(timestamp(st.exit.at))
        return resp

    async def Delete(self, req: pb.DeleteRequest, _: CallContext) -> pb.DeleteResponse:
        task = self._task(req.id)
        bundle = task.state("").bundle if not req.exec_id else ""
        pid, ex = await task.delete(req.exec_id)
        if bundle:
            _mark_deleted(bundle, pid, ex.status)
        if not req.exec_id:
            self.tasks.pop(req.id, None)
            self.activity.set()
            if self.pod is not None:
                self.pod.forget(req.id)
                if req.id == self.pod.id:
                    await self.pod.release()
            log.info("deleted task %s", req.id, extra=self._fields(req.id))
        else:
            log.debug("deleted exec %s", req.exec_id, extra=self._fields(req.id, req.exec_id))
        return pb.DeleteResponse(pid=pid, exit_status=ex.status, exited_at=timestamp(ex.at))

    async def Pids(self, req: pb.PidsRequest, _: CallContext) -> pb.PidsResponse:
        resp = pb.PidsResponse()
        for pid, exec_id in await self._task(req.id).pids():
            info = resp.processes.add(pid=pid)
            if exec_id:
                details = oci_pb2.ProcessDetails(exec_id=exec_id)
                info.info.CopyFrom(
                    any_pb2.Any(
                        type_url="containerd.runc.v1.ProcessDetails",
                        value=details.SerializeToString(),
                    )
                )
        return resp

    async def Pause(self, req: pb.PauseRequest, _: CallContext) -> empty_pb2.Empty:
        await self._task(req.id).pause()
        return empty_pb2.Empty()

    async def Resume(self, req: pb.ResumeRequest, _: CallContext) -> empty_pb2.Empty:
        await self._task(req.id).resume()
        return empty_pb2.Empty()

    async def Checkpoint(self, req: pb.CheckpointTaskRequest, _: CallContext) -> empty_pb2.Empty:
        self._task(req.id)
        raise errdefs.NotImplemented(
            "checkpoint is not supported by podshim: CRIU does not work on this kernel"
        )

    async def Kill(self, req: pb.KillRequest, _: CallContext) -> empty_pb2.Empty:
        fields = self._fields(req.id, req.exec_id)
        log.info("kill signal %d all=%s", req.signal, req.all, extra=fields)
        task = self._task(req.id)
        check_signal(req.signal, f"kill {req.id}")  # nothing changes for a bad one
        await task.kill(req.exec_id, req.signal, req.all)
        return empty_pb2.Empty()

    async def Exec(self, req: pb.ExecProcessRequest, _: CallContext) -> empty_pb2.Empty:
        await self._task(req.id).exec(
            ExecRequest(req.exec_id, req.terminal, req.stdin, req.stdout, req.stderr, req.spec)
        )
        log.debug("exec added", extra=self._fields(req.id, req.exec_id))
        return empty_pb2.Empty()

    async def ResizePty(self, req: pb.ResizePtyRequest, _: CallContext) -> empty_pb2.Empty:
        self._task(req.id).resize(req.exec_id, req.width, req.height)
        return empty_pb2.Empty()

    async def CloseIO(self, req: pb.CloseIORequest, _: CallContext) -> empty_pb2.Empty:
        if req.stdin:
            self._task(req.id).close_io(req.exec_id)
        return empty_pb2.Empty()

    async def Update(self, req: pb.UpdateTaskRequest, _: CallContext) -> empty_pb2.Empty:
        await self._task(req.id).update(req.resources)
        return empty_pb2.Empty()

    async def Wait(self, req: pb.WaitRequest, _: CallContext) -> pb.WaitResponse:
        ex: ExitInfo = await self._task(req.id).wait(req.exec_id)
        return pb.WaitResponse(exit_status=ex.status, exited_at=timestamp(ex.at))

    async def Stats(self, req: pb.StatsRequest, _: CallContext) -> pb.StatsResponse:
        return pb.StatsResponse(stats=await self._task(req.id).stats())

    async def Connect(self, req: pb.ConnectRequest, _: CallContext) -> pb.ConnectResponse:
        task = self._task(req.id)
        return pb.ConnectResponse(
            shim_pid=os.getpid(), task_pid=task.pid, version=f"podshim {__version__}"
        )

    async def Shutdown(self, req: pb.ShutdownRequest, _: CallContext) -> empty_pb2.Empty:
        """Ends the shim when it holds no task; otherwise a successful no-op."""
        if self.empty:
            asyncio.get_running_loop().call_soon(self._request_shutdown)
        return empty_pb2.Empty()
