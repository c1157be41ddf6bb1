"""A container run by the OCI runtime: the Linux counterpart of runhcs's hcsTask.

Implements :class:`~podshim.task.contract.Task`. Every process exit arrives through the
shim's one reaper; every state change goes through the tables in ``states.py``.

A call cancelled while the runtime works (a ttrpc deadline, a lost connection) gets its
CancelledError only after the runtime command has finished (see ``Reaper.run``), and
then undoes its effect before it ends: a cancelled Create leaves no runtime container,
bundle record, pid file or mount; a cancelled Start or Exec kills the process it
started and waits for it. The undo runs as a job of the container, so a second
cancellation cannot cut it short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim import tracing
from podshim.api.events import task_pb2 as ev
from podshim.api.types import mount_pb2
from podshim.cgroups.stats import metrics_for_pid, pack
from podshim.jobs import wait_through_cancels
from podshim.linux.reaper import Exit
from podshim.logs import TaskLogger
from podshim.oci import bundle as files
from podshim.oci.ids import SANDBOX_ID_ANNOTATION, valid_id
from podshim.oci.runtime import OciRuntime, RuntimeConfig
from podshim.oci.spec import Spec, private_pid_ns
from podshim.task.bundlefs import BundleFiles
from podshim.task.contract import ExecRequest, ExitInfo, ProcessState, ShimContext, timestamp
from podshim.task.oomwatch import OomWatch, memory_cgroup
from podshim.task.process import Process, unlink
from podshim.task.states import Status, Verb

if TYPE_CHECKING:
    from podshim.cgroups.stats import Metrics

#: how long an init's /tasks/exit may wait for a Kill in flight to be answered
KILL_ANSWER_WAIT = 5.0

log = logging.getLogger("podshim.container")
T = TypeVar("T")


class Container:
    """A runc container with its init and execs."""

    def __init__(
        self,
        ctx: ShimContext,
        tid: str,
        bundle: str,
        spec: Spec,
        rootfs: Sequence[mount_pb2.Mount],
        runtime: OciRuntime,
        *,
        terminal: bool,
        stdin: str,
        stdout: str,
        stderr: str,
    ) -> None:
        self.ctx = ctx
        self.id = tid
        self.bundle = bundle
        self.spec = spec
        self.rootfs = list(rootfs)
        #: the OCI runtime driver (injected: runc, crun, or the tests' fake)
        self.runc = runtime
        self.init = Process(tid, "", bundle, terminal, stdin, stdout, stderr)
        self.execs: dict[str, Process] = {}
        self.execs_spec: dict[str, bytes] = {}  # exec id -> OCI process JSON for runc
        #: Kill calls of the init still waiting for the runtime (see :meth:`_report_exit`)
        self._kills_in_flight = 0
        self._no_kill_in_flight = asyncio.Event()
        self._no_kill_in_flight.set()
        #: read now: the exit monitor must not meet a spec it cannot read
        self._own_pid_ns = private_pid_ns(spec)
        ann = spec.get("annotations")
        pod_id = str(ann.get(SANDBOX_ID_ANNOTATION, "")) if isinstance(ann, dict) else ""
        #: logs with this task's pod-id and tid fields
        self.log = TaskLogger(log, pod_id=pod_id, tid=tid)
        self._files = BundleFiles(tid, bundle, rootfs, self.log)
        #: this container's background jobs (exit monitors, OOM watch): a child of its
        #: owner's group (the pod's, or the shim's for a standalone container)
        self.jobs = ctx.jobs.child(f"task {tid}")
        #: the memory cgroup directory of the init (found right after create), or ""
        self.memory_cgroup = ""
        self._oom = OomWatch(tid, self.jobs, self.log, self._on_oom)

    # -- lifecycle ------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.init.pid

    async def create(self) -> None:
        """Mount the rootfs, open stdio, ``runc create``; publishes /tasks/create.
        On failure everything done so far is undone.

        AlreadyExists, touching nothing (not even the runtime record the ``delete``
        action acts on), when the runtime already holds a container of this id in this
        namespace: another containerd's, sharing a configured runtime root, or a
        leftover. Only what this Create made is undone after a failure."""
        wants_tty = (self.spec.get("process") or {}).get("terminal") is True
        if wants_tty != self.init.io.terminal:
            raise errdefs.InvalidArgument(
                f"task {self.id}: the request's terminal={self.init.io.terminal} does not "
                f"match the spec's process.terminal={wants_tty}"
            )
        if self.runc.exists(self.id):
            raise errdefs.AlreadyExists(
                f"task {self.id}: the OCI runtime ({self.runc.cfg.root}) already has a "
                f"container {self.id} in namespace {self.ctx.namespace}; it is left alone"
            )
        pid_file = self._files.init_pid_file
        mark = self.ctx.reaper.mark()
        try:
            self._files.record_runtime(self.runc.cfg)
            unlink(pid_file)  # a pid read from it is this Create's
            self._files.mount_rootfs()
            await self.init.io.open()
            await _to_its_end(
                self.runc.create(
                    self.id,
                    self.bundle,
                    pid_file,
                    self.init.io.child_fds,
                    self.init.io.console_socket,
                )
            )
            await self.init.io.started()
            self.init.claim(self.ctx.reaper, pid_file, mark)
        except BaseException:
            await self._undo(self._undo_create(pid_file, mark), "undoCreate")
            raise
        self.init.monitor = self.jobs.spawn(self._monitor(self.init), f"waitExit:{self.id}")
        try:
            self.memory_cgroup = memory_cgroup(self.init.pid)
            await self._oom.start(self.memory_cgroup, self.init.pid)
        except BaseException:  # cancelled at the last step: nothing may be left either
            self.init.monitor.cancel()  # no exit event for a container never created
            self._oom.stop()
            await self._undo(self._undo_create(pid_file, mark), "undoCreate")
            raise
        self.ctx.publisher.publish(
            ev.TaskCreate(
                container_id=self.id,
                bundle=self.bundle,
                rootfs=self.rootfs,
                io=ev.TaskIO(
                    stdin=self.init.io.stdin,
                    stdout=self.init.io.stdout,
                    stderr=self.init.io.stderr,
                    terminal=self.init.io.terminal,
                ),
                pid=self.init.pid,
            )
        )

    async def _undo(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run an undo to its end even if the caller is cancelled (again): as a job of
        this container, awaited shielded."""
        if self.jobs.closed:
            await coro
            return
        job = self.jobs.spawn(coro, f"{name}:{self.id}")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(job)

    async def _undo_create(self, pid_file: str, mark: int) -> None:
        """Undo a failed or cancelled create: the runtime's container only if it exists
        now (it did not before: create() checked), waiting for its init to be gone,
        then stdio, the rootfs mounts and the files this Create wrote in the bundle."""
        self.init.io.close()
        if self.init.pidfd is None and not self.init.pid:
            with contextlib.suppress(errdefs.ShimError):
                self.init.claim(self.ctx.reaper, pid_file, mark)
        if self.runc.exists(self.id):
            with contextlib.suppress(errdefs.ShimError):
                await self.runc.delete(self.id, force=True)
        await self.init.wait_gone(self.ctx.reaper)
        self._files.unmount_rootfs()
        self._files.remove_records()

    # -- exits and OOM events ----------------------------------------------------------
    def _on_oom(self) -> None:
        self.ctx.publisher.publish(ev.TaskOOM(container_id=self.id))

    async def _monitor(self, p: Process) -> None:
        """Wait for ``p``'s exit from the reaper, then report it (the only exit path)."""
        with tracing.span("container::waitExit", root=True, tid=self.id, eid=p.exec_id):
            await self._watch_exit(p)

    async def _watch_exit(self, p: Process) -> None:
        ex = await self.ctx.reaper.watch(p.pid, since=p.mark)
        p.close_pidfd()  # reaped: the pid may be reused from now on
        tracing.set_attribute("exit-status", ex.status)
        try:
            if p is self.init and not self._own_pid_ns:
                # Without its own pid namespace nothing kills the rest: as runc's shim does.
                with contextlib.suppress(errdefs.ShimError):
                    await self.runc.kill(self.id, 9, all_=True)
        finally:  # whatever failed above, the exit is recorded and reported
            await self._report_exit(p, ex)

    async def _report_exit(self, p: Process, ex: Exit) -> None:
        """Record the exit, then publish it, but not while a Kill of the init still waits
        for the runtime: containerd's CRI deletes the task on its /tasks/exit, closing the
        connection on which that Kill's answer is due (StopContainer then fails with
        "ttrpc: closed"); runc's shim answers a Kill before the exit can be seen."""
        if await p.exited_with(ex.status, ex.at):
            (self.log.debug if p.exec_id else self.log.info)(
                "exited pid %d status %d", p.pid, ex.status, extra={"eid": p.exec_id}
            )
            if p is self.init and not self._no_kill_in_flight.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._no_kill_in_flight.wait(), KILL_ANSWER_WAIT)
            self.ctx.publisher.publish(
                ev.TaskExit(
                    container_id=self.id,
                    id=p.exec_id or self.id,
                    pid=p.pid,
                    exit_status=ex.status,
                    exited_at=timestamp(ex.at),
                )
            )

    @property
    def running(self) -> bool:
        """The init is started and still alive (read from its pidfd: an exit that is
        not reported yet counts, so its pid is never taken for this container's)."""
        return self.init.status is Status.RUNNING and self.init.alive

    def fail(self, why: BaseException) -> None:
        """A job of this container (or of its pod) failed unexpectedly: report every
        process exited (status 255) so nothing waits forever, and kill what runs."""
        self.log.error("container failed: %s: killing it", why)
        for p in [self.init, *self.execs.values()]:
            if not p.has_exited and p.failed_to_start():
                self.ctx.publisher.publish(ev.TaskExit(
                    container_id=self.id, id=p.exec_id or self.id, pid=p.pid,
                    exit_status=255, exited_at=timestamp(p.exit.at if p.exit else time.time()),
                ))  # fmt: skip
        if not self.jobs.closed:
            self.jobs.spawn(self._kill_all(), f"kill:{self.id}")

    async def _kill_all(self) -> None:
        with contextlib.suppress(errdefs.ShimError):
            await self.runc.kill(self.id, 9, all_=True)

    def _proc(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        p = self.execs.get(exec_id)
        if p is None:
            raise errdefs.NotFound(f"exec {exec_id} of task {self.id}: not found")
        return p

    async def start(self, exec_id: str) -> int:
        p = self._proc(exec_id)
        async with p.lock:
            p.machine.check(Verb.START)
            if p is self.init:
                try:
                    await _to_its_end(self.runc.start(self.id))
                except asyncio.CancelledError:  # runc is done: no stray process
                    await self._undo(self._undo_start(), "undoStart")
                    raise
                p.machine.fire(Verb.START)
                self.ctx.publisher.publish(ev.TaskStart(container_id=self.id, pid=p.pid))
            else:
                await self._start_exec(p)
        return p.pid

    async def _undo_start(self) -> None:
        """A cancelled Start: whether runc started the init or not, kill it and wait
        until it is reaped; its exit monitor reports the exit once Start has ended (it
        holds the process's lock)."""
        with contextlib.suppress(ProcessLookupError):
            self.init.signal(9)
        if not self._own_pid_ns:
            with contextlib.suppress(errdefs.ShimError):
                await self.runc.kill(self.id, 9, all_=True)
        await self.init.wait_gone(self.ctx.reaper)

    async def _undo_exec(self, p: Process, pid_file: str, mark: int) -> None:
        """An exec that failed or was cancelled after runc may have started it: kill
        the process its pid file names (removed before runc ran) and wait for it."""
        p.io.close()
        if p.pidfd is None and not p.pid:
            with contextlib.suppress(errdefs.ShimError):
                p.claim(self.ctx.reaper, pid_file, mark)
        with contextlib.suppress(ProcessLookupError):
            p.signal(9)
        await p.wait_gone(self.ctx.reaper)
        p.failed_to_start(137 if p.pid else 255)

    async def _start_exec(self, p: Process) -> None:
        if self.init.status is not Status.RUNNING:
            raise errdefs.FailedPrecondition(
                f"task {self.id}: cannot exec in a {self.init.status.name.lower()} task"
            )
        pid_file = os.path.join(self.bundle, files.exec_pid(p.exec_id))
        unlink(pid_file)  # an earlier exec of the same id left it: never read it
        mark = self.ctx.reaper.mark()
        await p.io.open()
        fd, spec_path = _new_file(self.bundle, f".{p.exec_id}-", ".json")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.execs_spec[p.exec_id])
            await _to_its_end(
                self.runc.exec(self.id, spec_path, pid_file, p.io.child_fds, p.io.console_socket)
            )
            await p.io.started()
            p.claim(self.ctx.reaper, pid_file, mark)
        except BaseException:
            await self._undo(self._undo_exec(p, pid_file, mark), "undoExec")
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(spec_path)
        p.machine.fire(Verb.START)
        p.monitor = self.jobs.spawn(self._monitor(p), f"waitExit:{self.id}:{p.exec_id}")
        self.ctx.publisher.publish(
            ev.TaskExecStarted(container_id=self.id, exec_id=p.exec_id, pid=p.pid)
        )

    def state(self, exec_id: str) -> ProcessState:
        return self._proc(exec_id).state()

    async def kill(self, exec_id: str, signal: int, all_: bool) -> None:
        if all_ and exec_id:
            raise errdefs.FailedPrecondition(
                f"task {self.id}: cannot signal all processes of an exec"
            )
        p = self._proc(exec_id)
        p.machine.check_kill()
        if p is self.init:
            self._kills_in_flight += 1
            self._no_kill_in_flight.clear()
            try:
                await self.runc.kill(self.id, signal, all_=all_)
            finally:
                self._kills_in_flight -= 1
                if not self._kills_in_flight:
                    self._no_kill_in_flight.set()
            return
        if not p.pid:
            raise errdefs.FailedPrecondition(f"{p.what}: not started")
        if p.has_exited:
            raise errdefs.NotFound(f"{p.what}: process already finished")
        try:
            p.signal(signal)  # through its pidfd: never a pid reused after the reap
        except ProcessLookupError:
            raise errdefs.NotFound(f"{p.what}: process already finished") from None

    async def exec(self, req: ExecRequest) -> None:
        if not valid_id(req.exec_id):
            raise errdefs.InvalidArgument(f"exec id {req.exec_id!r}: invalid identifier")
        if req.exec_id in self.execs:
            raise errdefs.AlreadyExists(f"exec {req.exec_id} of task {self.id}: already exists")
        if self.init.status is not Status.RUNNING:
            raise errdefs.FailedPrecondition(
                f"task {self.id}: cannot exec in a {self.init.status.name.lower()} task"
            )
        try:
            process = json.loads(req.spec.value)
        except ValueError as exc:
            raise errdefs.InvalidArgument(
                f"exec {req.exec_id}: invalid process spec: {exc}"
            ) from None
        if not isinstance(process, dict) or not process.get("args"):
            raise errdefs.InvalidArgument(f"exec {req.exec_id}: process spec has no args")
        process["terminal"] = req.terminal
        self.execs_spec[req.exec_id] = json.dumps(process).encode()
        self.execs[req.exec_id] = Process(
            self.id, req.exec_id, self.bundle, req.terminal, req.stdin, req.stdout, req.stderr
        )
        self.ctx.publisher.publish(ev.TaskExecAdded(container_id=self.id, exec_id=req.exec_id))

    async def delete(self, exec_id: str) -> tuple[int, ExitInfo]:
        p = self._proc(exec_id)
        p.check_delete()
        if p is not self.init:
            p.machine.fire(Verb.DELETE)
            p.release()
            del self.execs[exec_id]
            self.execs_spec.pop(exec_id, None)
            return p.pid, p.exit or ExitInfo(0, time.time())
        if p.status is Status.CREATED:
            # Never started: kill the waiting init and let the monitor record its exit.
            with contextlib.suppress(errdefs.ShimError):
                await self.runc.kill(self.id, 9)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await p.wait()
        try:
            await self.runc.delete(self.id)
        except errdefs.NotFound:
            pass
        except errdefs.ShimError:
            await self.runc.delete(self.id, force=True)
        p.machine.fire(Verb.DELETE)
        self._oom.stop()
        for e in self.execs.values():
            e.release()
        p.release()
        await self.jobs.aclose()
        self._files.unmount_rootfs()
        ex = p.exit or ExitInfo(137, time.time())
        self.ctx.publisher.publish(
            ev.TaskDelete(
                container_id=self.id, pid=p.pid, exit_status=ex.status, exited_at=timestamp(ex.at)
            )
        )
        return p.pid, ex

    async def wait(self, exec_id: str) -> ExitInfo:
        return await self._proc(exec_id).wait()

    async def pids(self) -> list[tuple[int, str]]:
        if self.init.has_exited:
            return []
        by_pid = {e.pid: eid for eid, e in self.execs.items() if e.pid}
        return [(pid, by_pid.get(pid, "")) for pid in await self.runc.ps(self.id)]

    async def pause(self) -> None:
        self.init.machine.check(Verb.PAUSE)
        await self.runc.pause(self.id)
        self.init.machine.fire(Verb.PAUSE)
        self.ctx.publisher.publish(ev.TaskPaused(container_id=self.id))

    async def resume(self) -> None:
        self.init.machine.check(Verb.RESUME)
        await self.runc.resume(self.id)
        self.init.machine.fire(Verb.RESUME)
        self.ctx.publisher.publish(ev.TaskResumed(container_id=self.id))

    async def update(self, resources: any_pb2.Any) -> None:
        if self.init.has_exited:
            raise errdefs.NotFound(f"task {self.id}: process already finished")
        try:
            value = json.loads(resources.value)
        except ValueError as exc:
            raise errdefs.InvalidArgument(f"task {self.id}: invalid resources: {exc}") from None
        if not isinstance(value, dict):
            raise errdefs.InvalidArgument(f"task {self.id}: resources must be a JSON object")
        await self.runc.update(self.id, value)

    def metrics(self) -> Metrics:
        """The cgroup metrics of the running init's cgroup(s) (v1 or v2, as the host).
        NotFound when there is no running process (never started, exited, gone)."""
        if not self.init.pid or self.init.has_exited or not self.init.alive:
            raise errdefs.NotFound(f"task {self.id}: no running process to measure")
        return metrics_for_pid(self.init.pid)

    async def stats(self) -> any_pb2.Any:
        return pack(self.metrics())

    def close_io(self, exec_id: str) -> None:
        self._proc(exec_id).close_io()

    def resize(self, exec_id: str, width: int, height: int) -> None:
        self._proc(exec_id).resize(width, height)


async def _to_its_end(call: Coroutine[Any, Any, T]) -> T:
    """Await a runtime command (create, start, exec) to its end. A cancelled caller gets
    its CancelledError only then: the first cancellation is passed on (the reaper lets
    the command finish, killing it after its grace), later ones are absorbed. A call is
    often cancelled twice (its ttrpc deadline, then the lost connection), and the second
    used to end the wait early: the undo then looked before runc had made the container,
    and runc made it after (tests/integration/test_cancelled_calls.py, ~1 run in 7)."""
    fut = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.cancel()
        await wait_through_cancels(fut)
        raise


async def create_container(
    ctx: ShimContext,
    tid: str,
    bundle: str,
    spec: Spec,
    rootfs: Sequence[mount_pb2.Mount],
    runtime: RuntimeConfig,
    stdio: tuple[bool, str, str, str],
) -> Container:
    """A created local OCI container whose driver the context's factory makes for
    ``runtime``: what a standalone Create and a local host's workload both are."""
    terminal, stdin, stdout, stderr = stdio
    c = Container(ctx, tid, bundle, spec, rootfs, ctx.oci(runtime, bundle),
                  terminal=terminal, stdin=stdin, stdout=stdout, stderr=stderr)  # fmt: skip
    await c.create()
    return c


def _new_file(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file of a unique name in ``directory`` (mode 0600), open for writing:
    ``tempfile.mkstemp`` without importing tempfile (and random, shutil, bz2, lzma)."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{os.urandom(6).hex()}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no unique name for {prefix}*{suffix} in {directory}")
