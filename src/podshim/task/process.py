"""One process of a container (init or exec): state machine, stdio, exit and waiters.

The exit of a process is handled in one place, :meth:`Process.exited_with`, which is
called by the container's exit monitor. ``lock`` is held from the moment a start begins
until its /tasks/start (or exec-started) event is published, and the exit path takes it
too: so a start event always precedes the exit event of the same process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from podshim import errors as errdefs
from podshim.task.contract import ExitInfo, ProcessState
from podshim.task.states import EXEC_TABLE, INIT_TABLE, Machine, Status, Verb
from podshim.task.stdio import ProcessIO

log = logging.getLogger("podshim.process")

#: how long an exited process's output may take to drain before exit is reported
OUTPUT_DRAIN_TIMEOUT = 5.0


class Process:
    def __init__(
        self,
        tid: str,
        exec_id: str,
        bundle: str,
        terminal: bool,
        stdin: str,
        stdout: str,
        stderr: str,
    ) -> None:
        self.tid, self.exec_id, self.bundle = tid, exec_id, bundle
        what = f"task {tid}" if not exec_id else f"exec {exec_id} of task {tid}"
        self.machine = Machine(EXEC_TABLE if exec_id else INIT_TABLE, what)
        self.io = ProcessIO(stdin, stdout, stderr, terminal)
        self.pid = 0
        self.exit: ExitInfo | None = None
        self._exited = asyncio.Event()
        self.lock = asyncio.Lock()
        self.monitor: asyncio.Task[None] | None = None

    @property
    def what(self) -> str:
        return self.machine.what

    @property
    def status(self) -> Status:
        return self.machine.state

    def state(self) -> ProcessState:
        io = self.io
        return ProcessState(
            id=self.tid,
            exec_id=self.exec_id,
            bundle=self.bundle,
            pid=self.pid,
            status=self.machine.state,
            stdin=io.stdin,
            stdout=io.stdout,
            stderr=io.stderr,
            terminal=io.terminal,
            exit=self.exit,
        )

    async def wait(self) -> ExitInfo:
        await self._exited.wait()
        assert self.exit is not None
        return self.exit

    @property
    def has_exited(self) -> bool:
        return self._exited.is_set()

    async def exited_with(self, status: int, at: float) -> bool:
        """Record the exit (once): drain output, move to Stopped, release waiters.

        Returns False when the exit was already recorded. The caller holds no lock;
        this takes ``lock`` so a start still publishing its event finishes first.
        """
        if self._exited.is_set():
            return False
        if self.machine.state is not Status.CREATED or self.pid:
            drained = await self.io.wait_output(OUTPUT_DRAIN_TIMEOUT)
            if not drained:
                log.warning(
                    "%s: output still open %.0fs after exit", self.what, OUTPUT_DRAIN_TIMEOUT
                )
        async with self.lock:
            if self._exited.is_set():
                return False
            if self.machine.can(Verb.EXIT):
                self.machine.fire(Verb.EXIT)
            self.exit = ExitInfo(status, at)
            self._exited.set()
        return True

    def failed_to_start(self, status: int = 255) -> bool:
        """The runtime could not start the process (or its monitor failed): record an
        exit so waiters return. False when an exit was already recorded."""
        if self._exited.is_set():
            return False
        if self.machine.can(Verb.EXIT):
            self.machine.fire(Verb.EXIT)
        self.exit = ExitInfo(status, time.time())
        self._exited.set()
        return True

    def check_delete(self) -> None:
        self.machine.check(Verb.DELETE)

    def close_io(self) -> None:
        self.io.close_stdin()

    def resize(self, width: int, height: int) -> None:
        """Resize the pty. A process without one is FailedPrecondition; a tty process
        that is not running (yet, or any more) ignores it, as runc's shim does: ctr
        resizes right after Start, which races a quick exit."""
        if not self.io.terminal:
            raise errdefs.FailedPrecondition(f"{self.what}: not a tty")
        if self.machine.state is not Status.RUNNING:
            return
        with contextlib.suppress(errdefs.FailedPrecondition, OSError):
            self.io.resize(width, height)

    def release(self) -> None:
        """Close stdio and stop the exit monitor (after delete)."""
        self.io.close()
        if self.monitor is not None and not self.monitor.done():
            self.monitor.cancel()
