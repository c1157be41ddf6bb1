"""The pod sandbox task: hcsshim's ``wcowPodSandboxTask`` rebuilt for Linux pods.

No container and no pause process: the task has a *fake* init whose state machine is
the seed's (Created -> Running -> Exited, Created -> Exited), and owns the pod host.

Lifetime (the seed's, with its defects fixed on purpose):

* ``close()`` runs once: tear down the host, publish ``/tasks/exit``, release waiters.
  Wait on the init blocks until then (the seed's ``Task.Wait``).
* The init exits by Kill (or DeleteExec in Created); its exit closes the task.
* Host death (the pod's PID-namespace init died) kills every workload, force-exits the
  init with status 1 and closes the task.

Deliberate deviations from the seed, each tested:

1. DeleteExec of init *waits for close*, so ``/tasks/exit`` always precedes
   ``/tasks/delete`` (the seed could publish delete first).
2. Stats with no host does not crash: it answers an empty Metrics of the host's cgroup
   version (the seed dereferenced the nil UVM on some paths).
3. ForceExit honours its status. Kill exits the fake init with 128+signal, like a real
   pause process killed by that signal (runc.v2 reports 137 after StopPodSandbox), for
   the signals that end pause (SIGINT, SIGTERM, SIGKILL); any other signal changes
   nothing, as pause never receives it. The seed exited with 0 (Running) or 1
   (Created) on any signal at all. Signals outside 1-64 are InvalidArgument (service).
5. ``close`` (host teardown, ``/tasks/exit``) releases Wait and Delete even when the
   host's close raises; Delete then answers the teardown's error (Unavailable naming
   what is left, never a silent success) and keeps the task, and the next Delete
   tries the teardown again (containerd's CRI retries it with a backoff).
4. Kill with ``all`` signals the workloads first and the sandbox last, and still reaches
   the workloads when the sandbox has already exited (then answers NotFound for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim import tracing
from podshim.api.cgroups.v1 import metrics_pb2 as v1pb
from podshim.api.cgroups.v2 import metrics_pb2 as v2pb
from podshim.api.events import task_pb2 as ev
from podshim.cgroups import mode, v1, v2
from podshim.cgroups import stats as cgstats
from podshim.host.contract import Host
from podshim.logs import TaskLogger
from podshim.task.contract import ExecRequest, ExitInfo, ProcessState, ShimContext, timestamp
from podshim.task.states import SANDBOX_INIT_TABLE, Machine, Status, Verb

if TYPE_CHECKING:
    from podshim.cgroups.stats import Metrics

log = logging.getLogger("podshim.sandbox")


#: the signals that end pause (it handles SIGINT and SIGTERM; SIGKILL always acts): as
#: the init of its PID namespace, pause never receives the others, so they change nothing
ENDING_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGKILL})

class Measured(Protocol):
    """What the sandbox's Stats needs of a workload container of its pod."""

    id: str
    #: its memory cgroup directory ("" if unknown)
    memory_cgroup: str

    def metrics(self) -> Metrics:
        """Its cgroup metrics; NotFound once it has no running process."""
        ...


def _no_workloads() -> list[Measured]:
    return []


class SandboxTask:
    """A pod's sandbox task. ``pid`` is the pod's anchor pid for its whole life."""

    def __init__(
        self,
        ctx: ShimContext,
        tid: str,
        bundle: str,
        host: Host,
        pid: int,
        kill_workloads: Callable[[int], Awaitable[None]],
        workloads: Callable[[], Iterable[Measured]] = _no_workloads,
        cgroups_path: str = "",
    ) -> None:
        self.ctx = ctx
        self.id = tid
        self.bundle = bundle
        self.host = host
        self._pid = pid
        self._kill_workloads = kill_workloads
        #: the pod's workload containers now (for Stats)
        self._workloads = workloads
        #: the sandbox's own ``linux.cgroupsPath`` ("" for none)
        self.cgroups_path = cgroups_path
        self.log = TaskLogger(log, pod_id=tid, tid=tid)
        self.machine = Machine(SANDBOX_INIT_TABLE, f"sandbox {tid}")
        self.exit: ExitInfo | None = None
        self._init_exited = asyncio.Event()
        self._closed = asyncio.Event()
        self._closing = False
        #: why the host's teardown has not finished (None: finished, or not begun)
        self.teardown_error: BaseException | None = None
        #: the watchers of init and host: jobs of the pod's group
        self.jobs = ctx.jobs.child(f"sandbox {tid}")

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def running(self) -> bool:
        return self.machine.state is Status.RUNNING and not self._closed.is_set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def begin(self) -> None:
        """After a successful Create: publish /tasks/create and watch init and host."""
        tracing.set_default_attribute("pod-id", self.id)  # this shim's pod, from now on
        self.jobs.spawn(self._wait_init_exit(), "podSandboxTask::waitInitExit")
        self.jobs.spawn(self._wait_host_exit(), "podSandboxTask::waitHostExit")
        self.ctx.publisher.publish(
            ev.TaskCreate(container_id=self.id, bundle=self.bundle, io=ev.TaskIO(), pid=self._pid)
        )

    # -- the fake init ---------------------------------------------------------------
    def _no_exec(self, exec_id: str) -> None:
        if exec_id:
            raise errdefs.NotFound(f"exec {exec_id} of sandbox {self.id}: not found")

    def force_exit(self, status: int) -> None:
        """Move the init to Exited with ``status`` (idempotent; no event: close sends it)."""
        if self._init_exited.is_set():
            return
        if self.machine.can(Verb.EXIT):
            self.machine.fire(Verb.EXIT)
        self.exit = ExitInfo(status, time.time())
        self._init_exited.set()

    async def _wait_init_exit(self) -> None:
        with tracing.span("podSandboxTask::waitInitExit", root=True, tid=self.id):
            await self._init_exited.wait()
            await self.close()

    async def _wait_host_exit(self) -> None:
        with tracing.span("podSandboxTask::waitHostExit", root=True, tid=self.id):
            status = await self.host.wait()
            if self._closing:
                return
            log.warning("sandbox %s: pod host exited with %d: stopping the pod", self.id, status)
            with contextlib.suppress(Exception):
                await self._kill_workloads(9)
            self.force_exit(1)

    async def close(self) -> None:
        """Tear down the host, publish /tasks/exit, release waiters. Runs once."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            await self.host.close()
        except Exception as exc:  # kept for Delete, which answers it and retries
            self.teardown_error = exc
            log.error("sandbox %s: closing the pod host: %s", self.id, exc)
        finally:
            # whatever happened above, the sandbox has exited: Wait and Delete go on
            self.force_exit(1)  # no-op when it has an exit already
            ex = self.exit or ExitInfo(1, time.time())
            self._closed.set()
            self.log.info("sandbox exited status %d", ex.status)
            self.ctx.publisher.publish(
                ev.TaskExit(
                    container_id=self.id,
                    id=self.id,
                    pid=self._pid,
                    exit_status=ex.status,
                    exited_at=timestamp(ex.at),
                )
            )

    # -- Task ---------------------------------------------------------------------------
    async def start(self, exec_id: str) -> int:
        self._no_exec(exec_id)
        self.machine.fire(Verb.START)
        self.ctx.publisher.publish(ev.TaskStart(container_id=self.id, pid=self._pid))
        return self._pid

    def state(self, exec_id: str) -> ProcessState:
        self._no_exec(exec_id)
        return ProcessState(
            id=self.id,
            exec_id="",
            bundle=self.bundle,
            pid=self._pid,
            status=self.machine.state if not self._init_exited.is_set() else Status.STOPPED,
            stdin="",
            stdout="",
            stderr="",
            terminal=False,
            exit=self.exit,
        )

    async def kill(self, exec_id: str, signal: int, all_: bool) -> None:
        if exec_id and all_:
            raise errdefs.FailedPrecondition(
                f"sandbox {self.id}: cannot signal all processes of an exec"
            )
        self._no_exec(exec_id)
        if all_:
            await self._kill_workloads(signal)  # workloads first, even after the sandbox exited
        if self._init_exited.is_set():
            raise errdefs.NotFound(f"sandbox {self.id}: process already finished")
        if signal in ENDING_SIGNALS:
            self.force_exit(128 + signal)
        else:  # what pause, a PID-namespace init without a handler for it, never sees
            self.log.info("signal %d ignored, as pause ignores it", signal)

    async def exec(self, req: ExecRequest) -> None:
        raise errdefs.NotImplemented(f"sandbox {self.id}: a pod sandbox runs no processes")

    async def delete(self, exec_id: str) -> tuple[int, ExitInfo]:
        self._no_exec(exec_id)
        self.machine.check(Verb.DELETE)  # Running -> FailedPrecondition
        if self.machine.state is Status.CREATED:
            self.force_exit(0)
        await self.close()  # /tasks/exit before /tasks/delete
        await self._finish_teardown()
        self.machine.fire(Verb.DELETE)
        await self.jobs.aclose()
        ex = self.exit or ExitInfo(0, time.time())
        self.ctx.publisher.publish(
            ev.TaskDelete(
                container_id=self.id,
                pid=self._pid,
                exit_status=ex.status,
                exited_at=timestamp(ex.at),
            )
        )
        return self._pid, ex

    async def _finish_teardown(self) -> None:
        """Try the host's teardown again if it did not finish; raise if it still does
        not (the task stays, so Delete can be retried)."""
        if self.teardown_error is None:
            return
        try:
            await self.host.close()
        except Exception as exc:
            self.teardown_error = exc
            # never NotFound and the like: containerd would take the task for gone
            if isinstance(exc, (errdefs.Unavailable, errdefs.FailedPrecondition)):
                raise
            raise errdefs.Unavailable(
                f"sandbox {self.id}: tearing down the pod host: {exc}"
            ) from exc
        self.teardown_error = None
        self.log.info("pod host teardown finished")

    async def wait(self, exec_id: str) -> ExitInfo:
        self._no_exec(exec_id)
        await self._closed.wait()
        assert self.exit is not None
        return self.exit

    async def pids(self) -> list[tuple[int, str]]:
        """The PID init when the pod has one, else the anchor (the sandbox pid CRI knows):
        a live sandbox never answers no pids (containerd 1.7 takes a loaded task without
        pids for a leaked shim after a restart, and CRI then marks the pod NOTREADY)."""
        if self._closed.is_set():
            return []
        pid = self.host.init_pid or self._pid
        return [(pid, "")] if pid else []

    async def pause(self) -> None:
        raise errdefs.NotImplemented(f"sandbox {self.id}: a pod sandbox cannot be paused")

    async def resume(self) -> None:
        raise errdefs.NotImplemented(f"sandbox {self.id}: a pod sandbox cannot be resumed")

    async def update(self, resources: any_pb2.Any) -> None:
        raise errdefs.NotImplemented(f"sandbox {self.id}: update the pod's containers instead")

    async def stats(self) -> any_pb2.Any:
        """The pod's metrics: the sum over its cgroups (the host's own metrics, else the
        sandbox cgroup if it exists, plus every workload container's cgroup that is not
        inside the sandbox cgroup) in the cgroup version of the host's own metrics, else
        the machine's; an empty Metrics when
        there is nothing to measure. A workload gone meanwhile is skipped; a sandbox
        whose init has exited is NotFound."""
        if self._init_exited.is_set():
            raise errdefs.NotFound(f"sandbox {self.id}: process already finished")
        kind: type[Metrics] = v2pb.Metrics if mode() == "unified" else v1pb.Metrics
        parts: list[Metrics] = []
        inside = ""  # workloads below this directory are counted in the sandbox's already
        got = await self.host.stats()
        if got is not None:
            parts.append(cgstats.unpack(got))
            kind = type(parts[0])  # the host's cgroups (a VM's guest is cgroup v2)
        elif self.cgroups_path:
            try:
                parts.append(cgstats.metrics_for_cgroups_path(self.cgroups_path))
                inside = _memory_dir(self.cgroups_path)
            except (errdefs.NotFound, ValueError):
                pass  # no sandbox cgroup (the "none" host, or already removed)
        for w in list(self._workloads()):
            if inside and w.memory_cgroup.startswith(inside + "/"):
                continue
            try:
                parts.append(w.metrics())
            except errdefs.NotFound:
                continue  # exited, or its cgroup is gone
        same = [m for m in parts if isinstance(m, kind)]
        if len(same) != len(parts):
            left_out = len(parts) - len(same)
            self.log.warning("stats: %d metrics of another cgroup version left out", left_out)
        if not same:
            return cgstats.pack(kind())
        if len(same) == 1:
            return cgstats.pack(same[0])
        return cgstats.pack(cgstats.sum_metrics(same))  # type: ignore[type-var]

    def close_io(self, exec_id: str) -> None:
        self._no_exec(exec_id)

    def resize(self, exec_id: str, width: int, height: int) -> None:
        self._no_exec(exec_id)
        raise errdefs.FailedPrecondition(f"sandbox {self.id}: not a tty")


def _memory_dir(cgroups_path: str) -> str:
    """The memory cgroup directory of an OCI ``linux.cgroupsPath`` ("" if unknown)."""
    try:
        if mode() == "unified":
            return v2.path_for_cgroups_path(cgroups_path)
        return v1.paths_for_cgroups_path(cgroups_path).get("memory", "")
    except (errdefs.ShimError, OSError, ValueError):
        return ""
