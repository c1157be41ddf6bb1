"""A pod: its sandbox task and every workload container, in one shim process.

The counterpart of runhcs's ``pod``. The pod's host comes from the host kind registry
(:mod:`podshim.host.registry`); its kind is recorded in the sandbox's bundle so that the
``delete`` action can clean up after a crashed shim. Checks at workload Create, in order
(each tested): the CRI annotations must say ``container`` and this pod's sandbox id (else
FailedPrecondition); the workload id must not be the pod's or a known task's
(AlreadyExists; the service also serialises creates of one id); the sandbox init must be
running (FailedPrecondition); then the host makes the workload (for local hosts the
namespace rewrite must succeed). A workload that exits never ends the pod; a replacement
joins the same host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from podshim import errors as errdefs
from podshim.api.types import mount_pb2
from podshim.host import registry
from podshim.host.contract import Host, Workload, WorkloadRequest
from podshim.oci import bundle as files
from podshim.oci.ids import CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION
from podshim.oci.runtime import RuntimeConfig
from podshim.oci.spec import Spec, cgroups_path, spec_annotations
from podshim.pod.anchor import Anchor
from podshim.pod.sandbox import SandboxTask
from podshim.task.contract import ShimContext

log = logging.getLogger("podshim.pod")


class Pod:
    """One pod. ``id`` is the sandbox task's id."""

    def __init__(self, ctx: ShimContext, sandbox_id: str, spec: Spec, host: Host) -> None:
        #: the pod's background jobs (its sandbox's watchers, its containers' monitors):
        #: an unexpected failure in one fails this pod only (:meth:`fail`)
        self.jobs = ctx.jobs.child(f"pod {sandbox_id}", on_failure=self.fail)
        #: the context of the pod's tasks: the shim's, with the pod's job group
        self.ctx = replace(ctx, jobs=self.jobs)
        self.id = sandbox_id
        self.spec = spec
        self.host = host
        self.anchor = Anchor()
        self.sandbox: SandboxTask | None = None
        self.workloads: dict[str, Workload] = {}

    @classmethod
    async def create(
        cls,
        ctx: ShimContext,
        tid: str,
        bundle: str,
        spec: Spec,
        host_kind: str,
        host: Host | None = None,
        runtime: RuntimeConfig | None = None,
        host_options: Mapping[str, object] | None = None,
    ) -> Pod:
        """Check the sandbox's annotations, build the host, and make the sandbox task.
        ``host`` (tests) replaces the host the kind would make; ``runtime`` is the
        Create's OCI runtime configuration (its cgroup driver applies to the pod too);
        ``host_options`` the config's table of the host kind.

        Raises:
            FailedPrecondition: the annotations do not describe this sandbox.
            InvalidArgument: an unknown host kind, or a spec the host cannot honour.
        """
        ann = spec_annotations(spec)
        if ann.get(CONTAINER_TYPE_ANNOTATION) != "sandbox" or ann.get(SANDBOX_ID_ANNOTATION) != tid:
            raise errdefs.FailedPrecondition(
                f"sandbox {tid}: annotations say type {ann.get(CONTAINER_TYPE_ANNOTATION)!r}, "
                f"sandbox id {ann.get(SANDBOX_ID_ANNOTATION)!r}"
            )
        if host is None:
            host = registry.get(host_kind).make(
                tid, ctx, spec, runtime or RuntimeConfig(), host_options
            )
        _record_host(bundle, host.kind)  # first: a crash during create is cleaned up too
        pod = cls(ctx, tid, spec, host)
        try:
            await pod.host.create()
        except BaseException:
            await pod.jobs.aclose()
            raise
        try:
            pid = pod.anchor.create()
        except OSError as exc:
            try:
                await pod.host.close()
            except Exception as left:  # recorded: the `delete` action's cleanup retries
                log.error("sandbox %s: undoing the host after a failed create: %s", tid, left)
            await pod.jobs.aclose()
            raise errdefs.Unknown(f"sandbox {tid}: {exc}") from None
        pod.sandbox = SandboxTask(
            pod.ctx, tid, bundle, pod.host, pid, pod.kill_workloads,
            workloads=lambda: list(pod.workloads.values()),
            cgroups_path=cgroups_path(spec),
        )  # fmt: skip
        pod.sandbox.begin()
        return pod

    async def release(self) -> None:
        """After the sandbox's Delete: end the pod's jobs, give the anchor pid back."""
        await self.jobs.aclose()
        self.anchor.release()

    def fail(self, why: BaseException, job: str) -> None:
        """A job of this pod failed unexpectedly (a bug): the pod stops, the shim and its
        other pods go on. Every workload reports exited and is killed; the sandbox's init
        exits with 1, which tears the host down and publishes its /tasks/exit."""
        log.error("pod %s failed in %s: stopping the pod", self.id, job, exc_info=why)
        for w in list(self.workloads.values()):
            w.fail(why)
        if self.sandbox is not None:
            self.sandbox.force_exit(1)

    async def kill_workloads(self, signal: int) -> None:
        """Signal every workload (all its processes); gone ones are skipped."""

        async def one(c: Workload) -> None:
            with contextlib.suppress(errdefs.NotFound, errdefs.FailedPrecondition):
                await c.kill("", signal, True)

        await asyncio.gather(*(one(c) for c in list(self.workloads.values())))

    def _running_pids(self) -> set[int]:
        return {c.pid for c in self.workloads.values() if c.running and c.pid}

    async def create_workload(
        self,
        tid: str,
        bundle: str,
        spec: Spec,
        runtime: RuntimeConfig,
        rootfs: Sequence[mount_pb2.Mount],
        stdio: tuple[bool, str, str, str],
        is_known: Callable[[str], bool],
    ) -> Workload:
        ann = spec_annotations(spec)
        if (
            ann.get(CONTAINER_TYPE_ANNOTATION) != "container"
            or ann.get(SANDBOX_ID_ANNOTATION) != self.id
        ):
            raise errdefs.FailedPrecondition(
                f"task {tid}: annotations say type {ann.get(CONTAINER_TYPE_ANNOTATION)!r}, "
                f"sandbox id {ann.get(SANDBOX_ID_ANNOTATION)!r}; this shim holds pod {self.id}"
            )
        if tid == self.id or is_known(tid):
            raise errdefs.AlreadyExists(f"task {tid}: already exists")
        sandbox = self.sandbox
        if sandbox is None or not sandbox.running:
            state = "missing" if sandbox is None else sandbox.machine.state.name.lower()
            raise errdefs.FailedPrecondition(
                f"task {tid}: pod sandbox {self.id} is {state}, not running"
            )
        terminal, stdin, stdout, stderr = stdio
        req = WorkloadRequest(
            tid, bundle, spec, runtime, rootfs, terminal, stdin, stdout, stderr,
            sandbox_pid=sandbox.pid, pod_pids=frozenset(self._running_pids()),
        )  # fmt: skip
        c = await self.host.create_workload(self.ctx, req)
        self.workloads[tid] = c
        return c

    def forget(self, tid: str) -> None:
        self.workloads.pop(tid, None)


def _record_host(bundle: str, kind: str) -> None:
    """Leave the host kind in the sandbox's bundle for the ``delete`` action."""
    try:
        with open(os.path.join(bundle, files.HOST_RECORD), "w") as f:
            json.dump({"kind": kind}, f)
    except OSError as exc:
        log.warning("sandbox bundle %s: cannot record the host kind: %s", bundle, exc)
