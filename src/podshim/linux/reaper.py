"""The one reaper: every child exit of the shim goes through here.

The shim is a child subreaper, so container inits and exec processes (reparented to us
when runc exits) and the runc commands we run all end up as our children. Exactly one
place calls ``waitpid``: :meth:`Reaper.reap`, on SIGCHLD. Everyone else asks for an exit
with :meth:`Reaper.watch`. An exit that arrives before anyone asked (a container init can
die before we have read its pid file) is kept for a while and handed out on request.

Every command the shim runs is spawned by :meth:`Reaper.spawn` (:meth:`Reaper.run` to
completion) and is *owned* by the reaper until it is reaped: its exit is never left
unclaimed, its ``Popen`` never waits for itself (an abandoned ``Popen`` would
``waitpid`` its pid later and could steal the exit of another child that reused it),
and a caller cancelled while awaiting it never abandons it: :meth:`Reaper.run` waits
for the child (or kills it, per ``on_cancel``) before the cancellation goes on, so the
caller's undo sees everything the child did.

Pids are reused once reaped. Each reap is numbered (:meth:`mark`); an exit is matched
to a process only when it was reaped after the mark taken before that process could
exist, and :meth:`pidfd` opens a pidfd for a pid the runtime left us only if the
reaper has not reaped that pid since the mark: the pidfd then names that process for
good (signals and liveness through it never reach a reused pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import select
import signal
import subprocess
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

from podshim.linux import proc

log = logging.getLogger("podshim.reaper")

PR_SET_CHILD_SUBREAPER = 36

#: what a cancelled :meth:`Reaper.run` does with its child before it re-raises:
#: ``"wait"`` lets it finish (for commands whose half-done effect cannot be undone,
#: such as ``runc create``), killing it only after ``grace`` seconds; ``"kill"`` kills it
OnCancel = Literal["wait", "kill"]
#: how long a cancelled ``"wait"`` run lets its child go on before killing it
CANCEL_GRACE = 30.0


def set_child_subreaper() -> None:
    """Make this process a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER, 1)``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


@dataclass(frozen=True, slots=True)
class Exit:
    """How a process ended: ``status`` is the exit code, or 128+signal when killed.
    ``seq`` numbers the reap (see :meth:`Reaper.mark`; 0: before any mark)."""

    pid: int
    status: int
    at: float  # time.time() when reaped
    seq: int = 0


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


class Child:
    """A process the reaper spawned and owns until it is reaped."""

    def __init__(self, popen: subprocess.Popen[bytes], exited: asyncio.Future[Exit]) -> None:
        self.popen = popen
        self.pid = popen.pid
        #: resolved by the reaper with the exit, whether anybody awaits it or not
        self.exited = exited

    def signal(self, sig: int) -> bool:
        """Signal the child if it is not reaped yet (its pid is still its own: only the
        reaper frees it, on the loop this runs on). False when it was already reaped."""
        if self.exited.done():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:  # a zombie not reaped yet: the same
            return False
        return True


class Reaper:
    """Owns ``waitpid`` for the whole process. Create one per event loop."""

    #: how many unclaimed exits (and reap numbers of pids) to keep
    KEEP = 1024

    def __init__(self) -> None:
        self._watchers: dict[int, list[asyncio.Future[Exit]]] = {}
        self._unclaimed: OrderedDict[int, Exit] = OrderedDict()
        #: pid -> number of its last reap (to tell a reused pid from the process)
        self._reaped: OrderedDict[int, int] = OrderedDict()
        self._seq = 0
        #: children spawned here, not reaped yet
        self._owned: dict[int, Child] = {}
        #: runs of children whose caller was cancelled (finished by the reaper)
        self._settling: set[asyncio.Task[Any]] = set()
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
            self._seq += 1
            self._deliver(Exit(pid, exit_status(status), time.time(), self._seq))

    def _deliver(self, ex: Exit) -> None:
        self._reaped[ex.pid] = ex.seq
        self._reaped.move_to_end(ex.pid)
        while len(self._reaped) > self.KEEP:
            self._reaped.popitem(last=False)
        child = self._owned.pop(ex.pid, None)
        if child is not None:
            child.popen.returncode = ex.status  # so Popen never waits for it itself
            if not child.exited.done():
                child.exited.set_result(ex)
            return
        futs = self._watchers.pop(ex.pid, [])
        waiting = [f for f in futs if not f.done()]
        if waiting:
            for f in waiting:
                f.set_result(ex)
            return
        self._unclaimed[ex.pid] = ex
        self._unclaimed.move_to_end(ex.pid)
        while len(self._unclaimed) > self.KEEP:
            self._unclaimed.popitem(last=False)

    def mark(self) -> int:
        """The number of the last reap: take it before a process can exist, and pass it
        to :meth:`watch` and :meth:`pidfd` for that process."""
        return self._seq

    def watch(self, pid: int, since: int | None = None) -> asyncio.Future[Exit]:
        """A future resolved with ``pid``'s exit (at once if it was already reaped).

        ``since``: a :meth:`mark` taken before the process was made; an exit of the
        same pid reaped before it is another process's and is never handed out. Without
        it, any unclaimed exit of ``pid`` is taken to be this process's.
        """
        fut: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        ex = self._unclaimed.pop(pid, None)
        if ex is not None and (since is None or ex.seq > since):
            fut.set_result(ex)
        else:
            self._watchers.setdefault(pid, []).append(fut)
        return fut

    def forget(self, pid: int) -> None:
        """Drop an unclaimed exit nobody will ask for."""
        self._unclaimed.pop(pid, None)

    def reaped_since(self, pid: int, since: int) -> bool:
        """Whether this reaper reaped ``pid`` after mark ``since`` (then the pid may
        name another process by now)."""
        return self._reaped.get(pid, -1) > since

    def pidfd(self, pid: int, since: int) -> int | None:
        """A pidfd (caller closes it) for ``pid``, a process made after mark ``since``
        that the runtime left to this shim (e.g. read from runc's pid file); None when
        it already exited and was reaped here (its exit is then ``watch(pid, since)``'s).

        ``pidfd_open`` alone could name a process that reused the pid; but a process of
        the shim's is freed only by this reaper, on this loop: not reaped since the mark
        means the pidfd names that very process. Checked again after opening it."""
        if self.reaped_since(pid, since):
            return None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        if self.reaped_since(pid, since):  # cannot happen on one loop; cheap to check
            os.close(fd)
            return None
        parent = proc.parent(pid)
        if parent is not None and parent != os.getpid() and not pidfd_exited(fd):
            log.warning("pid %d: parent is %d, not this shim: its exit may never come", pid,
                        parent)  # fmt: skip
        return fd

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        pass_fds: Sequence[int] = (),
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> Child:
        """Start ``argv`` as a child owned by this reaper until it is reaped.

        No reap can run between the fork and the registration (both happen in this
        call, on the loop), so the child's exit always reaches its :class:`Child`."""
        popen = subprocess.Popen(
            list(argv),
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=stderr if stderr is not None else subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            pass_fds=tuple(pass_fds),
        )
        child = Child(popen, asyncio.get_running_loop().create_future())
        self._owned[popen.pid] = child
        return child

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
        on_cancel: OnCancel = "wait",
        grace: float = CANCEL_GRACE,
    ) -> Result:
        """Run a helper command to completion; its exit comes from this reaper.

        ``stdin``/``stdout``/``stderr`` may be fds to hand to the child (e.g. a
        container's stdio pipes); otherwise they are captured (stdin gets ``input``).

        Cancelled, it does not return before the child is reaped (``on_cancel``:
        ``"wait"`` lets the child finish, killing it after ``grace`` s; ``"kill"`` kills
        it at once), then raises CancelledError. Cancelled again meanwhile, it stops
        waiting; the reaper still finishes the child.
        """
        cap_in = stdin is None and bool(input)
        child = self.spawn(
            argv, env=env, cwd=cwd, pass_fds=pass_fds,
            stdin=subprocess.PIPE if cap_in else stdin, stdout=stdout, stderr=stderr,
        )  # fmt: skip
        if cap_in and input and child.popen.stdin is not None:
            _write_all(child.popen.stdin, input)
        job = asyncio.get_running_loop().create_task(_finish(child, tuple(argv)))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            self._settle(child, job, on_cancel, grace)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({job})
            raise

    def _settle(
        self, child: Child, job: asyncio.Task[Result], on_cancel: OnCancel, grace: float
    ) -> None:
        """The caller of ``job`` was cancelled: the reaper owns finishing it."""
        self._settling.add(job)
        job.add_done_callback(self._settled)
        if on_cancel == "kill":
            child.signal(signal.SIGKILL)
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(grace, child.signal, signal.SIGKILL)
        job.add_done_callback(lambda _: timer.cancel())

    def _settled(self, job: asyncio.Task[Any]) -> None:
        self._settling.discard(job)
        if not job.cancelled() and job.exception() is not None:
            log.warning("cancelled command failed: %s", job.exception())

    @property
    def owned(self) -> frozenset[int]:
        """Pids of the children spawned here and not reaped yet."""
        return frozenset(self._owned)


async def _finish(child: Child, argv: tuple[str, ...]) -> Result:
    out, err = await asyncio.gather(_drain(child.popen.stdout), _drain(child.popen.stderr))
    ex = await child.exited
    return Result(argv, ex.status, out, err)


def pidfd_exited(fd: int) -> bool:
    """Whether the process of pidfd ``fd`` has exited (a pidfd is readable then, before
    anyone reaps it)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def pidfd_unreaped(fd: int) -> bool:
    """Whether the process of pidfd ``fd``, a child of this process, is not reaped yet:
    running, or a zombie. Until it is reaped its pid (and a process group it leads) is
    still its own, so ``killpg(pid)`` reaches that group and no other. Asks the kernel
    (``waitid(P_PIDFD, WNOWAIT)``: nothing is collected); False for a process that is not
    this process's child."""
    try:
        os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


async def wait_pidfd(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the process of pidfd ``fd`` to exit; whether it did.

    The wait watches a duplicate of ``fd``: its owner may close ``fd`` meanwhile (the
    exit was reaped), and the number may then name another file, whose reader the event
    loop must not lose or be handed; two waits on one pidfd never replace each other's
    reader either."""
    if pidfd_exited(fd):
        return True
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    own = os.dup(fd)
    loop.add_reader(own, readable)
    try:
        async with asyncio.timeout(timeout):
            await done
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(own)
        os.close(own)
    return True


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
        pass  # the child exited without reading: its status and log say why
    finally:
        try:
            f.close()  # flushes what write() buffered: the same broken pipe can surface here
        except BrokenPipeError:
            pass
