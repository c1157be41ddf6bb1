"""One process of a guest container (init or exec): the same state tables, exit and
waiter rules as :class:`podshim.task.process.Process`, with a guest pid and the agent
key that holds its stdio instead of a pidfd and local pipes.

Its exit is recorded in one place, :meth:`GuestProcess.exited_with` (called by the
container's exit monitor once ``wait_pid`` answered): output is copied to the FIFOs
first, then the state moves to Stopped under ``lock``, which a start holds until its
event is published, so a start event always precedes the exit event.
"""

from __future__ import annotations

import asyncio
import logging
import time

from podshim.host.uvm.guestio import GuestIO
from podshim.task.contract import ExitInfo, ProcessState
from podshim.task.process import OUTPUT_DRAIN_TIMEOUT
from podshim.task.states import EXEC_TABLE, INIT_TABLE, Machine, Status, Verb

log = logging.getLogger("podshim.uvm.process")


class GuestProcess:
    def __init__(self, tid: str, exec_id: str, bundle: str, io: GuestIO) -> None:
        self.tid, self.exec_id, self.bundle = tid, exec_id, bundle
        what = f"task {tid}" if not exec_id else f"exec {exec_id} of task {tid}"
        self.machine = Machine(EXEC_TABLE if exec_id else INIT_TABLE, what)
        self.io = io
        #: the guest pid (0 before it is known)
        self.pid = 0
        self.exit: ExitInfo | None = None
        self._exited = asyncio.Event()
        self.lock = asyncio.Lock()
        self.monitor: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        """The agent key holding its stdio (the runc create/exec that made it)."""
        return self.io.key

    @property
    def what(self) -> str:
        return self.machine.what

    @property
    def status(self) -> Status:
        return self.machine.state

    def state(self) -> ProcessState:
        io = self.io
        return ProcessState(
            id=self.tid, exec_id=self.exec_id, bundle=self.bundle, pid=self.pid,
            status=self.machine.state, stdin=io.stdin, stdout=io.stdout, stderr=io.stderr,
            terminal=io.terminal, exit=self.exit,
        )  # fmt: skip

    async def wait(self) -> ExitInfo:
        await self._exited.wait()
        assert self.exit is not None
        return self.exit

    @property
    def has_exited(self) -> bool:
        return self._exited.is_set()

    async def exited_with(self, status: int, at: float) -> bool:
        """Record the exit (once): copy the output, move to Stopped, release waiters.
        False when the exit was already recorded."""
        if self._exited.is_set():
            return False
        started = self.machine.state is not Status.CREATED or self.pid
        if started and not await self.io.wait_output(OUTPUT_DRAIN_TIMEOUT):
            log.warning("%s: output still open %.0fs after exit", self.what, OUTPUT_DRAIN_TIMEOUT)
        async with self.lock:
            if self._exited.is_set():
                return False
            if self.machine.can(Verb.EXIT):
                self.machine.fire(Verb.EXIT)
            self.exit = ExitInfo(status, at)
            self._exited.set()
        return True

    def failed_to_start(self, status: int = 255) -> bool:
        """Record an exit for a process that could not start (or whose pod failed), so
        waiters return. False when an exit was already recorded."""
        if self._exited.is_set():
            return False
        if self.machine.can(Verb.EXIT):
            self.machine.fire(Verb.EXIT)
        self.exit = ExitInfo(status, time.time())
        self._exited.set()
        return True

    def release(self) -> None:
        """Close stdio and stop the exit monitor (after delete)."""
        self.io.close()
        if self.monitor is not None and not self.monitor.done():
            self.monitor.cancel()
