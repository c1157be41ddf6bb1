"""The do-nothing shim's daemon: ``containerd.task.v2.Task`` answered at once.

See the package docstring for what each call does. Tasks are keyed by (containerd
namespace, id), the namespace coming from each call's ``containerd-namespace-ttrpc``
metadata, so one node-scope daemon serves every namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from podshim import errors as errdefs
from podshim.api.events import task_pb2 as ev
from podshim.api.services.ttrpc.events.v1 import events_pb2
from podshim.api.task.v2 import shim_pb2
from podshim.api.types import task_pb2 as types
from podshim.shim.spawn import LISTEN_FD
from podshim.ttrpc.client import Client
from podshim.ttrpc.server import Server
from podshim.ttrpc.services import CallContext, bind

NAMESPACE_KEY = "containerd-namespace-ttrpc"
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
#: how long a FIFO's write end may wait for containerd's reader
STDIO_TIMEOUT = 10.0
GO_ZERO_TIME = -62135596800
TOPICS: dict[type[Message], str] = {
    ev.TaskCreate: "/tasks/create",
    ev.TaskStart: "/tasks/start",
    ev.TaskDelete: "/tasks/delete",
    ev.TaskExit: "/tasks/exit",
    ev.TaskExecAdded: "/tasks/exec-added",
    ev.TaskExecStarted: "/tasks/exec-started",
}


def _ts(ns: int | None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if ns is None:
        ts.seconds = GO_ZERO_TIME
    else:
        ts.FromNanoseconds(ns)
    return ts


class Events:
    """``Events/Forward`` to containerd, one event at a time, in order (best effort:
    an event containerd refuses, or cannot take within the call timeout, is dropped)."""

    def __init__(self, address: str) -> None:
        self.client = Client(address, timeout=5.0) if address else None
        self.queue: asyncio.Queue[events_pb2.Envelope] = asyncio.Queue()
        self.sender = asyncio.get_running_loop().create_task(self._send())

    def publish(self, namespace: str, event: Message) -> None:
        self.queue.put_nowait(
            events_pb2.Envelope(
                timestamp=_ts(time.time_ns()),
                namespace=namespace,
                topic=TOPICS[type(event)],
                event=any_pb2.Any(
                    type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString()
                ),
            )
        )

    async def _send(self) -> None:
        while True:
            env = await self.queue.get()
            try:
                await self._forward(env)
            finally:
                self.queue.task_done()

    async def _forward(self, env: events_pb2.Envelope) -> None:
        if self.client is not None:
            req = events_pb2.ForwardRequest(envelope=env)
            for _ in range(3):
                try:
                    await self.client.call(
                        EVENTS_SERVICE,
                        "Forward",
                        req,
                        empty_pb2.Empty,
                        metadata=((NAMESPACE_KEY, env.namespace),),
                    )
                    break
                except (errdefs.Unavailable, errdefs.DeadlineExceeded, OSError):
                    await self.client.close()
                except errdefs.ShimError:
                    break

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), 5.0)
        self.sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sender
        if self.client is not None:
            await self.client.close()


async def open_writer(path: str) -> int | None:
    """The write end of a FIFO, opened as a real shim opens it: blocking until
    containerd's reader is there (in a thread). If no reader comes, we open one
    ourselves to release the thread, and give up."""
    if not path:
        return None
    loop = asyncio.get_running_loop()
    opening = loop.run_in_executor(None, os.open, path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        return await asyncio.wait_for(asyncio.shield(opening), STDIO_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        with contextlib.suppress(OSError):
            os.close(await opening)
        return None
    except OSError:
        return None


@dataclass
class Proc:
    """A task's init or an exec: nothing runs, only the states."""

    exec_id: str
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    status: types.Status = types.CREATED
    exit_status: int = 0
    exited_at: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    fds: list[int] = field(default_factory=list)

    async def open_stdio(self) -> None:
        got = await asyncio.gather(open_writer(self.stdout), open_writer(self.stderr))
        self.fds = [fd for fd in got if fd is not None]

    def exit(self, status: int) -> bool:
        if self.exited.is_set():
            return False
        self.status, self.exit_status, self.exited_at = types.STOPPED, status, time.time_ns()
        for fd in self.fds:  # EOF for containerd's readers
            os.close(fd)
        self.fds = []
        self.exited.set()
        return True


@dataclass
class Task:
    namespace: str
    id: str
    bundle: str
    init: Proc
    execs: dict[str, Proc] = field(default_factory=dict)


class NullTask:
    """Every ``containerd.task.v2.Task`` method; nothing runs."""

    def __init__(self, scope: str, events: Events, done: asyncio.Event) -> None:
        self.scope = scope
        self.events = events
        self.done = done
        self.pid = os.getpid()
        self.tasks: dict[tuple[str, str], Task] = {}

    def _task(self, ctx: CallContext, task_id: str) -> Task:
        task = self.tasks.get((ctx.get(NAMESPACE_KEY) or "", task_id))
        if task is None:
            raise errdefs.NotFound(f"task {task_id}: not found")
        return task

    def _proc(self, ctx: CallContext, task_id: str, exec_id: str) -> tuple[Task, Proc]:
        task = self._task(ctx, task_id)
        proc = task.execs.get(exec_id) if exec_id else task.init
        if proc is None:
            raise errdefs.NotFound(f"exec {exec_id} of task {task_id}: not found")
        return task, proc

    def _exit(self, task: Task, proc: Proc, status: int) -> None:
        if proc.exit(status):
            self.events.publish(
                task.namespace,
                ev.TaskExit(
                    container_id=task.id,
                    id=proc.exec_id or task.id,
                    pid=self.pid,
                    exit_status=status,
                    exited_at=_ts(proc.exited_at),
                ),
            )

    async def Create(
        self, req: shim_pb2.CreateTaskRequest, ctx: CallContext
    ) -> shim_pb2.CreateTaskResponse:
        ns = ctx.get(NAMESPACE_KEY) or ""
        if (ns, req.id) in self.tasks:
            raise errdefs.AlreadyExists(f"task {req.id}: already exists")
        init = Proc("", req.stdin, req.stdout, req.stderr, req.terminal)
        self.tasks[(ns, req.id)] = task = Task(ns, req.id, req.bundle, init)
        await init.open_stdio()
        io = ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal)
        self.events.publish(
            ns,
            ev.TaskCreate(
                container_id=task.id, bundle=req.bundle, rootfs=req.rootfs, io=io, pid=self.pid
            ),
        )
        return shim_pb2.CreateTaskResponse(pid=self.pid)

    async def Start(self, req: shim_pb2.StartRequest, ctx: CallContext) -> shim_pb2.StartResponse:
        task, proc = self._proc(ctx, req.id, req.exec_id)
        if proc.status != types.CREATED:
            raise errdefs.FailedPrecondition(f"{req.id}/{req.exec_id}: not in created state")
        proc.status = types.RUNNING
        if not req.exec_id:
            self.events.publish(task.namespace, ev.TaskStart(container_id=task.id, pid=self.pid))
            return shim_pb2.StartResponse(pid=self.pid)
        self.events.publish(
            task.namespace,
            ev.TaskExecStarted(container_id=task.id, exec_id=req.exec_id, pid=self.pid),
        )
        await proc.open_stdio()  # containerd's readers get EOF at once: no output
        self._exit(task, proc, 0)
        return shim_pb2.StartResponse(pid=self.pid)

    async def Exec(self, req: shim_pb2.ExecProcessRequest, ctx: CallContext) -> empty_pb2.Empty:
        task = self._task(ctx, req.id)
        if req.exec_id in task.execs:
            raise errdefs.AlreadyExists(f"exec {req.exec_id}: already exists")
        if task.init.status != types.RUNNING:
            raise errdefs.FailedPrecondition(f"task {req.id}: not running")
        task.execs[req.exec_id] = Proc(req.exec_id, req.stdin, req.stdout, req.stderr, req.terminal)
        self.events.publish(
            task.namespace, ev.TaskExecAdded(container_id=task.id, exec_id=req.exec_id)
        )
        return empty_pb2.Empty()

    async def Kill(self, req: shim_pb2.KillRequest, ctx: CallContext) -> empty_pb2.Empty:
        task, proc = self._proc(ctx, req.id, req.exec_id)
        if proc.exited.is_set():
            raise errdefs.NotFound(f"{req.id}/{req.exec_id}: process already finished")
        if req.signal:
            if req.all and not req.exec_id:
                for other in task.execs.values():
                    self._exit(task, other, 128 + req.signal)
            self._exit(task, proc, 128 + req.signal)
        return empty_pb2.Empty()

    async def Wait(self, req: shim_pb2.WaitRequest, ctx: CallContext) -> shim_pb2.WaitResponse:
        _, proc = self._proc(ctx, req.id, req.exec_id)
        await proc.exited.wait()
        return shim_pb2.WaitResponse(exit_status=proc.exit_status, exited_at=_ts(proc.exited_at))

    async def State(self, req: shim_pb2.StateRequest, ctx: CallContext) -> shim_pb2.StateResponse:
        task, proc = self._proc(ctx, req.id, req.exec_id)
        return shim_pb2.StateResponse(
            id=req.id,
            bundle=task.bundle,
            pid=self.pid,
            status=proc.status,
            stdin=proc.stdin,
            stdout=proc.stdout,
            stderr=proc.stderr,
            terminal=proc.terminal,
            exit_status=proc.exit_status,
            exited_at=_ts(proc.exited_at),
            exec_id=req.exec_id,
        )

    async def Delete(
        self, req: shim_pb2.DeleteRequest, ctx: CallContext
    ) -> shim_pb2.DeleteResponse:
        task, proc = self._proc(ctx, req.id, req.exec_id)
        if proc.status == types.RUNNING:
            raise errdefs.FailedPrecondition(f"{req.id}/{req.exec_id}: process is running")
        self._exit(task, proc, proc.exit_status)  # a created, never started task
        if req.exec_id:
            del task.execs[req.exec_id]
        else:
            del self.tasks[(task.namespace, task.id)]
            for other in task.execs.values():
                other.exit(137)
            self.events.publish(
                task.namespace,
                ev.TaskDelete(
                    container_id=task.id,
                    pid=self.pid,
                    exit_status=proc.exit_status,
                    exited_at=_ts(proc.exited_at),
                    id=task.id,
                ),
            )
        return shim_pb2.DeleteResponse(
            pid=self.pid, exit_status=proc.exit_status, exited_at=_ts(proc.exited_at)
        )

    async def Pids(self, req: shim_pb2.PidsRequest, ctx: CallContext) -> shim_pb2.PidsResponse:
        task = self._task(ctx, req.id)
        running = task.init.status == types.RUNNING
        return shim_pb2.PidsResponse(processes=[types.ProcessInfo(pid=self.pid)] if running else [])

    async def Connect(
        self, req: shim_pb2.ConnectRequest, ctx: CallContext
    ) -> shim_pb2.ConnectResponse:
        task = self.tasks.get((ctx.get(NAMESPACE_KEY) or "", req.id))
        return shim_pb2.ConnectResponse(
            shim_pid=self.pid, task_pid=self.pid if task else 0, version="nullshim"
        )

    async def Shutdown(self, req: shim_pb2.ShutdownRequest, ctx: CallContext) -> empty_pb2.Empty:
        if self.scope == "pod" and not self.tasks:
            asyncio.get_running_loop().call_soon(self.done.set)  # after this answer
        return empty_pb2.Empty()

    async def Stats(self, req: shim_pb2.StatsRequest, ctx: CallContext) -> shim_pb2.StatsResponse:
        self._task(ctx, req.id)
        return shim_pb2.StatsResponse()

    async def _nothing(self, task_id: str, ctx: CallContext) -> empty_pb2.Empty:
        self._task(ctx, task_id)
        return empty_pb2.Empty()

    async def Pause(self, req: shim_pb2.PauseRequest, ctx: CallContext) -> empty_pb2.Empty:
        return await self._nothing(req.id, ctx)

    async def Resume(self, req: shim_pb2.ResumeRequest, ctx: CallContext) -> empty_pb2.Empty:
        return await self._nothing(req.id, ctx)

    async def Checkpoint(
        self, req: shim_pb2.CheckpointTaskRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        return await self._nothing(req.id, ctx)

    async def ResizePty(self, req: shim_pb2.ResizePtyRequest, ctx: CallContext) -> empty_pb2.Empty:
        return await self._nothing(req.id, ctx)

    async def CloseIO(self, req: shim_pb2.CloseIORequest, ctx: CallContext) -> empty_pb2.Empty:
        return await self._nothing(req.id, ctx)

    async def Update(self, req: shim_pb2.UpdateTaskRequest, ctx: CallContext) -> empty_pb2.Empty:
        return await self._nothing(req.id, ctx)


def _watch_containerd(pid: int, done: asyncio.Event) -> None:
    """A node daemon leaves with the containerd that started it (its pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    asyncio.get_running_loop().add_reader(fd, done.set)


async def _serve(scope: str, flags: dict[str, str]) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    events = Events(os.environ.get("TTRPC_ADDRESS", ""))
    service = NullTask(scope, events, done)
    server = Server([bind(shim_pb2.DESCRIPTOR.services_by_name["Task"], service)])
    await server.serve(socket.socket(fileno=LISTEN_FD))
    if scope == "node" and flags.get("containerd-pid", "").isdigit():
        _watch_containerd(int(flags["containerd-pid"]), done)
    await done.wait()
    with contextlib.suppress(OSError):
        os.unlink(flags.get("socket", ""))
    await server.shutdown(1.0)
    await events.close()


def serve(scope: str, flags: dict[str, str]) -> int:
    asyncio.run(_serve(scope, flags))
    return 0
