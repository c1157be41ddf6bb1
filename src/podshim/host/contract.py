"""The pod host: what a pod's sandbox task owns besides its fake init.

The seed (hcsshim's ``wcowPodSandboxTask``) owns an optional utility VM, ``host``; podshim's
hosts are Linux counterparts. Kinds:

* ``none`` (:class:`NoneHost`, the seed's ``host == nil``): nothing is created; workloads
  get whatever namespaces their specs name after the namespace rewrite.
* ``namespaces`` (``nshost.NamespacesHost``): the pod's IPC and UTS namespaces pinned by
  bind mounts, the network namespace CRI made, the sandbox cgroup, sysctls, and a
  hardened PID-namespace init when the pod shares its PID namespace.
* later a KVM utility VM: the protocol already has what it needs (wait for exit, exec in
  the host, stacks, share, stats).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from google.protobuf import any_pb2

from podshim import errors as errdefs

#: namespace kinds as OCI names them
NS_TYPES = ("pid", "network", "ipc", "uts", "mount", "user", "cgroup", "time")


class Host(Protocol):
    """Contract of a pod host. Implementations are used by one sandbox task only."""

    kind: str

    async def create(self) -> None:
        """Build the host (called once, from the sandbox's Create). On failure it MUST
        leave nothing behind and raise (InvalidArgument for a spec it cannot honour)."""
        ...

    async def namespace_path(self, ns_type: str) -> str | None:
        """Where workloads join the pod's namespace ``ns_type`` (an OCI type such as
        "network"), or None when the pod has none of its own (workloads then use the
        host's, as runc would). For "pid" the first call creates the pod's PID-namespace
        init (so it exists only when a workload shares the pod's PID namespace). MUST only
        be called after :meth:`create`."""
        ...

    @property
    def init_pid(self) -> int:
        """Host pid of the pod's PID-namespace init, or 0 when there is none."""
        ...

    async def wait(self) -> int:
        """Block until the host dies and return a status; a host that cannot die on
        its own MUST block until :meth:`close`, then return 0."""
        ...

    async def close(self) -> None:
        """Tear everything down. MUST be idempotent and MUST NOT raise."""
        ...

    async def exec_in_host(
        self, args: list[str], stdin: str, stdout: str, stderr: str, terminal: bool
    ) -> int:
        """Run a diagnostic process inside the host; FailedPrecondition when the host
        has nowhere to run it."""
        ...

    async def dump_stacks(self) -> str:
        """The host's own stacks ("" when it has none)."""
        ...

    async def share(self, host_path: str, guest_path: str, read_only: bool) -> None:
        """Share a host path into the pod host; FailedPrecondition naming why when
        the host kind cannot."""
        ...

    async def stats(self) -> any_pb2.Any | None:
        """Host-level metrics, or None when the host has none."""
        ...


class NoneHost:
    """The seed's ``host == nil``: nothing to create, nothing that can die."""

    kind = "none"

    def __init__(self) -> None:
        self._closed = asyncio.Event()

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

    async def exec_in_host(
        self, args: list[str], stdin: str, stdout: str, stderr: str, terminal: bool
    ) -> int:
        raise errdefs.FailedPrecondition("pod has no host (host kind 'none'): nowhere to exec")

    async def dump_stacks(self) -> str:
        return ""

    async def share(self, host_path: str, guest_path: str, read_only: bool) -> None:
        raise errdefs.FailedPrecondition(
            "pod has no host (host kind 'none'): nothing to share into"
        )

    async def stats(self) -> any_pb2.Any | None:
        return None
