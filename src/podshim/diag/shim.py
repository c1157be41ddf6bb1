"""What the shim daemon calls: the Diag service's binding and the shim's registry entry.

The entry is written once the shim serves (:meth:`ShimDiag.register`) and names the pod
as soon as a Create made one: the Task service's ``Create`` binding is wrapped, so
``service.py`` needs no hook. :meth:`ShimDiag.unregister` runs when the daemon stops
serving (SIGTERM and SIGINT included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from podshim.api.diag.v1 import diag_pb2
from podshim.diag.registry import Registration
from podshim.diag.service import DiagService
from podshim.ttrpc.services import CallContext, ServiceBinding, bind

if TYPE_CHECKING:
    from podshim.service.router import NodeService
    from podshim.service.tasks import TaskService

    Shim = TaskService | NodeService  # one pod's service, or a node daemon's


class ShimDiag:
    """The Diag service of one shim daemon and its registry entry."""

    def __init__(
        self,
        service: Shim,
        tasks: ServiceBinding,
        *,
        address: str,
        namespace: str,
        first_id: str,
        socket_path: str,
    ) -> None:
        self.service = DiagService(service)
        self.binding = bind(diag_pb2.DESCRIPTOR.services_by_name["Diag"], self.service)
        self.registration = Registration.for_this_process(
            address, namespace, first_id, socket_path
        )
        _follow_pod(tasks, service, self.registration)

    def register(self) -> None:
        self.registration.write()

    def unregister(self) -> None:
        self.registration.remove()


def _follow_pod(tasks: ServiceBinding, service: Shim, reg: Registration) -> None:
    """After every Create, record the pod id in the entry (a no-op unless it changed)."""
    create = tasks.methods["Create"]

    async def create_then_record(payload: bytes, ctx: CallContext) -> bytes:
        try:
            return await create(payload, ctx)
        finally:
            if service.pod is not None:
                reg.set_pod(service.pod.id)

    tasks.methods["Create"] = create_then_record
