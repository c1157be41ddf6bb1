"""One process of a container (init or exec): state machine, stdio, exit and waiters.

A process holds a pidfd from the moment its pid is known (:meth:`Process.attach`) until
its exit is reaped or it is deleted: Kill signals through it and liveness is read from
it, so a pid reused after the reap (the exit is reported only once output has drained,
up to :data:`OUTPUT_DRAIN_TIMEOUT` later) is never signalled or taken for this process.

The exit of a process is handled in one place, :meth:`Process.exited_with`, which is
called by the container's exit monitor. ``lock`` is held from the moment a start begins
until its /tasks/start (or exec-started) event is published, and the exit path takes it
too: so a start event always precedes the exit event of the same process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal as signals
import time

from podshim import errors as errdefs
from podshim.linux.reaper import Reaper, pidfd_exited, wait_pidfd
from podshim.task.contract import ExitInfo, ProcessState
from podshim.task.states import EXEC_TABLE, INIT_TABLE, Machine, Status, Verb
from podshim.task.stdio import ProcessIO

log = logging.getLogger("podshim.process")

#: how long an exited process's output may take to drain before exit is reported
OUTPUT_DRAIN_TIMEOUT = 5.0
#: how long an undo waits for a killed process to be gone
KILL_TIMEOUT = 10.0


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
        #: a pidfd naming this process until its exit is reaped (None: not known yet,
        #: or gone)
        self.pidfd: int | None = None
        #: the reaper's mark taken before the process was made (see Reaper.watch)
        self.mark = 0
        self.exit: ExitInfo | None = None
        self._exited = asyncio.Event()
        self.lock = asyncio.Lock()
        self.monitor: asyncio.Task[None] | None = None

    def attach(self, pid: int, pidfd: int | None, mark: int) -> None:
        """The process is ``pid``, named by ``pidfd`` (None: it exited already), made
        after the reaper's ``mark``."""
        self.close_pidfd()
        self.pid, self.pidfd, self.mark = pid, pidfd, mark

    def claim(self, reaper: Reaper, pid_file: str, mark: int) -> None:
        """The process is the one whose pid the runtime wrote to ``pid_file`` (removed
        before the runtime ran, so it is this process's), made after ``mark``."""
        pid = read_pid(pid_file)
        self.attach(pid, reaper.pidfd(pid, mark), mark)

    async def wait_gone(self, reaper: Reaper) -> None:
        """Wait until the (killed) process is reaped; its pidfd is then closed."""
        fd = self.pidfd
        if fd is None:
            return
        exited = reaper.watch(self.pid, since=self.mark)
        try:
            if not await wait_pidfd(fd, KILL_TIMEOUT):
                log.error("%s: pid %d still runs %.0fs after SIGKILL", self.what, self.pid,
                          KILL_TIMEOUT)  # fmt: skip
                return
            with contextlib.suppress(TimeoutError):  # not reaped here: not our child
                await asyncio.wait_for(asyncio.shield(exited), KILL_TIMEOUT)
        finally:
            if not exited.done():
                exited.cancel()
            self.close_pidfd()

    def close_pidfd(self) -> None:
        """Its exit was reaped (or it is deleted): the pid may name another process."""
        fd, self.pidfd = self.pidfd, None
        if fd is not None:
            os.close(fd)

    @property
    def alive(self) -> bool:
        """The process is still running (not merely not reported exited yet)."""
        return self.pidfd is not None and not pidfd_exited(self.pidfd)

    def signal(self, sig: int) -> None:
        """Signal the process through its pidfd; ProcessLookupError once it exited
        (never ``kill(2)`` by pid: the pid may be reused)."""
        if self.pidfd is None:
            raise ProcessLookupError(f"{self.what}: no process")
        signals.pidfd_send_signal(self.pidfd, sig)

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
        """Close stdio and the pidfd, stop the exit monitor (after delete)."""
        self.io.close()
        self.close_pidfd()
        if self.monitor is not None and not self.monitor.done():
            self.monitor.cancel()


def unlink(path: str) -> None:
    """Remove a file if it is there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def read_pid(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as exc:
        raise errdefs.Unknown(f"cannot read pid file {path}: {exc}") from None
