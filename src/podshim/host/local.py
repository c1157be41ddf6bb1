"""Workloads as local OCI containers: the workload factory of the ``none`` and
``namespaces`` hosts (a VM host makes guest containers instead).

A workload spec names the pod's namespaces as ``/proc/<sandbox pid>/ns/<t>`` (CRI writes
them so); :mod:`podshim.host.rewrite` replaces those with the host's own namespace files
(failing closed), the rewritten spec is written back to the bundle, and a
:class:`~podshim.task.container.Container` is created with the OCI driver the shim's
context makes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from podshim.host import rewrite
from podshim.host.contract import Workload, WorkloadRequest
from podshim.oci.spec import Spec, write_spec
from podshim.task import container
from podshim.task.container import Container
from podshim.task.contract import ShimContext

#: makes and creates the workload from its request and rewritten spec
MakeWorkload = Callable[[ShimContext, WorkloadRequest, Spec], Awaitable[Workload]]


async def create_container(ctx: ShimContext, req: WorkloadRequest, spec: Spec) -> Container:
    """The default :data:`MakeWorkload`: a local OCI container with the context's driver."""
    stdio = (req.terminal, req.stdin, req.stdout, req.stderr)
    return await container.create_container(
        ctx, req.id, req.bundle, spec, req.rootfs, req.runtime, stdio
    )


class NamespaceSource(Protocol):
    """What the rewrite needs of a host: its kind and its namespace files."""

    kind: str

    async def namespace_path(self, ns_type: str) -> str | None: ...


class LocalWorkloads:
    """Makes the workload containers of one pod whose sandbox spec is ``sandbox_spec``."""

    def __init__(
        self, host: NamespaceSource, sandbox_spec: Spec, make: MakeWorkload = create_container
    ) -> None:
        self.host = host
        self.sandbox_types = rewrite.namespace_types(sandbox_spec)
        self._make = make

    async def create(self, ctx: ShimContext, req: WorkloadRequest) -> Workload:
        spec = req.spec
        refs = rewrite.sandbox_refs(spec, req.sandbox_pid)
        paths = {t: await self.host.namespace_path(t) for t in refs if t in self.sandbox_types}
        new_spec = rewrite.rewrite(
            spec,
            sandbox_pid=req.sandbox_pid,
            sandbox_types=self.sandbox_types,
            pod_paths=paths,
            pod_pids=req.pod_pids,
            host_kind=self.host.kind,
        )
        if new_spec != spec:
            write_spec(req.bundle, new_spec)
        return await self._make(ctx, req, new_spec)
