"""Test doubles that honour the same contracts as the real objects."""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import any_pb2

from podshim import errors as errdefs


class FakeHost:
    """A pod host in memory: optional own namespaces, an init that tests can kill."""

    kind = "fake"

    def __init__(self, types: tuple[str, ...] = ("network", "ipc", "uts", "pid")) -> None:
        self.types = types
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

    async def exec_in_host(
        self, args: list[str], stdin: str, stdout: str, stderr: str, terminal: bool
    ) -> int:
        return 0

    async def dump_stacks(self) -> str:
        return ""

    async def share(self, host_path: str, guest_path: str, read_only: bool) -> None:
        raise errdefs.FailedPrecondition("fake host cannot share")

    async def stats(self) -> any_pb2.Any | None:
        return None


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
        if p["m"].can("exit"):
            p["m"].fire("exit")
            p["exit"] = ExitInfo(status, 1.0)
            p["ev"].set()

    async def start(self, exec_id: str) -> int:
        p = self._p(exec_id)
        p["m"].fire("start")
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
        p["m"].fire("delete")
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
        self.procs[""]["m"].fire("pause")

    async def resume(self) -> None:
        self.procs[""]["m"].fire("resume")

    async def update(self, resources: Any) -> None:
        return None

    async def stats(self) -> Any:
        raise errdefs.NotFound("fake task has no cgroup")

    def close_io(self, exec_id: str) -> None:
        self._p(exec_id)

    def resize(self, exec_id: str, width: int, height: int) -> None:
        self._p(exec_id)
        raise errdefs.FailedPrecondition("not a tty")
