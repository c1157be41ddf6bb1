"""Test doubles that honour the same contracts as the real objects."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import Message

from podshim import errors as errdefs
from podshim.host.contract import Workload, WorkloadRequest
from podshim.host.control import ExecControl
from podshim.host.local import LocalWorkloads, MakeWorkload
from podshim.task.contract import ShimContext
from podshim.task.events import topic_for
from podshim.task.states import Verb


class FakeHost:
    """A pod host in memory: optional own namespaces, an init that tests can kill."""

    kind = "fake"

    def __init__(
        self,
        types: tuple[str, ...] = ("network", "ipc", "uts", "pid"),
        make: MakeWorkload | None = None,
    ) -> None:
        self.types = types
        #: what create_workload makes: fake containers unless told otherwise
        sandbox = {"linux": {"namespaces": [{"type": t} for t in (*types, "mount")]}}
        self.workloads = LocalWorkloads(self, sandbox, make or make_fake_workload)
        self.controls: list[ExecControl] = []
        self.created = False
        self.closes = 0
        self._died: asyncio.Future[int] | None = None
        self._closed = asyncio.Event()
        self._init_pid = 0

    async def create(self) -> None:
        self.created = True
        self._died = asyncio.get_running_loop().create_future()

    async def namespace_path(self, ns_type: str) -> str | None:
        if ns_type not in self.types:
            return None
        if ns_type == "pid" and not self._init_pid:
            self._init_pid = 4321
        return f"/run/fake/{ns_type}"

    @property
    def init_pid(self) -> int:
        return self._init_pid

    def die(self, status: int) -> None:
        assert self._died is not None
        self._died.set_result(status)

    async def wait(self) -> int:
        died = self._died
        assert died is not None
        closed: asyncio.Future[bool] = asyncio.ensure_future(self._closed.wait())
        waits: list[asyncio.Future[Any]] = [died, closed]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        return died.result() if died.done() else 0

    async def close(self) -> None:
        self.closes += 1
        self._closed.set()

    async def create_workload(self, ctx: ShimContext, req: WorkloadRequest) -> Workload:
        return await self.workloads.create(ctx, req)

    async def exec_in_host(
        self,
        args: list[str],
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        control: ExecControl | None = None,
    ) -> int:
        control = control or ExecControl()
        self.controls.append(control)
        control.attach(4242, lambda sig: None, lambda w, h: None)
        control.detach()
        return 0

    async def dump_stacks(self) -> str:
        return ""

    async def share(
        self, host_path: str, guest_path: str, read_only: bool, pid: int = 0
    ) -> None:
        raise errdefs.FailedPrecondition("fake host cannot share")

    async def stats(self) -> any_pb2.Any | None:
        return None


class FakeWorkload:
    """A workload as a local host makes it: records its (rewritten) spec and signals."""

    def __init__(self, req: WorkloadRequest, spec: dict[str, Any]) -> None:
        self.id, self.bundle, self.spec, self.pid = req.id, req.bundle, spec, 0
        self.memory_cgroup = ""
        self.running = False
        self.killed: list[tuple[int, bool]] = []
        self.failed: list[BaseException] = []

    async def create(self) -> None:
        self.pid = 900 + len(self.id)
        self.running = True

    async def kill(self, exec_id: str, signal: int, all_: bool) -> None:
        self.killed.append((signal, all_))

    def fail(self, why: BaseException) -> None:
        self.failed.append(why)
        self.running = False

    def metrics(self) -> Any:
        raise errdefs.NotFound(f"fake workload {self.id}: no metrics")


async def make_fake_workload(ctx: ShimContext, req: WorkloadRequest, spec: dict[str, Any]) -> Any:
    w = FakeWorkload(req, spec)
    await w.create()
    return w


class FakeTask:
    """An in-memory container honouring the Task contract (``podshim.task.contract.Task``):
    an init and execs driven by the same state tables as the real ones; ``exit`` makes a
    process exit as the reaper would report it."""

    def __init__(self, tid: str, publisher: Any | None = None) -> None:
        from podshim.task.states import EXEC_TABLE, INIT_TABLE, Machine

        self.id, self.bundle = tid, f"/b/{tid}"
        self._machine = Machine
        self._tables = (INIT_TABLE, EXEC_TABLE)
        self.procs: dict[str, Any] = {"": self._new("", INIT_TABLE)}
        self.publisher = publisher
        self.signals: list[tuple[str, int, bool]] = []

    def _new(self, eid: str, table: Any) -> Any:
        m = self._machine(table, f"task {self.id}" if not eid else f"exec {eid} of task {self.id}")
        return {"m": m, "pid": 0, "exit": None, "ev": asyncio.Event()}

    def _p(self, eid: str) -> Any:
        if eid not in self.procs:
            raise errdefs.NotFound(f"exec {eid} of task {self.id}: not found")
        return self.procs[eid]

    @property
    def pid(self) -> int:
        return int(self.procs[""]["pid"] or 100)

    def exit(self, eid: str, status: int) -> None:
        from podshim.task.contract import ExitInfo

        p = self._p(eid)
        if p["m"].can(Verb.EXIT):
            p["m"].fire(Verb.EXIT)
            p["exit"] = ExitInfo(status, 1.0)
            p["ev"].set()

    async def start(self, exec_id: str) -> int:
        p = self._p(exec_id)
        p["m"].fire(Verb.START)
        p["pid"] = 100 + len(self.procs)
        return int(p["pid"])

    def state(self, exec_id: str) -> Any:
        from podshim.task.contract import ProcessState

        p = self._p(exec_id)
        return ProcessState(
            self.id, exec_id, self.bundle, p["pid"], p["m"].state, "", "", "", False, p["exit"]
        )

    async def kill(self, exec_id: str, signal: int, all_: bool) -> None:
        if all_ and exec_id:
            raise errdefs.FailedPrecondition("cannot signal all processes of an exec")
        self._p(exec_id)["m"].check_kill()
        self.signals.append((exec_id, signal, all_))
        self.exit(exec_id, 128 + signal)

    async def exec(self, req: Any) -> None:
        if req.exec_id in self.procs:
            raise errdefs.AlreadyExists(f"exec {req.exec_id}: already exists")
        if self.procs[""]["m"].state.name != "RUNNING":
            raise errdefs.FailedPrecondition("cannot exec in a task that is not running")
        self.procs[req.exec_id] = self._new(req.exec_id, self._tables[1])

    async def delete(self, exec_id: str) -> tuple[int, Any]:
        from podshim.task.contract import ExitInfo

        p = self._p(exec_id)
        p["m"].fire(Verb.DELETE)
        if exec_id:
            del self.procs[exec_id]
        return int(p["pid"]), p["exit"] or ExitInfo(0, 1.0)

    async def wait(self, exec_id: str) -> Any:
        p = self._p(exec_id)
        await p["ev"].wait()
        return p["exit"]

    async def pids(self) -> list[tuple[int, str]]:
        return [(int(p["pid"]), eid) for eid, p in self.procs.items() if p["pid"]]

    async def pause(self) -> None:
        self.procs[""]["m"].fire(Verb.PAUSE)

    async def resume(self) -> None:
        self.procs[""]["m"].fire(Verb.RESUME)

    async def update(self, resources: Any) -> None:
        return None

    async def stats(self) -> Any:
        raise errdefs.NotFound("fake task has no cgroup")

    def close_io(self, exec_id: str) -> None:
        self._p(exec_id)

    def resize(self, exec_id: str, width: int, height: int) -> None:
        self._p(exec_id)
        raise errdefs.FailedPrecondition("not a tty")


class RecordingPublisher:
    """A :class:`Publisher` fake for unit tests of the shim: it records ``(topic, event)``.

    Events are copied at ``publish`` time (as the real publisher serializes them then),
    so later changes to the message are not seen. Unlike the real publishers, a strict
    recorder (the default) raises :class:`TypeError` for an event type without a topic,
    so that such a bug fails the test that triggers it.
    """

    def __init__(self, *, strict: bool = True) -> None:
        self.strict = strict
        self.events: list[tuple[str, Message]] = []
        self.closed = False

    def publish(self, event: Message) -> None:
        """Record ``(topic, copy of event)``; ignored after :meth:`close`."""
        topic = topic_for(event)
        if topic is None:
            if self.strict:
                raise TypeError(f"no event topic for {type(event).__name__}")
            logging.getLogger("podshim.tests").error("events: no topic for %s; dropped", type(event).__name__)
            return
        if self.closed:
            return
        copy = type(event)()
        copy.CopyFrom(event)
        self.events.append((topic, copy))

    @property
    def topics(self) -> list[str]:
        """The recorded topics, in publish order."""
        return [t for t, _ in self.events]

    async def flush(self, timeout: float) -> bool:
        """Recording is synchronous: always True."""
        return True

    async def close(self, timeout: float) -> None:
        """Stop recording."""
        self.closed = True
