"""A guest process's stdio: containerd's FIFOs on the host, the agent's pipes in the VM.

The agent holds the stdio of every process it spawns (pipes, or one pty); the host
copies, as jobs of the task's group:

* agent ``read(key, STDOUT/STDERR)`` -> the stdout/stderr FIFO, until EOF, and
* the stdin FIFO -> agent ``write_stdin(key)``, then ``close_stdin(key)`` at EOF.

The FIFOs are opened as :mod:`podshim.task.stdio` opens them (output O_RDWR, so a
missing reader never fails a write; stdin O_RDONLY|O_NONBLOCK plus a writer of our own
that CloseIO drops, so only containerd's close is EOF). An output FIFO is closed once
its reader took what is in it (or after :data:`DRAIN_TIMEOUT`): :meth:`GuestIO.wait_output`
returns when every byte the process wrote reached the FIFOs, before its exit is
reported (CRI logs and ExecSync lose nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import termios

from podshim import errors as errdefs
from podshim.host.uvm.agentapi import STDERR, STDOUT, AgentApi
from podshim.jobs import JobGroup
from podshim.task.stdio import fifo_path

log = logging.getLogger("podshim.uvm.io")

CHUNK = 64 * 1024
#: how long an output FIFO may hold unread bytes at EOF before it is closed anyway
DRAIN_TIMEOUT = 2.0
#: how long a full stdin queue in the agent is waited for before retrying
STDIN_RETRY = 0.05


def _open_output(uri: str) -> int:
    path = fifo_path(uri)
    if uri.startswith("file://"):
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


async def _ready(fd: int, write: bool) -> None:
    """Wait until ``fd`` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, ready)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def _write_all(fd: int, data: bytes) -> None:
    """Write everything to the non-blocking ``fd``; a write error drops the rest (the
    reader is gone: output is never raised)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await _ready(fd, write=True)
            continue
        except OSError as exc:
            log.debug("stdio write fd %d: %s", fd, exc)
            return
        view = view[n:]


def _unread(fd: int) -> int:
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])
    except OSError:
        return 0


class GuestIO:
    """The stdio of one guest process (spawned under ``key``).

    Use: ``io.open()`` before the spawn (a bad FIFO path is InvalidArgument then); spawn
    with :attr:`wants` (stdin, stdout, stderr); once it runs ``io.start(jobs)``; at its
    exit ``await io.wait_output(timeout)``; finally ``io.close()``.
    """

    def __init__(
        self, agent: AgentApi, key: str, stdin: str, stdout: str, stderr: str, terminal: bool
    ) -> None:
        self.agent, self.key = agent, key
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.terminal = terminal
        self._in = -1
        self._keep = -1  # our writer on the stdin FIFO (dropped by CloseIO)
        self._out: dict[int, int] = {}  # stream -> FIFO fd (owned by its pump once started)
        self._done: list[asyncio.Event] = []
        self._jobs: list[asyncio.Task[None]] = []
        #: every fd this object opened and has not closed: closed once, by whoever
        #: comes first (a pump's end, or close() of a pump cancelled before it ran)
        self._fds: set[int] = set()

    def _own(self, fd: int) -> int:
        self._fds.add(fd)
        return fd

    def _release(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            _close(fd)

    @property
    def wants(self) -> tuple[bool, bool, bool]:
        """Which stdio the agent must hold for the process (a pty carries no stderr)."""
        return bool(self.stdin), bool(self.stdout), bool(self.stderr) and not self.terminal

    def open(self) -> None:
        """Open the FIFOs; InvalidArgument naming one that cannot be opened."""
        try:
            if self.stdin:
                path = fifo_path(self.stdin)
                self._in = self._own(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
                self._keep = self._own(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            for stream, uri in ((STDOUT, self.stdout), (STDERR, self.stderr)):
                if uri and not (stream == STDERR and self.terminal):
                    self._out[stream] = self._own(_open_output(uri))
        except OSError as exc:
            self.close()
            where = exc.filename or "stdio"
            raise errdefs.InvalidArgument(f"stdio: open {where}: {exc.strerror or exc}") from None
        except BaseException:
            self.close()
            raise

    def start(self, jobs: JobGroup) -> None:
        """The process runs: copy its output and stdin as jobs of ``jobs``."""
        for stream in list(self._out):
            fd = self._out.pop(stream)
            done = asyncio.Event()
            self._done.append(done)
            fifo = not (self.stdout if stream == STDOUT else self.stderr).startswith("file://")
            self._jobs.append(jobs.spawn(self._copy_out(stream, fd, fifo, done),
                                         f"stdio:{self.key}:{stream}"))  # fmt: skip
        if self._in >= 0:
            fd, self._in = self._in, -1
            self._jobs.append(jobs.spawn(self._copy_in(fd), f"stdin:{self.key}"))

    async def _copy_out(self, stream: int, fd: int, fifo: bool, done: asyncio.Event) -> None:
        try:
            os.set_blocking(fd, False)
            while True:
                try:
                    chunk = await self.agent.read(self.key, stream, CHUNK)
                except errdefs.ShimError as exc:  # key released, or the VM is gone
                    log.debug("%s: read stream %d: %s", self.key, stream, exc)
                    break
                if chunk.data:
                    await _write_all(fd, chunk.data)
                if chunk.eof:
                    break
            if fifo:  # closing the last fd of a FIFO discards what is unread in it
                loop = asyncio.get_running_loop()
                deadline = loop.time() + DRAIN_TIMEOUT
                while _unread(fd) and loop.time() < deadline:
                    await asyncio.sleep(0.005)
        finally:
            self._release(fd)
            done.set()

    async def _copy_in(self, fd: int) -> None:
        try:
            while True:
                try:
                    data = os.read(fd, CHUNK)
                except BlockingIOError:
                    await _ready(fd, write=False)
                    continue
                except OSError:
                    data = b""
                if not data:
                    break
                while data:
                    try:
                        n = await self.agent.write_stdin(self.key, data)
                    except errdefs.ResourceExhausted:
                        await asyncio.sleep(STDIN_RETRY)
                        continue
                    data = data[n:]
            await self.agent.close_stdin(self.key)
        except errdefs.ShimError as exc:  # the process or the VM is gone: nobody reads
            log.debug("%s: stdin: %s", self.key, exc)
        finally:
            self._release(fd)

    def close_stdin(self) -> None:
        """CloseIO: from now on containerd closing its stdin FIFO writer is EOF."""
        if self._keep >= 0:
            self._release(self._keep)
            self._keep = -1

    async def wait_output(self, timeout: float) -> bool:
        """Wait until all output reached the FIFOs; False if something still holds the
        process's output after ``timeout`` (a daemonized grandchild)."""
        if not self._done:
            return True
        waits = [asyncio.ensure_future(d.wait()) for d in self._done]
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout)
        finally:
            for w in waits:
                w.cancel()
        return len(done) == len(waits)

    def close(self) -> None:
        """Stop copying and close every fd this object opened. Idempotent."""
        for job in self._jobs:
            job.cancel()
        self._jobs.clear()
        for fd in list(self._fds):
            self._release(fd)
        self._out.clear()
        self._in = self._keep = -1
        for done in self._done:
            done.set()
