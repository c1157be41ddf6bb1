"""``containerd.task.v3.Task``: the Task API at the address a proxy-plugin pod's Start
returns.

containerd 2.x speaks Task v3 to an address a sandbox controller returned with version 3
(``core/runtime/v2``'s ``ShimManager.Start``: it writes ``bootstrap.json`` into the task's
bundle and loads it, exec'ing no shim binary, and sends no per-task Shutdown). Task v3's
messages are Task v2's, field for field (containerd 2.1's ``api/runtime/task/v3`` differs
from v2 in its package name only), so the node daemon's router answers it unchanged: its
methods are bound again under the v3 service name.

The daemon must itself report what it loses when it dies (containerd runs no ``delete``
for these tasks): :class:`RecordingTasks` keeps a record of each task from its Create to
its Delete (:class:`~podshim.service.proxystate.ProxyState`).
"""

from __future__ import annotations

import logging
from typing import Any

from podshim import errors as errdefs
from podshim.api.task.v2 import shim_pb2 as pb
from podshim.service.proxystate import ProxyState
from podshim.service.router import NodeService
from podshim.ttrpc.services import CallContext, ServiceBinding, bind

log = logging.getLogger("podshim.taskv3")

#: the service name containerd calls at a version-3 task address
TASK_V3 = "containerd.task.v3.Task"


class RecordingTasks:
    """The router, with each task recorded on disk while it exists (every other method is
    the router's own, plain ones staying plain)."""

    def __init__(self, node: NodeService, state: ProxyState) -> None:
        self._node = node
        self._state = state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    async def Create(self, req: pb.CreateTaskRequest, cctx: CallContext) -> pb.CreateTaskResponse:
        resp = await self._node.Create(req, cctx)
        try:
            self._state.record_task(self._node.namespace(cctx), req.id, req.bundle, resp.pid)
        except OSError as exc:  # the task runs: only a crash report would lack it
            log.warning("task %s: cannot record it for crash recovery: %s", req.id, exc)
        return resp

    async def Delete(self, req: pb.DeleteRequest, cctx: CallContext) -> pb.DeleteResponse:
        try:
            resp = await self._node.Delete(req, cctx)
        except errdefs.NotFound:
            self._forget(req, cctx)
            raise
        self._forget(req, cctx)
        return resp

    def _forget(self, req: pb.DeleteRequest, cctx: CallContext) -> None:
        if not req.exec_id:
            self._state.forget_task(self._node.namespace(cctx), req.id)


def bindings(node: NodeService, state: ProxyState) -> list[ServiceBinding]:
    """Task v3 over ``node`` (with task records in ``state``)."""
    v2 = bind(pb.DESCRIPTOR.services_by_name["Task"], RecordingTasks(node, state))
    return [ServiceBinding(TASK_V3, v2.methods)]
