"""The ``uvm`` pod host kind: one QEMU utility VM per pod (see ARCHITECTURE.md and
:mod:`podshim.host.uvm.host`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from podshim.host.uvm.host import UvmHost
    from podshim.oci.runtime import RuntimeConfig
    from podshim.oci.spec import Spec
    from podshim.task.contract import ShimContext


class UvmKind:
    """A utility VM per pod: guest containers, the pod's network on a tap."""

    name = "uvm"

    def make(
        self,
        pod_id: str,
        ctx: ShimContext,
        spec: Spec,
        runtime: RuntimeConfig,
        options: Mapping[str, object] | None = None,
    ) -> UvmHost:
        # imported here: the `delete` action imports this package for cleanup() only
        from podshim.host.uvm import config
        from podshim.host.uvm.host import UvmHost

        settings = config.from_env(table=options)  # a bad one: create() refuses it
        return UvmHost(pod_id, ctx.namespace, spec, ctx.reaper, settings)

    def cleanup(self, namespace: str, pod_id: str, spec: Spec) -> list[str]:
        from podshim.host.uvm import state

        if not os.path.isdir(state.run_dir(namespace, pod_id)):
            return []  # closed by its shim: nothing left
        from podshim.host.uvm.cleanup import cleanup_vm

        return cleanup_vm(namespace, pod_id)


KIND = UvmKind()
