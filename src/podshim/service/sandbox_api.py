"""``containerd.runtime.sandbox.v1.Sandbox``: the pod as containerd 2.x's Sandbox API sees it.

A CRI runtime handler with ``sandboxer = "shim"`` makes containerd 2.x exec the shim's
``start`` for the sandbox (a bundle without ``config.json``) and call this service on the
address it printed (containerd 2.1's ``plugins/sandbox/controller.go``), in this order:

* ``CreateSandbox`` (CRI's ``PodSandboxConfig`` in ``options``, CRI's network namespace
  in ``netns_path``): the pod's description is built from the config
  (:mod:`podshim.pod.podconfig`), written to the bundle as its ``config.json`` (so the
  ``delete`` action's crash cleanup finds the pod's host as for a seed sandbox) and made
  into the same :class:`~podshim.pod.pod.Pod`, host and sandbox task as a sandbox Create of
  the Task API: this service and the Task service are two front doors to one pod model.
  The sandbox task is held by the Task service too, so the workload containers, which
  arrive as ordinary Task API Creates on this shim (containerd execs ``start`` for each, as
  the shim speaks Task API v2, and podshim's grouping sends them here), join the pod.
* ``StartSandbox``: the sandbox task starts; its pid (the pod's anchor) is the pid CRI
  writes into containers as ``/proc/<pid>/ns/*`` (podshim's rewrite points those at the
  pod's namespaces); ``WaitSandbox`` then waits in the background for the exit status
  (137 after a stop, 1 when the pod's host died).
* ``SandboxStatus`` (CRI's pod state and pid; CreateContainer takes the pod id from it),
  ``SandboxMetrics`` (the sandbox task's Stats), ``Platform``, ``PingSandbox``.
* ``StopSandbox`` (StopPodSandbox): every workload and the sandbox are killed, the host is
  torn down. ``ShutdownSandbox`` (RemovePodSandbox, or undoing a failed create): stop if
  need be, delete what is left and the sandbox task, release the pod; the shim then exits
  when it holds nothing.

An unknown sandbox id is NotFound (Shutdown of a sandbox this shim already shut down, or
failed to create, succeeds again); a second CreateSandbox of an id is AlreadyExists; a
pod podshim cannot honour is InvalidArgument with nothing left behind. Only a pod-scope
shim serves this service (:func:`bindings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from podshim import RUNTIME_TYPE
from podshim import errors as errdefs
from podshim.api.runtime.sandbox.v1 import sandbox_pb2 as pb
from podshim.api.task.v2 import shim_pb2
from podshim.api.types import metrics_pb2, platform_pb2
from podshim.oci import bundle as files
from podshim.oci.spec import write_spec
from podshim.pod.pod import Pod
from podshim.pod.podconfig import parse_options, pod_spec
from podshim.pod.sandbox import SandboxTask
from podshim.service.config import Config
from podshim.service.tasks import PodFactory, TaskService, check_id
from podshim.task.contract import timestamp
from podshim.task.states import Status
from podshim.ttrpc.services import CallContext, ServiceBinding, bind

log = logging.getLogger("podshim.sandbox_api")

#: the state names CRI reads from SandboxStatus (runtime.v1.PodSandboxState)
READY = "SANDBOX_READY"
NOT_READY = "SANDBOX_NOTREADY"
#: how long Shutdown waits for a killed workload to exit before deleting it
WORKLOAD_EXIT_TIMEOUT = 10.0
#: ``platform.machine()`` -> GOARCH (and variant), as containerd names platforms
_GOARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


def host_platform() -> platform_pb2.Platform:
    """This machine as an OCI platform (containerd generates container specs for it)."""
    machine = platform.machine()
    arch, variant = _GOARCH.get(machine, (machine, ""))
    return platform_pb2.Platform(os="linux", architecture=arch, variant=variant)


@dataclass
class _Sandbox:
    pod: Pod
    sandbox: SandboxTask
    created_at: float


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class SandboxService:
    """The Sandbox API of one pod-scope shim, over the shim's :class:`TaskService`."""

    def __init__(
        self,
        tasks: TaskService,
        request_shutdown: Callable[[], None],
        *,
        make_pod: PodFactory = Pod.create,
    ) -> None:
        self.tasks = tasks
        self._request_shutdown = request_shutdown
        self._make_pod = make_pod
        self._sandboxes: dict[str, _Sandbox] = {}
        self._creating: set[str] = set()
        #: ids shut down here, or whose create failed: ShutdownSandbox succeeds again
        self._gone: set[str] = set()

    def _get(self, sid: str) -> _Sandbox:
        check_id(sid)
        sb = self._sandboxes.get(sid)
        if sb is None:
            raise errdefs.NotFound(f"sandbox {sid}: not found")
        return sb

    def _exit_if_empty(self) -> None:
        """As the Task API's Shutdown: the shim exits once it holds nothing."""
        if self.tasks.empty and not self._creating and not self._sandboxes:
            asyncio.get_running_loop().call_soon(self._request_shutdown)

    # -- RPCs --------------------------------------------------------------------------
    async def CreateSandbox(
        self, req: pb.CreateSandboxRequest, _: CallContext
    ) -> pb.CreateSandboxResponse:
        sid = req.sandbox_id
        check_id(sid)
        if sid in self._sandboxes or sid in self._creating or sid in self.tasks.tasks:
            raise errdefs.AlreadyExists(f"sandbox {sid}: already exists")
        held = self.tasks.pod
        if held is not None:
            raise errdefs.FailedPrecondition(
                f"sandbox {sid}: this shim already holds pod {held.id}"
            )
        self._creating.add(sid)
        bundle = req.bundle_path
        wrote = False
        try:
            if not os.path.isabs(bundle) or not os.path.isdir(bundle):
                raise errdefs.InvalidArgument(
                    f"sandbox {sid}: bundle {bundle!r} is not a directory"
                )
            options = req.options if req.HasField("options") else None
            spec = pod_spec(sid, parse_options(options, sid), req.netns_path)
            cfg = self.tasks.config or Config()  # the workloads' Creates bring the handler's
            wrote = True
            write_spec(bundle, spec)  # for `delete`: this bundle is the pod's, as a seed's
            pod = await self._make_pod(
                self.tasks.ctx, sid, bundle, spec, cfg.default_host, runtime=cfg.runtime,
                host_options=cfg.host_options.get(cfg.default_host),
            )  # fmt: skip
        except BaseException as exc:
            if wrote:  # nothing left behind
                for name in (files.CONFIG, files.HOST_RECORD):
                    _remove_quietly(os.path.join(bundle, name))
            self._gone.add(sid)  # containerd's undoing Shutdown succeeds
            log.info("create sandbox %s failed: %s", sid, exc)
            raise
        finally:
            self._creating.discard(sid)
        assert pod.sandbox is not None
        self._sandboxes[sid] = _Sandbox(pod, pod.sandbox, time.time())
        self._gone.discard(sid)
        self.tasks.pod = pod
        self.tasks.tasks[sid] = pod.sandbox
        self.tasks.activity.set()
        log.info("created sandbox %s (anchor pid %d)", sid, pod.sandbox.pid)
        return pb.CreateSandboxResponse()

    async def StartSandbox(
        self, req: pb.StartSandboxRequest, _: CallContext
    ) -> pb.StartSandboxResponse:
        sb = self._get(req.sandbox_id)
        if not sb.sandbox.running:  # a second Start of a running sandbox changes nothing
            await sb.sandbox.start("")
        log.info("started sandbox %s", req.sandbox_id)
        return pb.StartSandboxResponse(pid=sb.sandbox.pid, created_at=timestamp(sb.created_at))

    async def Platform(self, req: pb.PlatformRequest, _: CallContext) -> pb.PlatformResponse:
        self._get(req.sandbox_id)
        return pb.PlatformResponse(platform=host_platform())

    async def _stop(self, sb: _Sandbox) -> None:
        """Kill every workload and the sandbox; return once the host is torn down."""
        with contextlib.suppress(errdefs.NotFound):  # exited already (stopped, host died)
            await sb.sandbox.kill("", signal.SIGKILL, True)
        await sb.sandbox.wait("")

    async def StopSandbox(
        self, req: pb.StopSandboxRequest, _: CallContext
    ) -> pb.StopSandboxResponse:
        sb = self._get(req.sandbox_id)
        await self._stop(sb)
        log.info("stopped sandbox %s", req.sandbox_id)
        return pb.StopSandboxResponse()

    async def WaitSandbox(
        self, req: pb.WaitSandboxRequest, _: CallContext
    ) -> pb.WaitSandboxResponse:
        sb = self._get(req.sandbox_id)
        ex = await sb.sandbox.wait("")
        return pb.WaitSandboxResponse(exit_status=ex.status, exited_at=timestamp(ex.at))

    def _info(self, sb: _Sandbox) -> dict[str, Any]:
        state = sb.sandbox.state("")
        info: dict[str, Any] = {
            "pid": sb.sandbox.pid,
            "processStatus": state.status.name.lower(),
            "runtimeType": RUNTIME_TYPE,
            "sandboxer": "shim",
            "host": {"kind": sb.pod.host.kind, "initPid": sb.pod.host.init_pid},
            "runtimeSpec": sb.pod.spec,
        }
        if state.exit is not None:
            info["exitStatus"] = state.exit.status
        return info

    async def SandboxStatus(
        self, req: pb.SandboxStatusRequest, _: CallContext
    ) -> pb.SandboxStatusResponse:
        sb = self._get(req.sandbox_id)
        exited = sb.sandbox.state("").status is Status.STOPPED
        resp = pb.SandboxStatusResponse(
            sandbox_id=sb.sandbox.id,
            pid=0 if exited else sb.sandbox.pid,
            state=READY if sb.sandbox.running else NOT_READY,
            created_at=timestamp(sb.created_at),
        )
        if sb.sandbox.exit is not None:
            resp.exited_at.CopyFrom(timestamp(sb.sandbox.exit.at))
        if req.verbose:
            resp.info["info"] = json.dumps(self._info(sb))
        return resp

    async def PingSandbox(self, req: pb.PingRequest, _: CallContext) -> pb.PingResponse:
        self._get(req.sandbox_id)
        return pb.PingResponse()

    async def ShutdownSandbox(
        self, req: pb.ShutdownSandboxRequest, ctx: CallContext
    ) -> pb.ShutdownSandboxResponse:
        sid = req.sandbox_id
        check_id(sid)
        if sid in self._gone:
            self._exit_if_empty()
            return pb.ShutdownSandboxResponse()
        sb = self._sandboxes.get(sid)
        if sb is None:
            self._exit_if_empty()  # a shim that holds nothing goes even so
            raise errdefs.NotFound(f"sandbox {sid}: not found")
        await self._stop(sb)
        for tid, task in list(self.tasks.tasks.items()):  # workloads CRI did not remove
            if tid == sid:
                continue
            with contextlib.suppress(errdefs.ShimError, TimeoutError):
                await asyncio.wait_for(task.wait(""), WORKLOAD_EXIT_TIMEOUT)
                await self.tasks.Delete(shim_pb2.DeleteRequest(id=tid), ctx)
        if sid in self.tasks.tasks:  # teardown errors propagate: containerd retries
            await self.tasks.Delete(shim_pb2.DeleteRequest(id=sid), ctx)
        del self._sandboxes[sid]
        self._gone.add(sid)
        log.info("shut down sandbox %s", sid)
        self._exit_if_empty()
        return pb.ShutdownSandboxResponse()

    async def SandboxMetrics(
        self, req: pb.SandboxMetricsRequest, _: CallContext
    ) -> pb.SandboxMetricsResponse:
        sb = self._get(req.sandbox_id)
        data = await sb.sandbox.stats()
        metric = metrics_pb2.Metric(timestamp=timestamp(time.time()), id=sb.sandbox.id, data=data)
        return pb.SandboxMetricsResponse(metrics=metric)


def bindings(
    service: object, request_shutdown: Callable[[], None], *, make_pod: PodFactory = Pod.create
) -> list[ServiceBinding]:
    """The Sandbox service for a pod-scope shim's Task service (none for a node daemon)."""
    if not isinstance(service, TaskService):
        return []
    impl = SandboxService(service, request_shutdown, make_pod=make_pod)
    return [bind(pb.DESCRIPTOR.services_by_name["Sandbox"], impl)]
