"""A pod: its sandbox task and every workload container, in one shim process.

The counterpart of runhcs's ``pod``. Checks at workload Create, in order (each tested):
the CRI annotations must say ``container`` and this pod's sandbox id (else
FailedPrecondition); the workload id must not be the pod's or a known task's
(AlreadyExists; the service also serialises creates of one id); the sandbox init must be
running (FailedPrecondition); then the namespace rewrite (``rewrite.py``) must succeed.
A workload that exits never ends the pod; a replacement joins the same host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from podshim import errors as errdefs
from podshim.api.types import mount_pb2
from podshim.host import rewrite
from podshim.host.contract import Host, NoneHost
from podshim.oci.runc import RuntimeConfig
from podshim.pod.anchor import Anchor
from podshim.pod.sandbox import SandboxTask
from podshim.shim.paths import CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION
from podshim.task.container import Container
from podshim.task.contract import ShimContext
from podshim.task.states import Status

log = logging.getLogger("podshim.pod")


def spec_annotations(spec: dict[str, Any]) -> dict[str, str]:
    ann = spec.get("annotations") or {}
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}


def make_host(kind: str, pod_id: str, ctx: ShimContext, spec: dict[str, Any]) -> Host:
    if kind == "none":
        return NoneHost()
    if kind == "namespaces":
        from podshim.host.namespaces.host import NamespacesHost

        return NamespacesHost(pod_id, ctx.namespace, spec, ctx.reaper)
    raise errdefs.InvalidArgument(f"unknown pod host kind {kind!r}")


class Pod:
    """One pod. ``id`` is the sandbox task's id."""

    #: how workload containers are made (tests substitute a fake)
    make_container: Callable[..., Container] = Container

    def __init__(self, ctx: ShimContext, sandbox_id: str, spec: dict[str, Any], host: Host) -> None:
        self.ctx = ctx
        self.id = sandbox_id
        self.spec = spec
        self.host = host
        self.anchor = Anchor()
        self.sandbox: SandboxTask | None = None
        self.workloads: dict[str, Container] = {}
        self.sandbox_types = rewrite.namespace_types(spec)

    @classmethod
    async def create(
        cls,
        ctx: ShimContext,
        tid: str,
        bundle: str,
        spec: dict[str, Any],
        host_kind: str,
        host: Host | None = None,
    ) -> Pod:
        """Check the sandbox's annotations, build the host, and make the sandbox task.

        Raises:
            FailedPrecondition: the annotations do not describe this sandbox.
            InvalidArgument: the spec asks for something the host cannot do.
        """
        ann = spec_annotations(spec)
        if ann.get(CONTAINER_TYPE_ANNOTATION) != "sandbox" or ann.get(SANDBOX_ID_ANNOTATION) != tid:
            raise errdefs.FailedPrecondition(
                f"sandbox {tid}: annotations say type {ann.get(CONTAINER_TYPE_ANNOTATION)!r}, "
                f"sandbox id {ann.get(SANDBOX_ID_ANNOTATION)!r}"
            )
        pod = cls(ctx, tid, spec, host or make_host(host_kind, tid, ctx, spec))
        await pod.host.create()
        try:
            pid = pod.anchor.create()
        except OSError as exc:
            await pod.host.close()
            raise errdefs.Unknown(f"sandbox {tid}: {exc}") from None
        linux = spec.get("linux")
        cgroups_path = linux.get("cgroupsPath") if isinstance(linux, dict) else None
        pod.sandbox = SandboxTask(
            ctx, tid, bundle, pod.host, pid, pod.kill_workloads,
            workloads=lambda: list(pod.workloads.values()),
            cgroups_path=cgroups_path if isinstance(cgroups_path, str) else "",
        )  # fmt: skip
        pod.sandbox.begin()
        return pod

    def release(self) -> None:
        """After the sandbox's Delete: give the anchor pid back."""
        self.anchor.release()

    async def kill_workloads(self, signal: int) -> None:
        """Signal every workload (all its processes); gone ones are skipped."""

        async def one(c: Container) -> None:
            with contextlib.suppress(errdefs.NotFound, errdefs.FailedPrecondition):
                await c.kill("", signal, True)

        await asyncio.gather(*(one(c) for c in list(self.workloads.values())))

    def _running_pids(self) -> set[int]:
        return {c.pid for c in self.workloads.values() if c.init.status is Status.RUNNING and c.pid}

    async def create_workload(
        self,
        tid: str,
        bundle: str,
        spec: dict[str, Any],
        runtime: RuntimeConfig,
        rootfs: Sequence[mount_pb2.Mount],
        stdio: tuple[bool, str, str, str],
        is_known: Callable[[str], bool],
    ) -> Container:
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
        if sandbox is None or sandbox.machine.state is not Status.RUNNING or sandbox.closed:
            state = "missing" if sandbox is None else sandbox.machine.state.name.lower()
            raise errdefs.FailedPrecondition(
                f"task {tid}: pod sandbox {self.id} is {state}, not running"
            )
        refs = rewrite.sandbox_refs(spec, sandbox.pid)
        paths = {t: await self.host.namespace_path(t) for t in refs if t in self.sandbox_types}
        new_spec = rewrite.rewrite(
            spec,
            sandbox_pid=sandbox.pid,
            sandbox_types=self.sandbox_types,
            pod_paths=paths,
            pod_pids=self._running_pids(),
            host_kind=self.host.kind,
        )
        if new_spec != spec:
            _write_spec(bundle, new_spec)
        terminal, stdin, stdout, stderr = stdio
        c = self.make_container(
            self.ctx, tid, bundle, runtime, new_spec, rootfs,
            terminal=terminal, stdin=stdin, stdout=stdout, stderr=stderr,
        )  # fmt: skip
        await c.create()
        self.workloads[tid] = c
        return c

    def forget(self, tid: str) -> None:
        self.workloads.pop(tid, None)


def _write_spec(bundle: str, spec: dict[str, Any]) -> None:
    """Replace ``<bundle>/config.json`` atomically (runc reads the bundle's file)."""
    path = os.path.join(bundle, "config.json")
    tmp = path + ".podshim"
    with open(tmp, "w") as f:
        json.dump(spec, f)
    os.replace(tmp, path)
