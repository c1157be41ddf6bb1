"""The pod host contract: what a pod's sandbox task owns besides its fake init.

The seed (hcsshim's ``wcowPodSandboxTask``) owns an optional utility VM, ``host``; podshim's
hosts are its Linux counterparts, each a *host kind* plugged in through
:mod:`podshim.host.registry`:

* ``none`` (:mod:`podshim.host.none`, the seed's ``host == nil``): nothing is created;
  workloads get whatever namespaces their specs name after the namespace rewrite.
* ``namespaces`` (:mod:`podshim.host.namespaces`): the pod's IPC and UTS namespaces
  pinned by bind mounts, the network namespace CRI made, the sandbox cgroup, sysctls,
  and a hardened PID-namespace init when the pod shares its PID namespace.
* a KVM utility VM later: a new directory and a registry entry (see ARCHITECTURE.md).

A host kind supplies everything that differs between kinds: the host itself, how the
pod's workload containers are made (:meth:`Host.create_workload`), exec in the host
with explicit control, and the crash cleanup the ``delete`` action runs
(:meth:`HostKind.cleanup`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from google.protobuf import any_pb2

from podshim.api.types import mount_pb2
from podshim.host.control import ExecControl
from podshim.oci.runtime import RuntimeConfig
from podshim.oci.spec import Spec
from podshim.task.contract import ShimContext, Task

if TYPE_CHECKING:
    from podshim.cgroups.stats import Metrics

#: namespace kinds as OCI names them
NS_TYPES = ("pid", "network", "ipc", "uts", "mount", "user", "cgroup", "time")


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """A workload container of the pod, as its Create asked for it."""

    id: str
    bundle: str
    spec: Spec
    runtime: RuntimeConfig
    rootfs: Sequence[mount_pb2.Mount] = ()
    terminal: bool = False
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    #: the sandbox task's pid (CRI writes ``/proc/<it>/ns/<t>`` into workload specs)
    sandbox_pid: int = 0
    #: pids of the pod's running workload inits (``kubectl debug --target`` may name one)
    pod_pids: frozenset[int] = field(default_factory=frozenset)


class Workload(Task, Protocol):
    """A workload container as the pod sees it: a :class:`Task` plus what the pod's
    sandbox needs for Stats and for knowing its running processes."""

    #: its memory cgroup directory ("" if unknown)
    memory_cgroup: str

    @property
    def running(self) -> bool:
        """Whether its init process is running now."""
        ...

    def metrics(self) -> Metrics:
        """Its cgroup metrics; NotFound once it has no running process."""
        ...

    def fail(self, why: BaseException) -> None:
        """Its pod failed: report every process exited (/tasks/exit) and kill them. MUST
        NOT raise; idempotent."""
        ...


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
        """Tear everything down: every process the host runs is killed at once (the
        host is dead, :meth:`wait` returns), then what it made is removed.

        MUST be idempotent: once a call has succeeded, later calls succeed at once.
        When something cannot be removed now (a busy cgroup, a mount), it MUST raise
        a :mod:`podshim.errors` kind naming what is left (``Unavailable``: the call
        may be retried as is), keep what is left recorded where :meth:`HostKind.cleanup`
        finds it, and try again on the next call. The sandbox answers its Delete
        with that error, and containerd retries the Delete."""
        ...

    async def create_workload(self, ctx: ShimContext, req: WorkloadRequest) -> Workload:
        """Make and create (not start) a workload container of the pod in this host;
        it MUST have published /tasks/create when this returns. A request the host
        cannot honour MUST raise (InvalidArgument, FailedPrecondition) and leave nothing
        behind; a workload MUST NOT silently land in the machine's own namespaces when
        the pod has its own of that type (fail closed)."""
        ...

    async def exec_in_host(
        self,
        args: list[str],
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        control: ExecControl | None = None,
    ) -> int:
        """Run a diagnostic process inside the host and return its exit status;
        FailedPrecondition when the host has nowhere to run it. ``control`` carries the
        options (environment, working directory, terminal size) and MUST be attached to
        the process once it runs (:meth:`ExecControl.attach`) and detached when it ends,
        so signals and resizes reach it; None means a default control."""
        ...

    async def dump_stacks(self) -> str:
        """The host's own stacks ("" when it has none)."""
        ...

    async def share(
        self, host_path: str, guest_path: str, read_only: bool, pid: int = 0
    ) -> None:
        """Share a host path into the pod host or, with ``pid`` (a process of one of
        the pod's containers, as its task reports it), into that container at
        ``guest_path``; FailedPrecondition naming why when the host kind cannot."""
        ...

    async def stats(self) -> any_pb2.Any | None:
        """Host-level metrics, or None when the host has none."""
        ...


class HostKind(Protocol):
    """A kind of pod host, as registered in :mod:`podshim.host.registry`."""

    #: the name in podshim's config (``default_host``) and in the sandbox's bundle record
    name: str

    def make(
        self,
        pod_id: str,
        ctx: ShimContext,
        spec: Spec,
        runtime: RuntimeConfig,
        options: Mapping[str, object] | None = None,
    ) -> Host:
        """A new, not yet created host for the pod whose sandbox spec is ``spec``;
        ``runtime`` is the Create's OCI runtime configuration (a host that makes the
        pod's cgroup MUST use its driver: ``systemd_cgroup``); ``options`` is the table
        named after the kind in podshim's config (``[uvm]``), unchecked: a kind that
        takes none MUST refuse a non-empty one, and a kind MUST refuse a key it does
        not know, with InvalidArgument naming it, here or at ``Host.create``. MUST do
        no I/O (``Host.create`` does)."""
        ...

    def cleanup(self, namespace: str, pod_id: str, spec: Spec) -> list[str]:
        """Remove what a host of this kind left behind when its shim died (run by the
        ``delete`` action of the sandbox, without the shim). Synchronous, done within
        a few seconds (containerd kills ``delete`` after 5 s); MUST NOT raise and MUST
        touch only what a host of this kind made for this pod. Returns what could not
        be removed (empty once everything is gone): a non-empty answer is printed and
        makes ``delete`` fail, so containerd keeps the bundle and runs it again later;
        what is left MUST stay recorded for that run."""
        ...
