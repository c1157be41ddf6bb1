"""``containerd.services.sandbox.v1.Controller``: the pods of a proxy-plugin sandboxer.

A CRI runtime handler with ``sandboxer = "<name>"`` and ``[proxy_plugins.<name>] type =
"sandbox"`` makes containerd 2.x call this controller (over gRPC, through the daemon's
front door: ``podshim.shim.proxyd``) for each pod: Create (CRI's PodSandboxConfig in
``options``, CRI's network namespace in ``netns_path``), Start, Wait in the background,
Status, Metrics, Platform, Stop and Shutdown. Each pod is the same model as with the
other two front doors: one :class:`~podshim.service.sandbox_api.SandboxService` over one
:class:`~podshim.service.tasks.TaskService` per pod, which this controller adds to the
node daemon's router (:class:`~podshim.service.router.NodeService`) under the pod's group
(its id), so the containers' Task API Creates, which containerd sends to the Task v3
address Start returns, join the pod as they would in a pod-scope shim. The pod's bundle
is the daemon's own (:class:`~podshim.service.proxystate.ProxyState`): containerd gives
a controller none.

Pods the previous daemon held when it died are *lost*: the new daemon cleaned them up
before serving (``podshim.shim.proxyd``); here they are NOTREADY with the exit status of
their loss, Wait answers at once, Stop succeeds and Shutdown removes what is left.

An unknown id is NotFound (Stop and Shutdown of a pod shut down here, or whose create
failed, succeed again); a second Create of an id is AlreadyExists; a pod podshim cannot
honour is InvalidArgument with nothing left behind.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from podshim import errors as errdefs
from podshim.api.runtime.sandbox.v1 import sandbox_pb2 as shimpb
from podshim.api.services.sandbox.v1 import sandbox_pb2 as pb
from podshim.oci.ids import valid_id
from podshim.pod.pod import Pod
from podshim.service.config import Config
from podshim.service.proxystate import ProxyState
from podshim.service.router import NAMESPACE_KEY, NodeService
from podshim.service.sandbox_api import NOT_READY, SandboxService, host_platform
from podshim.service.tasks import PodFactory, TaskService, check_id
from podshim.task.contract import timestamp
from podshim.ttrpc.services import CallContext

log = logging.getLogger("podshim.controller")

#: the Task API version served at the address Start returns
TASK_API_VERSION = 3

Key = tuple[str, str]  # (containerd namespace, sandbox id)


@dataclass
class _Lost:
    created_at: float
    exited_at: float
    status: int


class Controller:
    """The Controller service of one proxy daemon (module doc). Methods take the decoded
    request and the call's containerd namespace."""

    def __init__(
        self,
        node: NodeService,
        make_service: Callable[[str, str], TaskService],
        state: ProxyState,
        task_address: str,
        *,
        name: str = "podshim",
        config: Config | None = None,
        make_pod: PodFactory = Pod.create,
    ) -> None:
        self.node = node
        self._make_service = make_service
        self.state = state
        #: ``ttrpc+unix://<path>``: where containerd speaks Task v3 for the pods
        self.task_address = task_address
        self.name = name
        self.config = config or Config()
        self._make_pod = make_pod
        self.pods: dict[Key, SandboxService] = {}
        self.lost: dict[Key, _Lost] = {}
        self._creating: set[Key] = set()
        self._gone: set[Key] = set()

    def load_lost(self) -> None:
        """Every pod bundle on disk that carries a lost record (the daemon's start)."""
        for ns, sid in self.state.sandboxes():
            rec = self.state.lost(ns, sid)
            if rec:
                at, status = rec.get("exited_at"), rec.get("exit_status")
                self.lost[(ns, sid)] = _Lost(
                    self.state.created_at(ns, sid),
                    float(at) if isinstance(at, (int, float)) else time.time(),
                    int(status) if isinstance(status, int) else 255,
                )

    @property
    def empty(self) -> bool:
        return not self.pods and not self._creating

    @staticmethod
    def _cctx(ns: str, method: str) -> CallContext:
        """The context the pod's Sandbox service sees (its namespace as ttrpc metadata)."""
        md = MappingProxyType({NAMESPACE_KEY: (ns,)})
        return CallContext("containerd.services.sandbox.v1.Controller", method, md)

    def _pod(self, ns: str, sid: str) -> SandboxService:
        check_id(sid)
        pod = self.pods.get((ns, sid))
        if pod is None:
            raise errdefs.NotFound(f"sandbox {sid}: not found in namespace {ns}")
        return pod

    def _known(self, ns: str, sid: str) -> SandboxService | _Lost:
        check_id(sid)
        lost = self.lost.get((ns, sid))
        return lost if lost is not None else self._pod(ns, sid)

    # -- RPCs ---------------------------------------------------------------------------
    async def Create(self, req: pb.ControllerCreateRequest, ns: str) -> pb.ControllerCreateResponse:
        sid = req.sandbox_id
        check_id(sid)
        if not valid_id(ns):
            raise errdefs.InvalidArgument(f"sandbox {sid}: bad namespace {ns!r}")
        key = (ns, sid)
        if (
            key in self.pods
            or key in self._creating
            or key in self.lost
            or key in self.node.services
        ):
            raise errdefs.AlreadyExists(f"sandbox {sid}: already exists")
        self._creating.add(key)
        try:
            bundle = self.state.make_sandbox_dir(ns, sid)
            svc = self._make_service(ns, sid)
            svc.config = self.config  # the workloads' Creates start from the daemon's config
            svc.activity = self.node.activity
            pod = SandboxService(svc, lambda: None, make_pod=self._make_pod)
            shim_req = shimpb.CreateSandboxRequest(
                sandbox_id=sid, bundle_path=bundle, netns_path=req.netns_path
            )
            if req.HasField("options"):
                shim_req.options.CopyFrom(req.options)
            self.node.services[key] = svc
            try:
                await pod.CreateSandbox(shim_req, self._cctx(ns, "Create"))
            except BaseException:
                if self.node.services.get(key) is svc:
                    del self.node.services[key]
                self.state.remove_sandbox_dir(ns, sid)
                self._gone.add(key)
                raise
        finally:
            self._creating.discard(key)
        self.pods[key] = pod
        self._gone.discard(key)
        self.node.activity.set()
        return pb.ControllerCreateResponse(sandbox_id=sid)

    async def Start(self, req: pb.ControllerStartRequest, ns: str) -> pb.ControllerStartResponse:
        pod = self._pod(ns, req.sandbox_id)
        resp = await pod.StartSandbox(
            shimpb.StartSandboxRequest(sandbox_id=req.sandbox_id), self._cctx(ns, "Start")
        )
        return pb.ControllerStartResponse(
            sandbox_id=req.sandbox_id,
            pid=resp.pid,
            created_at=resp.created_at,
            address=self.task_address,
            version=TASK_API_VERSION,
        )

    async def Platform(
        self, req: pb.ControllerPlatformRequest, ns: str
    ) -> pb.ControllerPlatformResponse:
        self._known(ns, req.sandbox_id)
        return pb.ControllerPlatformResponse(platform=host_platform())

    async def Stop(self, req: pb.ControllerStopRequest, ns: str) -> pb.ControllerStopResponse:
        key = (ns, req.sandbox_id)
        if key in self._gone:
            return pb.ControllerStopResponse()
        pod = self._known(ns, req.sandbox_id)
        if isinstance(pod, SandboxService):
            await pod.StopSandbox(
                shimpb.StopSandboxRequest(sandbox_id=req.sandbox_id), self._cctx(ns, "Stop")
            )
        return pb.ControllerStopResponse()

    async def Wait(self, req: pb.ControllerWaitRequest, ns: str) -> pb.ControllerWaitResponse:
        pod = self._known(ns, req.sandbox_id)
        if isinstance(pod, _Lost):
            return pb.ControllerWaitResponse(
                exit_status=pod.status, exited_at=timestamp(pod.exited_at)
            )
        resp = await pod.WaitSandbox(
            shimpb.WaitSandboxRequest(sandbox_id=req.sandbox_id), self._cctx(ns, "Wait")
        )
        return pb.ControllerWaitResponse(exit_status=resp.exit_status, exited_at=resp.exited_at)

    async def Status(self, req: pb.ControllerStatusRequest, ns: str) -> pb.ControllerStatusResponse:
        sid = req.sandbox_id
        pod = self._known(ns, sid)
        out = pb.ControllerStatusResponse(
            sandbox_id=sid, address=self.task_address, version=TASK_API_VERSION
        )
        if isinstance(pod, _Lost):
            out.state = NOT_READY
            out.created_at.CopyFrom(timestamp(pod.created_at))
            out.exited_at.CopyFrom(timestamp(pod.exited_at))
            if req.verbose:
                lost = self.state.lost(ns, sid)
                info = {"sandboxer": self.name, "lost": True, "exitStatus": pod.status,
                        "left": lost.get("left", [])}  # fmt: skip
                out.info["info"] = json.dumps(info)
            return out
        st = await pod.SandboxStatus(
            shimpb.SandboxStatusRequest(sandbox_id=sid, verbose=req.verbose),
            self._cctx(ns, "Status"),
        )
        out.pid, out.state = st.pid, st.state
        out.created_at.CopyFrom(st.created_at)
        if st.HasField("exited_at"):
            out.exited_at.CopyFrom(st.exited_at)
        if "info" in st.info:
            info = json.loads(st.info["info"])
            info["sandboxer"] = self.name
            info["taskAddress"] = self.task_address
            out.info["info"] = json.dumps(info)
        return out

    async def Shutdown(
        self, req: pb.ControllerShutdownRequest, ns: str
    ) -> pb.ControllerShutdownResponse:
        sid = req.sandbox_id
        check_id(sid)
        key = (ns, sid)
        if key in self._gone:
            return pb.ControllerShutdownResponse()
        if key in self.lost:
            left = self.state.lost(ns, sid).get("left")
            if left:  # the cleanup at the daemon's start could not finish
                raise errdefs.FailedPrecondition(f"sandbox {sid}: cleanup left {left}")
            self.state.remove_sandbox_dir(ns, sid)
            del self.lost[key]
            self._gone.add(key)
            return pb.ControllerShutdownResponse()
        pod = self._pod(ns, sid)
        workloads = [tid for tid in pod.tasks.tasks if tid != sid]
        try:
            await pod.ShutdownSandbox(
                shimpb.ShutdownSandboxRequest(sandbox_id=sid), self._cctx(ns, "Shutdown")
            )
        finally:  # the workloads containerd did not delete first are gone with the pod
            for tid in workloads:
                if tid not in pod.tasks.tasks:
                    self.state.forget_task(ns, tid)
        svc = self.node.services.get(key)
        if svc is pod.tasks and svc.empty:
            del self.node.services[key]
        del self.pods[key]
        self.state.remove_sandbox_dir(ns, sid)
        self._gone.add(key)
        self.node.activity.set()
        log.info("shut down sandbox %s (namespace %s)", sid, ns)
        return pb.ControllerShutdownResponse()

    async def Metrics(
        self, req: pb.ControllerMetricsRequest, ns: str
    ) -> pb.ControllerMetricsResponse:
        pod = self._pod(ns, req.sandbox_id)
        resp = await pod.SandboxMetrics(
            shimpb.SandboxMetricsRequest(sandbox_id=req.sandbox_id), self._cctx(ns, "Metrics")
        )
        return pb.ControllerMetricsResponse(metrics=resp.metrics)

    async def Update(self, req: pb.ControllerUpdateRequest, ns: str) -> pb.ControllerUpdateResponse:
        """containerd's copy of the sandbox changed: nothing of it is podshim's to apply."""
        self._known(ns, req.sandbox_id)
        return pb.ControllerUpdateResponse()
