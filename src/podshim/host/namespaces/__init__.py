"""The ``namespaces`` pod host kind (see :mod:`podshim.host.namespaces.host`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from podshim import errors as errdefs
from podshim import rundir

if TYPE_CHECKING:
    from podshim.host.namespaces.host import NamespacesHost
    from podshim.oci.runtime import RuntimeConfig
    from podshim.oci.spec import Spec
    from podshim.task.contract import ShimContext


class NamespacesKind:
    """Pinned namespaces, the sandbox cgroup and an optional PID-namespace init."""

    name = "namespaces"

    def make(
        self,
        pod_id: str,
        ctx: ShimContext,
        spec: Spec,
        runtime: RuntimeConfig,
        options: Mapping[str, object] | None = None,
    ) -> NamespacesHost:
        if options:
            raise errdefs.InvalidArgument(f"host kind {self.name} takes no options: [{self.name}]")
        # imported here: the `delete` action imports this package for cleanup() only
        from podshim.host.namespaces.host import NamespacesHost

        return NamespacesHost(
            pod_id, ctx.namespace, spec, ctx.reaper, systemd_cgroup=runtime.systemd_cgroup
        )

    def cleanup(self, namespace: str, pod_id: str, spec: Spec) -> list[str]:
        if not os.path.isdir(os.path.join(rundir.pods_dir(), namespace, pod_id)):
            return []  # the host was closed by its shim: nothing left, nothing to import
        # imported only now: `delete` runs for every sandbox, most of them closed cleanly
        from podshim.host.namespaces.cleanup import cleanup_sandbox

        return cleanup_sandbox(namespace, pod_id, spec)


KIND = NamespacesKind()
