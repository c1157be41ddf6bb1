"""Many pods in one process: the Task service of a node-scope daemon.

A node daemon (``shim_scope = "node"``) serves every pod and plain container of one
containerd instance, in all of its namespaces. It is built from the pod-scope service,
unchanged: one :class:`~podshim.service.tasks.TaskService` per *(containerd namespace,
group)*, where the group is what would have been a pod-scope shim (the CRI sandbox id
or podshim's group annotation, else the task id). This router only picks the service of
each call:

* the namespace is the call's ``containerd-namespace-ttrpc`` metadata (containerd sends
  it on every call; a call without it belongs to the daemon's own ``-namespace``);
* Create reads the group from the bundle's annotations, then remembers the task's
  service until the task is deleted; every other call is routed by ``(namespace, id)``.

So each pod keeps its own tasks, config, host and job group (a pod's failure stays in
its service), and one pod's slow call never waits for another's: services share only the
event loop, the reaper and the namespace's event publisher (one ordered queue per
namespace, so events of a task stay in order). A service that holds no task any more is
dropped. Shutdown never ends a node daemon: it exits once it has held no task for a
while (see ``podshim.shim.daemon``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from google.protobuf import empty_pb2

from podshim import errors as errdefs
from podshim.api.task.v2 import shim_pb2 as pb
from podshim.oci.ids import GROUP_ANNOTATION, SANDBOX_ID_ANNOTATION, valid_id
from podshim.oci.spec import Spec, load_spec, spec_annotations
from podshim.pod.pod import Pod
from podshim.service.config import Config
from podshim.service.tasks import TaskService, check_id
from podshim.task.contract import Task
from podshim.ttrpc.services import CallContext

log = logging.getLogger("podshim.router")

#: the ttrpc metadata key that carries the containerd namespace of a call
NAMESPACE_KEY = "containerd-namespace-ttrpc"

#: makes the service of one group: (namespace, group) -> TaskService
ServiceFactory = Callable[[str, str], TaskService]


def group_of(task_id: str, annotations: dict[str, str]) -> str:
    """The group a task joins: podshim's group annotation, else the CRI sandbox id,
    else the task itself (the same rule that keys pod-scope shim sockets)."""
    for key in (GROUP_ANNOTATION, SANDBOX_ID_ANNOTATION):
        value = annotations.get(key, "")
        if value and valid_id(value):
            return value
    return task_id


class NodeService:
    """``containerd.task.v2.Task`` for every namespace and group of one daemon."""

    def __init__(self, default_namespace: str, make_service: ServiceFactory) -> None:
        self.default_namespace = default_namespace
        self._make_service = make_service
        #: (namespace, group) -> that group's service
        self.services: dict[tuple[str, str], TaskService] = {}
        #: (namespace, task id) -> the group its Create chose
        self._groups: dict[tuple[str, str], str] = {}
        self._creating = 0
        self._config: Config | None = None  # kept when the services that had it are gone
        #: set whenever a task is added or removed (shared with every service)
        self.activity = asyncio.Event()

    # -- what the daemon and diag read ----------------------------------------------
    @property
    def empty(self) -> bool:
        return self._creating == 0 and all(s.empty for s in self.services.values())

    @property
    def config(self) -> Config | None:
        """The config of the services (one handler's config file: the socket is keyed by
        it), once a Create brought one."""
        return self._config

    @property
    def tasks(self) -> dict[str, Task]:
        """Every task by id (namespaces merged: for diagnostics only)."""
        return {tid: t for s in self.services.values() for tid, t in s.tasks.items()}

    @property
    def pods(self) -> Iterator[Pod]:
        return (s.pod for s in self.services.values() if s.pod is not None)

    @property
    def pod(self) -> Pod | None:
        """The pod when exactly one is held (what a pod-scope reader expects)."""
        pods = list(self.pods)
        return pods[0] if len(pods) == 1 else None

    # -- routing ----------------------------------------------------------------------
    def namespace(self, cctx: CallContext) -> str:
        return cctx.get(NAMESPACE_KEY) or self.default_namespace

    def _service(self, namespace: str, group: str) -> TaskService:
        key = (namespace, group)
        svc = self.services.get(key)
        if svc is None:
            svc = self.services[key] = self._make_service(namespace, group)
            svc.activity = self.activity
        return svc

    def _routed(self, tid: str, cctx: CallContext) -> TaskService:
        ns = self.namespace(cctx)
        group = self._groups.get((ns, tid))
        svc = self.services.get((ns, group)) if group is not None else None
        if svc is None:
            raise errdefs.NotFound(f"task {tid}: not found in namespace {ns}")
        return svc

    def _drop_if_empty(self, ns: str, group: str) -> None:
        svc = self.services.get((ns, group))
        if svc is not None and svc.empty:
            del self.services[(ns, group)]

    # -- RPCs with their own rules ----------------------------------------------------
    async def Create(self, req: pb.CreateTaskRequest, cctx: CallContext) -> pb.CreateTaskResponse:
        ns = self.namespace(cctx)
        check_id(req.id)
        if (ns, req.id) in self._groups:
            raise errdefs.AlreadyExists(f"task {req.id}: already exists")
        spec: Spec | None
        try:
            spec = load_spec(req.bundle)
        except errdefs.ShimError:
            spec = None  # the group's service reads it again and reports it properly
        group = group_of(req.id, spec_annotations(spec) if spec is not None else {})
        self._groups[(ns, req.id)] = group
        self._creating += 1
        svc = self._service(ns, group)
        try:
            resp = await svc.Create(req, cctx, spec=spec)
            if self._config is None:
                self._config = svc.config
            return resp
        except BaseException:
            self._groups.pop((ns, req.id), None)
            self._drop_if_empty(ns, group)
            raise
        finally:
            self._creating -= 1

    async def Shutdown(self, req: pb.ShutdownRequest, cctx: CallContext) -> empty_pb2.Empty:
        """A successful no-op: a node daemon outlives its tasks (it exits when idle)."""
        return empty_pb2.Empty()

    # -- RPCs routed by (namespace, id) -------------------------------------------------
    async def Start(self, req: pb.StartRequest, cctx: CallContext) -> pb.StartResponse:
        return await self._routed(req.id, cctx).Start(req, cctx)

    def State(self, req: pb.StateRequest, cctx: CallContext) -> pb.StateResponse:
        """Plain, as the service's: answered inline by the ttrpc server."""
        return self._routed(req.id, cctx).State(req, cctx)

    async def Delete(self, req: pb.DeleteRequest, cctx: CallContext) -> pb.DeleteResponse:
        svc = self._routed(req.id, cctx)
        try:
            return await svc.Delete(req, cctx)
        finally:
            if not req.exec_id and req.id not in svc.tasks:  # the task is gone
                ns = self.namespace(cctx)
                group = self._groups.pop((ns, req.id), None)
                if group is not None:
                    self._drop_if_empty(ns, group)

    async def Pids(self, req: pb.PidsRequest, cctx: CallContext) -> pb.PidsResponse:
        return await self._routed(req.id, cctx).Pids(req, cctx)

    async def Pause(self, req: pb.PauseRequest, cctx: CallContext) -> empty_pb2.Empty:
        return await self._routed(req.id, cctx).Pause(req, cctx)

    async def Resume(self, req: pb.ResumeRequest, cctx: CallContext) -> empty_pb2.Empty:
        return await self._routed(req.id, cctx).Resume(req, cctx)

    async def Checkpoint(self, req: pb.CheckpointTaskRequest, cctx: CallContext) -> empty_pb2.Empty:
        return await self._routed(req.id, cctx).Checkpoint(req, cctx)

    async def Kill(self, req: pb.KillRequest, cctx: CallContext) -> empty_pb2.Empty:
        return await self._routed(req.id, cctx).Kill(req, cctx)

    async def Exec(self, req: pb.ExecProcessRequest, cctx: CallContext) -> empty_pb2.Empty:
        return await self._routed(req.id, cctx).Exec(req, cctx)

    async def ResizePty(self, req: pb.ResizePtyRequest, cctx: CallContext) -> empty_pb2.Empty:
        return await self._routed(req.id, cctx).ResizePty(req, cctx)

    async def CloseIO(self, req: pb.CloseIORequest, cctx: CallContext) -> empty_pb2.Empty:
        return await self._routed(req.id, cctx).CloseIO(req, cctx)

    async def Update(self, req: pb.UpdateTaskRequest, cctx: CallContext) -> empty_pb2.Empty:
        return await self._routed(req.id, cctx).Update(req, cctx)

    async def Wait(self, req: pb.WaitRequest, cctx: CallContext) -> pb.WaitResponse:
        return await self._routed(req.id, cctx).Wait(req, cctx)

    async def Stats(self, req: pb.StatsRequest, cctx: CallContext) -> pb.StatsResponse:
        return await self._routed(req.id, cctx).Stats(req, cctx)

    async def Connect(self, req: pb.ConnectRequest, cctx: CallContext) -> pb.ConnectResponse:
        return await self._routed(req.id, cctx).Connect(req, cctx)
