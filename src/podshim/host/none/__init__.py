"""The ``none`` pod host: the seed's ``host == nil``.

Nothing is created and nothing can die; workloads are local OCI containers that get the
namespaces their specs name after the namespace rewrite (the machine's own where the pod
asked for none of its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.host.contract import Workload, WorkloadRequest
from podshim.host.control import ExecControl
from podshim.host.local import LocalWorkloads
from podshim.oci.runtime import RuntimeConfig
from podshim.oci.spec import Spec
from podshim.task.contract import ShimContext


class NoneHost:
    """The seed's ``host == nil``: nothing to create, nothing that can die."""

    kind = "none"

    def __init__(self, spec: Spec | None = None) -> None:
        self._closed = asyncio.Event()
        self._workloads = LocalWorkloads(self, spec or {})

    async def create(self) -> None:
        return None

    async def namespace_path(self, ns_type: str) -> str | None:
        return None

    @property
    def init_pid(self) -> int:
        return 0

    async def wait(self) -> int:
        await self._closed.wait()
        return 0

    async def close(self) -> None:
        self._closed.set()

    async def create_workload(self, ctx: ShimContext, req: WorkloadRequest) -> Workload:
        return await self._workloads.create(ctx, req)

    async def exec_in_host(
        self,
        args: list[str],
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        control: ExecControl | None = None,
    ) -> int:
        raise errdefs.FailedPrecondition("pod has no host (host kind 'none'): nowhere to exec")

    async def dump_stacks(self) -> str:
        return ""

    async def share(
        self, host_path: str, guest_path: str, read_only: bool, pid: int = 0
    ) -> None:
        raise errdefs.FailedPrecondition(
            "pod has no host (host kind 'none'): nothing to share into"
        )

    async def stats(self) -> any_pb2.Any | None:
        return None


class NoneKind:
    """The ``none`` host kind: nothing to make, nothing to clean up."""

    name = "none"

    def make(
        self,
        pod_id: str,
        ctx: ShimContext,
        spec: Spec,
        runtime: RuntimeConfig,
        options: Mapping[str, object] | None = None,
    ) -> NoneHost:
        if options:
            raise errdefs.InvalidArgument(f"host kind {self.name} takes no options: [{self.name}]")
        return NoneHost(spec)

    def cleanup(self, namespace: str, pod_id: str, spec: Spec) -> list[str]:
        return []


KIND = NoneKind()
