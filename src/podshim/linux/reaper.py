"""The one reaper: every child exit of the shim goes through here.

The shim is a child subreaper, so container inits and exec processes (reparented to us
when runc exits) and the runc commands we run all end up as our children. Exactly one
place calls ``waitpid``: :meth:`Reaper.reap`, on SIGCHLD. Everyone else asks for an exit
with :meth:`Reaper.watch`. An exit that arrives before anyone asked (a container init can
die before we have read its pid file) is kept for a while and handed out on request.

Helper commands run through :meth:`Reaper.run`, never ``subprocess.run``/``Popen.wait``:
those would race the global ``waitpid(-1)`` and report ECHILD as a silent success.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

log = logging.getLogger("podshim.reaper")

PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> None:
    """Make this process a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER, 1)``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


@dataclass(frozen=True, slots=True)
class Exit:
    """How a process ended: ``status`` is the exit code, or 128+signal when killed."""

    pid: int
    status: int
    at: float  # time.time() when reaped


def exit_status(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


@dataclass(frozen=True, slots=True)
class Result:
    """A finished helper command."""

    argv: tuple[str, ...]
    status: int
    stdout: bytes
    stderr: bytes


class Reaper:
    """Owns ``waitpid`` for the whole process. Create one per event loop."""

    #: how many unclaimed exits to keep
    KEEP = 1024

    def __init__(self) -> None:
        self._watchers: dict[int, list[asyncio.Future[Exit]]] = {}
        self._unclaimed: OrderedDict[int, Exit] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Install the SIGCHLD handler on the running loop and reap what is pending."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)

    def reap(self) -> None:
        """Collect every exited child (called on SIGCHLD; safe to call any time)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._deliver(Exit(pid, exit_status(status), time.time()))

    def _deliver(self, ex: Exit) -> None:
        futs = self._watchers.pop(ex.pid, [])
        waiting = [f for f in futs if not f.done()]
        if waiting:
            for f in waiting:
                f.set_result(ex)
            return
        self._unclaimed[ex.pid] = ex
        while len(self._unclaimed) > self.KEEP:
            self._unclaimed.popitem(last=False)

    def watch(self, pid: int) -> asyncio.Future[Exit]:
        """A future resolved with ``pid``'s exit (at once if it was already reaped).

        Call it as soon as the pid is known; pids are only reused after we reaped them,
        so an unclaimed exit for ``pid`` is this process's.
        """
        fut: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        ex = self._unclaimed.pop(pid, None)
        if ex is not None:
            fut.set_result(ex)
        else:
            self._watchers.setdefault(pid, []).append(fut)
        return fut

    def forget(self, pid: int) -> None:
        """Drop an unclaimed exit nobody will ask for."""
        self._unclaimed.pop(pid, None)

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        pass_fds: Sequence[int] = (),
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> Result:
        """Run a helper command to completion; its exit comes from this reaper.

        ``stdin``/``stdout``/``stderr`` may be fds to hand to the child (e.g. a
        container's stdio pipes); otherwise they are captured (stdin gets ``input``).
        """
        cap_in = stdin is None
        if stdin is None:
            stdin = subprocess.PIPE if input else subprocess.DEVNULL
        proc = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=stderr if stderr is not None else subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            pass_fds=tuple(pass_fds),
        )
        exited = self.watch(proc.pid)
        try:
            if cap_in and input and proc.stdin is not None:
                _write_all(proc.stdin, input)
            out, err = await asyncio.gather(_drain(proc.stdout), _drain(proc.stderr))
            ex = await exited
        finally:
            if not exited.done():
                exited.cancel()
        proc.returncode = ex.status  # so Popen never waits for it itself
        return Result(tuple(argv), ex.status, out, err)


async def _drain(f: IO[bytes] | None) -> bytes:
    """Read a pipe to EOF on the event loop (no threads: a shim stays single-threaded,
    which keeps its memory small and makes forking it from the zygote safe)."""
    if f is None:
        return b""
    fd = f.fileno()
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    chunks: list[bytes] = []

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            chunks.append(data)
        elif not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        f.close()
    return b"".join(chunks)


def _write_all(f: IO[bytes], data: bytes) -> None:
    """Small inputs only (runtime JSON): they fit the pipe buffer, so this never blocks
    for long."""
    try:
        f.write(data)
    except BrokenPipeError:
        pass
    finally:
        f.close()
