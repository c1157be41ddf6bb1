"""The ``namespaces`` pod host kind (see :mod:`podshim.host.namespaces.host`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from podshim.oci.spec import Spec

if TYPE_CHECKING:
    from podshim.host.namespaces.host import NamespacesHost
    from podshim.task.contract import ShimContext


class NamespacesKind:
    """Pinned namespaces, the sandbox cgroup and an optional PID-namespace init."""

    name = "namespaces"

    def make(self, pod_id: str, ctx: ShimContext, spec: Spec) -> NamespacesHost:
        # imported here: the `delete` action imports this package for cleanup() only
        from podshim.host.namespaces.host import NamespacesHost

        return NamespacesHost(pod_id, ctx.namespace, spec, ctx.reaper)

    def cleanup(self, namespace: str, pod_id: str, spec: Spec) -> list[str]:
        from podshim.host.namespaces.cleanup import cleanup_sandbox  # light: `delete` path

        return cleanup_sandbox(namespace, pod_id, spec)


KIND = NamespacesKind()
