"""A container of a utility-VM pod: runc in the guest, driven through the agent.

Implements the :class:`~podshim.host.contract.Workload` contract (and so the Task
contract) like :class:`~podshim.task.container.Container`, with the same state tables
(:mod:`podshim.task.states`), events and cancellation rules; what differs is where
things run:

* the container's directory is ``<share>/<cid>/`` (:mod:`.guestfs`): rootfs and bind
  sources mounted there on the host, the guest spec (:mod:`.guestspec`) as its
  ``config.json``; the guest sees it at ``<guest share>/<cid>`` (9p);
* ``runc create`` runs in the guest under the agent key ``<cid>/create`` with stdio
  pipes the agent holds; runc hands them to the container's init, so that key's streams
  are the init's stdio (bridged to containerd's FIFOs by :mod:`.guestio`). The init's
  pid is read from the pid file in the share, its exit comes from ``wait_pid``;
* an exec is ``runc exec --detach --pid-file`` under ``<cid>/exec/<id>``, as runc.v2
  runs it: the process's stdio are that key's, its exit comes from ``wait_pid`` like the
  init's, its signals go to its pid through the agent (runc without ``--detach`` would
  stay in between and take them itself);
* the other verbs are runc commands (:mod:`.guestrunc`); stats and OOM events come
  from the guest's cgroup v2 files (:mod:`.guestcg`).

Cancellation (a ttrpc deadline) as for Container: runc commands are let finish first,
then a cancelled Create removes the runc container, its init, the mounts and the
directory; a cancelled Start or Exec kills the process it started. Undo runs as a job
of the container, so a second cancellation cannot cut it short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.api.cgroups.v2 import metrics_pb2 as v2pb
from podshim.api.events import task_pb2 as ev
from podshim.cgroups.stats import pack
from podshim.host.contract import WorkloadRequest
from podshim.host.uvm import guestspec
from podshim.host.uvm.agentapi import CONSOLE_SOCKET_ARG, GUEST_SHARE, AgentApi, SpawnSpec
from podshim.host.uvm.guestcg import GuestOomWatch, read_metrics
from podshim.host.uvm.guestfs import GuestDir
from podshim.host.uvm.guestio import GuestIO
from podshim.host.uvm.guestproc import GuestProcess
from podshim.host.uvm.guestrunc import GuestRunc
from podshim.logs import TaskLogger
from podshim.oci import runc as runc_args
from podshim.oci.ids import SANDBOX_ID_ANNOTATION, valid_id
from podshim.oci.runtime import RuntimeConfig
from podshim.oci.spec import Spec
from podshim.task.container import KILL_ANSWER_WAIT
from podshim.task.contract import ExecRequest, ExitInfo, ProcessState, ShimContext, timestamp
from podshim.task.process import KILL_TIMEOUT, read_pid, unlink
from podshim.task.states import Status, Verb

#: where runc keeps its state in the guest
RUNC_ROOT = "/run/runc"

log = logging.getLogger("podshim.uvm.workload")


@dataclass(frozen=True, slots=True)
class GuestLayout:
    """Guest paths the workload composes (tests running the agent on the host change
    them so nothing touches the host's own runc root or cgroups)."""

    runc_root: str = RUNC_ROOT
    #: the guest's cgroup2 mount
    cgroup_root: str = "/sys/fs/cgroup"
    #: the parent of every container's cgroup (cgroupsPath = <parent>/<cid>)
    cgroup_parent: str = "/podshim"


class GuestContainer:
    """A runc container in the VM with its init and execs (see the module docstring)."""

    def __init__(
        self, ctx: ShimContext, req: WorkloadRequest, agent: AgentApi, *, share_dir: str,
        guest_share: str, runc: str, layout: GuestLayout,
    ) -> None:  # fmt: skip
        self.ctx, self.req, self.agent, self.layout = ctx, req, agent, layout
        self.id, self.bundle, self.spec = req.id, req.bundle, req.spec
        self.dir = GuestDir(share_dir, req.id)
        self.guest_dir = guestspec.guest_dir(guest_share, req.id)
        self.runc = GuestRunc(agent, runc, layout.runc_root, self.dir.path, self.guest_dir,
                              req.id)  # fmt: skip
        io = GuestIO(agent, f"{req.id}/create", req.stdin, req.stdout, req.stderr,
                     req.terminal)  # fmt: skip
        self.init = GuestProcess(req.id, "", req.bundle, io)
        self.execs: dict[str, GuestProcess] = {}
        self.execs_spec: dict[str, bytes] = {}
        self._kills_in_flight = 0
        self._no_kill_in_flight = asyncio.Event()
        self._no_kill_in_flight.set()
        self._own_pid_ns = True
        ann = req.spec.get("annotations")
        pod_id = str(ann.get(SANDBOX_ID_ANNOTATION, "")) if isinstance(ann, dict) else ""
        self.log = TaskLogger(log, pod_id=pod_id, tid=req.id)
        self.jobs = ctx.jobs.child(f"task {req.id}")
        #: not a host directory: the container's cgroup is the guest's
        self.memory_cgroup = ""
        self.cgroup = f"{layout.cgroup_root}{layout.cgroup_parent}/{req.id}"
        self._oom = GuestOomWatch(agent, self.cgroup, self.jobs, self.log, self._on_oom)
        self._metrics: v2pb.Metrics | None = None
        self._n = 0
        #: runc create was (or may have been) spawned: an undo must ask runc
        self._runc_ran = False

    @property
    def pid(self) -> int:
        return self.init.pid

    # -- create -------------------------------------------------------------------------
    async def create(self, sandbox_spec: Spec) -> None:
        """Rewrite the spec, make the share directory, ``runc create`` in the guest;
        publishes /tasks/create. On failure everything done so far is undone."""
        wants_tty = (self.spec.get("process") or {}).get("terminal") is True
        if wants_tty != self.req.terminal:
            raise errdefs.InvalidArgument(
                f"task {self.id}: the request's terminal={self.req.terminal} does not "
                f"match the spec's process.terminal={wants_tty}"
            )
        g = guestspec.rewrite(
            self.spec, cid=self.id, guest_share=os.path.dirname(self.guest_dir),
            sandbox_pid=self.req.sandbox_pid, pod_pids=self.req.pod_pids,
            shm=guestspec.shm_sources(sandbox_spec), cgroup_parent=self.layout.cgroup_parent,
        )  # fmt: skip
        self._own_pid_ns = any(
            ns.get("type") == "pid" and not ns.get("path") for ns in g.spec["linux"]["namespaces"]
        )
        self.dir.make()  # AlreadyExists touches nothing
        pid_file = os.path.join(self.dir.path, "init.pid")
        try:
            self.dir.mount_rootfs(self.req.rootfs, self.bundle)
            for plan in g.binds:
                self.dir.bind(plan)
            self.dir.write("config.json", json.dumps(g.spec).encode())
            self.init.io.open()
            self._runc_ran = True
            await self._spawn_runc(self.init, self._create_args(), "create")
            self.init.pid = read_pid(pid_file)
            self.init.io.start(self.jobs)
            self.init.monitor = self.jobs.spawn(self._monitor(self.init), f"waitExit:{self.id}")
            await self._oom.start()
        except BaseException:
            if self.init.monitor is not None:
                self.init.monitor.cancel()  # no exit event for a container never created
            self._oom.stop()
            await self._undo(self._undo_create(pid_file), "undoCreate")
            raise
        self.ctx.publisher.publish(
            ev.TaskCreate(
                container_id=self.id, bundle=self.bundle, rootfs=list(self.req.rootfs),
                io=ev.TaskIO(stdin=self.req.stdin, stdout=self.req.stdout,
                             stderr=self.req.stderr, terminal=self.req.terminal),
                pid=self.init.pid,
            )
        )  # fmt: skip

    def _create_args(self) -> list[str]:
        console = CONSOLE_SOCKET_ARG if self.req.terminal else None
        return runc_args.create_args(RuntimeConfig(), self.id, self.guest_dir,
                                     f"{self.guest_dir}/init.pid", console)  # fmt: skip

    async def _spawn_runc(self, p: GuestProcess, args: list[str], what: str) -> None:
        """``runc <args>`` under ``p``'s key with ``p``'s stdio, to its end (the key
        stays: its streams are ``p``'s now); its error kind if it failed."""
        stdin, stdout, stderr = p.io.wants
        tty = p.io.terminal
        spec = SpawnSpec(p.key, self.runc.argv(args), stdin=stdin, stdout=stdout,
                         stderr=stderr, console_socket=tty)  # fmt: skip
        offset = self.runc.log_size()
        out = await self.runc.finish(spec, release=False)
        if out.status != 0:
            raise self.runc.error([what], out.status, b"", offset)

    async def _undo(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run an undo to its end even if the caller is cancelled (again)."""
        if self.jobs.closed:
            await coro
            return
        job = self.jobs.spawn(coro, f"{name}:{self.id}")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(job)

    async def _undo_create(self, pid_file: str) -> None:
        """Undo a failed or cancelled create: the runc container and its init (if they
        exist), the key, the mounts and the directory."""
        self.init.io.close()
        if self._runc_ran:
            if not self.init.pid and os.path.exists(pid_file):
                with contextlib.suppress(errdefs.ShimError):
                    self.init.pid = read_pid(pid_file)
            with contextlib.suppress(errdefs.ShimError):
                await self.runc.run(runc_args.delete_args(self.id, force=True))
            await self._wait_gone(self.init)
            with contextlib.suppress(errdefs.ShimError):
                await self.agent.release(self.init.key)
        self._remove_dir()

    def _remove_dir(self) -> None:
        left = self.dir.remove()
        if left:
            self.log.warning("left in the pod's share: %s", ", ".join(left))

    async def _wait_gone(self, p: GuestProcess) -> None:
        """Wait (bounded) until a killed process's exit is reaped in the guest."""
        if not p.pid or p.has_exited:
            return
        with contextlib.suppress(errdefs.ShimError, TimeoutError):
            async with asyncio.timeout(KILL_TIMEOUT):
                await self.agent.wait_pid(p.pid)

    # -- exits and OOM --------------------------------------------------------------------
    def _on_oom(self) -> None:
        self.ctx.publisher.publish(ev.TaskOOM(container_id=self.id))

    async def _monitor(self, p: GuestProcess) -> None:
        """Wait for ``p``'s exit in the guest, then report it (the only exit path but
        :meth:`fail`). The channel gone (the VM died) is an exit with 255, as in fail."""
        try:
            status = await self.agent.wait_pid(p.pid)
        except errdefs.Unavailable as exc:
            self.log.warning("%s: %s: reported exited (255)", p.what, exc)
            await self._report_exit(p, 255, time.time())
            return
        at = time.time()
        try:
            if p is self.init and not self._own_pid_ns:
                with contextlib.suppress(errdefs.ShimError):
                    await self.runc.run(runc_args.kill_args(self.id, 9, True))
        finally:
            await self._report_exit(p, status, at)

    async def _report_exit(self, p: GuestProcess, status: int, at: float) -> None:
        if await p.exited_with(status, at):
            (self.log.debug if p.exec_id else self.log.info)(
                "exited pid %d status %d", p.pid, status, extra={"eid": p.exec_id}
            )
            if p is self.init and not self._no_kill_in_flight.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._no_kill_in_flight.wait(), KILL_ANSWER_WAIT)
            self.ctx.publisher.publish(
                ev.TaskExit(container_id=self.id, id=p.exec_id or self.id, pid=p.pid,
                            exit_status=p.exit.status if p.exit else status,
                            exited_at=timestamp(at))
            )  # fmt: skip

    @property
    def running(self) -> bool:
        return self.init.status is Status.RUNNING and not self.init.has_exited

    def fail(self, why: BaseException) -> None:
        """The pod failed: report every process exited (255), kill what runs."""
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
            await self.runc.run(runc_args.kill_args(self.id, 9, True))

    def _proc(self, exec_id: str) -> GuestProcess:
        if not exec_id:
            return self.init
        p = self.execs.get(exec_id)
        if p is None:
            raise errdefs.NotFound(f"exec {exec_id} of task {self.id}: not found")
        return p

    # -- start and exec -------------------------------------------------------------------
    async def start(self, exec_id: str) -> int:
        p = self._proc(exec_id)
        async with p.lock:
            p.machine.check(Verb.START)
            if p is self.init:
                try:
                    await self.runc.run(["start", self.id])
                except asyncio.CancelledError:  # runc is done: no stray process
                    await self._undo(self._undo_start(), "undoStart")
                    raise
                p.machine.fire(Verb.START)
                self.ctx.publisher.publish(ev.TaskStart(container_id=self.id, pid=p.pid))
            else:
                await self._start_exec(p)
        return p.pid

    async def _undo_start(self) -> None:
        with contextlib.suppress(errdefs.ShimError):
            await self.agent.signal(9, pid=self.init.pid)
        if not self._own_pid_ns:
            with contextlib.suppress(errdefs.ShimError):
                await self.runc.run(runc_args.kill_args(self.id, 9, True))
        await self._wait_gone(self.init)

    def _exec_file(self, exec_id: str, suffix: str) -> tuple[str, str]:
        """(host path, guest path) of an exec's file in the share."""
        name = f"exec-{exec_id}.{suffix}"
        return os.path.join(self.dir.path, name), f"{self.guest_dir}/{name}"

    async def _start_exec(self, p: GuestProcess) -> None:
        if self.init.status is not Status.RUNNING:
            raise errdefs.FailedPrecondition(
                f"task {self.id}: cannot exec in a {self.init.status.name.lower()} task"
            )
        pid_file, guest_pid = self._exec_file(p.exec_id, "pid")
        spec_file, guest_spec = self._exec_file(p.exec_id, "json")
        unlink(pid_file)  # an earlier exec of the same id left it: never read it
        p.io.open()
        try:
            self.dir.write(os.path.basename(spec_file), self.execs_spec[p.exec_id])
            console = CONSOLE_SOCKET_ARG if p.io.terminal else None
            args = runc_args.exec_args(self.id, guest_spec, guest_pid, console)
            await self._spawn_runc(p, args, "exec")
            p.pid = read_pid(pid_file)
            p.io.start(self.jobs)
        except BaseException:
            await self._undo(self._undo_exec(p, pid_file), "undoExec")
            raise
        finally:
            unlink(spec_file)
        p.machine.fire(Verb.START)
        p.monitor = self.jobs.spawn(self._monitor(p), f"waitExit:{self.id}:{p.exec_id}")
        self.ctx.publisher.publish(
            ev.TaskExecStarted(container_id=self.id, exec_id=p.exec_id, pid=p.pid)
        )

    async def _undo_exec(self, p: GuestProcess, pid_file: str) -> None:
        """An exec that failed or was cancelled after runc may have started it: kill
        the process its pid file names and wait for it."""
        p.io.close()
        if not p.pid and os.path.exists(pid_file):
            with contextlib.suppress(errdefs.ShimError):
                p.pid = read_pid(pid_file)
        if p.pid:
            with contextlib.suppress(errdefs.ShimError):
                await self.agent.signal(9, pid=p.pid)
            await self._wait_gone(p)
        with contextlib.suppress(errdefs.ShimError):
            await self.agent.release(p.key)
        unlink(pid_file)
        p.failed_to_start(137 if p.pid else 255)

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
                await self.runc.run(runc_args.kill_args(self.id, signal, all_))
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
            await self.agent.signal(signal, pid=p.pid)
        except errdefs.NotFound:
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
        process.pop("apparmorProfile", None)  # as in the container's spec
        self.execs_spec[req.exec_id] = json.dumps(process).encode()
        io = GuestIO(self.agent, f"{self.id}/exec/{req.exec_id}", req.stdin, req.stdout,
                     req.stderr, req.terminal)  # fmt: skip
        self.execs[req.exec_id] = GuestProcess(self.id, req.exec_id, self.bundle, io)
        self.ctx.publisher.publish(ev.TaskExecAdded(container_id=self.id, exec_id=req.exec_id))

    # -- delete ---------------------------------------------------------------------------
    async def delete(self, exec_id: str) -> tuple[int, ExitInfo]:
        p = self._proc(exec_id)
        p.machine.check(Verb.DELETE)
        if p is not self.init:
            p.machine.fire(Verb.DELETE)
            await self._release(p)
            del self.execs[exec_id]
            self.execs_spec.pop(exec_id, None)
            unlink(self._exec_file(exec_id, "pid")[0])
            return p.pid, p.exit or ExitInfo(0, time.time())
        if p.status is Status.CREATED:
            # Never started: kill the waiting init and let the monitor record its exit.
            with contextlib.suppress(errdefs.ShimError):
                await self.runc.run(runc_args.kill_args(self.id, 9, False))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_TIMEOUT):
                    await p.wait()
        try:
            await self.runc.run(runc_args.delete_args(self.id, False))
        except (errdefs.NotFound, errdefs.Unavailable):
            pass  # Unavailable: the VM is gone, and the container with it
        except errdefs.ShimError:
            await self.runc.run(runc_args.delete_args(self.id, True))
        p.machine.fire(Verb.DELETE)
        self._oom.stop()
        for e in self.execs.values():
            await self._release(e)
        await self._release(p)
        await self.jobs.aclose()
        self._remove_dir()
        ex = p.exit or ExitInfo(137, time.time())
        self.ctx.publisher.publish(
            ev.TaskDelete(container_id=self.id, pid=p.pid, exit_status=ex.status,
                          exited_at=timestamp(ex.at))
        )  # fmt: skip
        return p.pid, ex

    async def _release(self, p: GuestProcess) -> None:
        p.release()
        with contextlib.suppress(errdefs.ShimError):
            await self.agent.release(p.key)

    async def wait(self, exec_id: str) -> ExitInfo:
        return await self._proc(exec_id).wait()

    # -- the rest -------------------------------------------------------------------------
    async def pids(self) -> list[tuple[int, str]]:
        if self.init.has_exited:
            return []
        out = await self.runc.run(["ps", "--format", "json", self.id])
        try:
            found = json.loads(out or b"[]") or []
        except ValueError as exc:
            raise errdefs.Unknown(f"runc ps: {exc}") from None
        by_pid = {e.pid: eid for eid, e in self.execs.items() if e.pid}
        return [(int(pid), by_pid.get(int(pid), "")) for pid in found]

    async def pause(self) -> None:
        self.init.machine.check(Verb.PAUSE)
        await self.runc.run(["pause", self.id])
        self.init.machine.fire(Verb.PAUSE)
        self.ctx.publisher.publish(ev.TaskPaused(container_id=self.id))

    async def resume(self) -> None:
        self.init.machine.check(Verb.RESUME)
        await self.runc.run(["resume", self.id])
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
        guestspec.drop_swap(value)
        self._n += 1
        name = f"update-{self._n}.json"
        path = self.dir.write(name, json.dumps(value).encode())
        try:
            await self.runc.run(["update", "--resources", f"{self.guest_dir}/{name}", self.id])
        finally:
            unlink(path)

    def metrics(self) -> v2pb.Metrics:
        """The metrics the last :meth:`stats` read from the guest (this call cannot
        reach the agent); NotFound without a running process or before any."""
        if not self.running or self._metrics is None:
            raise errdefs.NotFound(f"task {self.id}: no running process to measure")
        return self._metrics

    async def stats(self) -> any_pb2.Any:
        if not self.init.pid or self.init.has_exited:
            raise errdefs.NotFound(f"task {self.id}: no running process to measure")
        self._metrics = await read_metrics(self.agent, self.cgroup)
        return pack(self._metrics)

    def close_io(self, exec_id: str) -> None:
        self._proc(exec_id).io.close_stdin()

    def resize(self, exec_id: str, width: int, height: int) -> None:
        """Resize the pty (asynchronously, in the guest). FailedPrecondition without
        one; ignored while the process is not running, as Process.resize does."""
        p = self._proc(exec_id)
        if not p.io.terminal:
            raise errdefs.FailedPrecondition(f"{p.what}: not a tty")
        if p.status is not Status.RUNNING or self.jobs.closed:
            return
        self.jobs.spawn(self._resize(p.key, width, height), f"resize:{p.key}")

    async def _resize(self, key: str, width: int, height: int) -> None:
        with contextlib.suppress(errdefs.ShimError):
            await self.agent.resize(key, width, height)


async def create_guest_container(
    ctx: ShimContext,
    req: WorkloadRequest,
    agent: AgentApi,
    *,
    share_dir: str,
    guest_share: str = GUEST_SHARE,
    sandbox_spec: Spec,
    runc: str = "runc",
    layout: GuestLayout = GuestLayout(),
) -> GuestContainer:
    """Make and create (not start) the workload ``req`` in the VM whose agent is
    ``agent``; /tasks/create is published when it returns. ``share_dir`` is the host
    path of the pod's share, seen at ``guest_share`` in the guest."""
    c = GuestContainer(ctx, req, agent, share_dir=share_dir, guest_share=guest_share,
                       runc=runc, layout=layout)  # fmt: skip
    await c.create(sandbox_spec)
    return c
