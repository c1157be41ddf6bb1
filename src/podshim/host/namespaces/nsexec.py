"""Exec in a ``namespaces`` pod host: a diagnostic process in the pod's network, IPC and
UTS namespaces and its sandbox cgroup, with no container and no image involved.

How the process starts (through the shim's reaper; the shim itself never calls
setns(2), it may have threads)::

    python -I -S -c HELPER <report fd> <tty> <n> <cgroup.procs>... -- \\
        nsenter --net=<ns> --ipc=<ns> --uts=<ns> -- <args>

The helper becomes a session (and process group) leader, takes the pty slave on its
stdin as controlling terminal (with a terminal), writes its pid into the ``cgroup.procs``
of the exec's own cgroup in every hierarchy (:mod:`podshim.host.namespaces.execcg`:
made by the host for this exec, below the sandbox cgroup), reports ``pid <n>`` on the report pipe (or
``error <why>``, then exits 126) and execs nsenter, which execs the command: one pid
from start to exit (nsenter forks only to enter a PID namespace, which it is not asked
to: the command sees the host's PID namespace and mounts, like the pod's init).

stdio follows hcsshim's shimdiag: the client makes FIFOs and passes their paths. It
MUST open them before the call (stdin for writing, stdout and stderr for reading) and
keep them open until the call returns, so a client that is not there yet never looks
like EOF. Without a terminal the process gets pipes (:class:`ProcessIO`); with one the
shim allocates a pty, gives the process the slave and pumps master <-> FIFOs (stdout
only: a terminal has no separate stderr).

The process leads a process group of its own. ``ExecControl.signal`` (SignalExecInHost)
signals that group, as Ctrl-C on a terminal would, but only while the leader is not
reaped: the shim holds a pidfd of the leader (its child) and asks the kernel through it
(:func:`pidfd_unreaped`) right before ``killpg``. Until the reap the leader (running or
a zombie) holds its pid, so the group is its own; once reaped, the pid is free and a
process that got it and made itself a group leader would be signalled instead, so the
group is no longer signalled at all. Only the reaper reaps, on the event loop that also
makes this check and the ``killpg``: there is no window between them. What the leader
left in its group is then reached through the exec's cgroup (below); without a cgroup
(:class:`Target` with none, in tests) it is not signalled after the leader's reap.
Everything else goes by the exec's cgroup, which holds whatever the process started,
also what left its process group and session (``setsid``): a cancelled call (the client
went away) and the pod host closing SIGKILL every process in it; when the process
exits, whatever it left there is killed and the cgroup removed. Nothing of a
diagnostic session outlives it in the pod; a crash cleanup kills and removes the exec
cgroups the host recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import struct
import sys
import termios
from dataclasses import dataclass, field
from typing import Any, Protocol

from podshim import errors as errdefs
from podshim.host.control import ExecControl
from podshim.host.namespaces.execcg import ExecCgroup, ExecCgroups
from podshim.host.namespaces.initbin import which
from podshim.linux.reaper import Reaper, Result, pidfd_unreaped
from podshim.task.stdio import ProcessIO, Pump, fifo_path

log = logging.getLogger("podshim.host.namespaces.nsexec")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: how long an exited process's output may take to reach the FIFOs
OUTPUT_DRAIN_TIMEOUT = 5.0
#: how long a SIGKILLed process may take to be reaped before the call gives up on it
KILL_TIMEOUT = 10.0

#: OCI namespace type -> nsenter flag, for the namespaces an exec joins
NS_FLAGS = (("network", "--net"), ("ipc", "--ipc"), ("uts", "--uts"))

_HELPER = r"""
import fcntl, os, sys, termios
report, n = int(sys.argv[1]), int(sys.argv[3])
procs, argv = sys.argv[4:4 + n], sys.argv[5 + n:]
try:
    os.setsid()
    if sys.argv[2] == "1":
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    me = str(os.getpid())
    for path in procs:
        with open(path, "w") as f:
            f.write(me)
except OSError as exc:
    os.write(report, ("error %s\n" % exc).encode())
    os._exit(126)
os.write(report, ("pid %s\n" % me).encode())
os.close(report)
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    os.write(2, ("podshim: exec %s: %s\n" % (argv[0], exc.strerror)).encode())
    os._exit(127)
"""


@dataclass(frozen=True, slots=True)
class Target:
    """Where an exec runs: the pod's namespace files, and the host's exec cgroups."""

    pod_id: str
    reaper: Reaper
    #: (nsenter flag, namespace file) for each namespace the pod has of its own
    namespaces: tuple[tuple[str, str], ...] = ()
    #: makes each exec's own cgroup (None: no cgroup, the process group only)
    cgroups: ExecCgroups | None = None
    #: set when the pod host closes (the exec is then killed)
    closing: asyncio.Event = field(default_factory=asyncio.Event)


async def exec_in_host(
    target: Target,
    args: list[str],
    stdin: str,
    stdout: str,
    stderr: str,
    terminal: bool,
    control: ExecControl,
) -> int:
    """Run ``args`` in the pod (see the module docstring) and return its exit status
    (128+signal when killed). Options come from ``control``, which is attached to the
    process while it runs (signal and resize reach it through the control).

    Raises:
        InvalidArgument: no command, a bad environment entry, working directory or
            stdio path.
        FailedPrecondition: nsenter is missing, or no cgroup hierarchy is mounted.
        Internal: the exec's cgroup could not be made or joined, or it did not start.
    """
    if not args:
        raise errdefs.InvalidArgument(f"{control.what}: no command")
    env = _environment(control.env, terminal, control.what)
    nsenter = which("nsenter") if target.namespaces else ""
    if nsenter is None:
        raise errdefs.FailedPrecondition("nsenter not found on PATH (util-linux is needed)")
    command = [nsenter, *(f"{f}={p}" for f, p in target.namespaces), "--"] if nsenter else []
    command += args
    io = await _open_stdio(stdin, stdout, stderr, terminal, control)
    session = _Session(target, command, terminal, env, io, control)
    job = asyncio.ensure_future(session.run())
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        session.kill("the call was cancelled")
        await asyncio.wait({job}, timeout=KILL_TIMEOUT)
        if job.done() and not job.cancelled():
            job.exception()  # retrieved: the call is cancelled whatever happened
        raise
    finally:
        if job.done():
            io.close()
        else:  # not reaped yet (KILL_TIMEOUT): close once it is
            job.add_done_callback(lambda _: io.close())


class _Session:
    """One running exec: start, report, wait, kill. Runs shielded from the call's
    cancellation (a cancelled call kills the process and lets this finish)."""

    def __init__(
        self,
        target: Target,
        command: list[str],
        terminal: bool,
        env: dict[str, str],
        io: _IO,
        control: ExecControl,
    ) -> None:
        self.target, self.command, self.terminal = target, command, terminal
        self.env, self.io, self.control = env, io, control
        self.pid = 0
        #: a pidfd of the group leader (the helper, the reaper's child) until the call ends
        self.pidfd: int | None = None
        self._killed = ""
        #: the exec's own cgroup (made by :meth:`run`)
        self.cgroup: ExecCgroup | None = None

    def signal(self, sig: int) -> None:
        """Signal the process group, only while its leader is not reaped (see the
        module docstring)."""
        if self.pidfd is None or not pidfd_unreaped(self.pidfd):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def kill(self, why: str) -> None:
        """SIGKILL everything in the exec's cgroup (and its process group) now, or as
        soon as it started."""
        if not self._killed:
            self._killed = why
            log.info("pod %s: killing %s: %s", self.target.pod_id, self.control.what, why)
        self.signal(signal.SIGKILL)
        if self.cgroup is not None and self.pid:
            self.cgroup.kill()

    async def run(self) -> int:
        """Make the exec's cgroup, run the process, then kill what it left there and
        remove the cgroup (a cgroup still busy stays recorded for the host's close)."""
        cgroups = self.target.cgroups
        self.cgroup = cgroups.make() if cgroups is not None else None
        try:
            return await self._run()
        finally:
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None
            if self.cgroup is not None and cgroups is not None:
                problems = await cgroups.remove(self.cgroup, KILL_TIMEOUT)
                if problems:
                    log.error("pod %s: %s: %s", self.target.pod_id, self.control.what,
                              "; ".join(problems))  # fmt: skip

    async def _run(self) -> int:
        reaper, fds = self.target.reaper, self.io.child_fds
        procs = self.cgroup.procs_files() if self.cgroup is not None else ()
        r, w = os.pipe()
        mark = reaper.mark()  # before the helper can exist
        argv = [sys.executable, "-I", "-S", "-c", _HELPER, str(w), "1" if self.terminal else "0"]
        argv += [str(len(procs)), *procs, "--"]
        run = asyncio.ensure_future(
            reaper.run(argv + self.command, env=self.env, cwd=self.control.workdir,
                       pass_fds=(w,), stdin=fds[0], stdout=fds[1], stderr=fds[2])
        )  # fmt: skip
        try:
            self.pid = await self._read_pid(r, run)
            self.pidfd = reaper.pidfd(self.pid, mark)  # None: reaped already
        except BaseException:
            await asyncio.wait({run}, timeout=KILL_TIMEOUT)  # the helper exits at once
            raise
        finally:
            os.close(r)
            os.close(w)
        if self._killed:
            self.kill(self._killed)
        self.control.attach(self.pid, self.signal, self.io.resize)
        log.info("pod %s: %s %s is pid %d", self.target.pod_id, self.control.what,
                 self.command, self.pid)  # fmt: skip
        await self.io.started()
        watchdog = asyncio.ensure_future(self._watch_host())
        try:
            res: Result = await run
        finally:
            watchdog.cancel()
            self.control.detach()
        # the cgroup outlives the leader only by what the command left (its group is
        # not signalled: the leader is reaped, its pid may be another's by now)
        if self.cgroup is not None:
            self.cgroup.kill()
        if not await self.io.wait_output(OUTPUT_DRAIN_TIMEOUT):
            log.warning("pod %s: %s: output still open after exit", self.target.pod_id,
                        self.control.what)  # fmt: skip
        log.info("pod %s: %s pid %d exited %d", self.target.pod_id, self.control.what,
                 self.pid, res.status)  # fmt: skip
        return res.status

    async def _read_pid(self, fd: int, run: asyncio.Future[Result]) -> int:
        """The helper's report: its pid, or why it could not start."""
        loop = asyncio.get_running_loop()
        line: asyncio.Future[bytes] = loop.create_future()
        buf = bytearray()

        def readable() -> None:
            try:
                data = os.read(fd, 512)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            buf.extend(data)
            if (b"\n" in buf or not data) and not line.done():
                line.set_result(bytes(buf))

        os.set_blocking(fd, False)
        loop.add_reader(fd, readable)
        try:
            either: list[asyncio.Future[Any]] = [line, run]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(fd)
            if not line.done():
                line.cancel()
        what = f"{self.control.what} of pod {self.target.pod_id}"
        if not line.done() or line.cancelled():
            exc = run.exception()
            if isinstance(exc, OSError):  # Popen: e.g. no such working directory
                raise errdefs.InvalidArgument(f"{what}: cannot start: {exc}")
            if exc is not None:
                raise exc
            raise errdefs.Internal(f"{what}: helper exited {run.result().status} unreported")
        kind, _, rest = line.result().decode(errors="replace").strip().partition(" ")
        if kind == "pid" and rest.isdigit():
            return int(rest)
        raise errdefs.Internal(f"{what}: cannot join its cgroup: {rest or kind}")

    async def _watch_host(self) -> None:
        await self.target.closing.wait()
        self.kill("the pod host is closing")


def _environment(extra: tuple[str, ...], terminal: bool, what: str) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    if terminal:
        env["TERM"] = "xterm"
    for entry in extra:
        key, eq, value = entry.partition("=")
        if not key or not eq or "\0" in entry:
            raise errdefs.InvalidArgument(f"{what}: bad environment entry {entry!r}")
        env[key] = value
    return env


# -- stdio --------------------------------------------------------------------------------


class _IO(Protocol):
    child_fds: tuple[int, int, int]

    async def started(self) -> None: ...
    def resize(self, width: int, height: int) -> None: ...
    async def wait_output(self, timeout: float) -> bool: ...
    def close(self) -> None: ...


async def _open_stdio(
    stdin: str, stdout: str, stderr: str, terminal: bool, control: ExecControl
) -> _IO:
    try:
        if terminal:
            return _PtyIO(stdin, stdout, control.width, control.height)
        io = ProcessIO(stdin, stdout, stderr, False)
        await io.open()
        io.close_stdin()  # the client holds its own writer: its close is EOF
        return io
    except OSError as exc:
        raise errdefs.InvalidArgument(f"{control.what}: stdio: {exc}") from None


def _open_output(uri: str) -> int:
    path = fifo_path(uri)
    if uri.startswith("file://"):
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


class _PtyIO:
    """A pty allocated by the shim: the process gets the slave on fds 0-2, the shim
    pumps the stdin FIFO into the master and the master into the stdout FIFO."""

    def __init__(self, stdin: str, stdout: str, width: int, height: int) -> None:
        self._master, self._slave = os.openpty()
        self.child_fds = (self._slave, self._slave, self._slave)
        self._pumps: list[Pump] = []
        self._out: Pump | None = None
        try:
            if width and height:
                self.resize(width, height)
            if stdin:
                src = os.open(fifo_path(stdin), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self._pumps.append(Pump(src, os.dup(self._master), close_src=True, close_dst=True))
            dst = _open_output(stdout or os.devnull)
            self._out = Pump(os.dup(self._master), dst, close_src=True, close_dst=True)
            self._pumps.append(self._out)
        except BaseException:
            self.close()
            raise

    async def started(self) -> None:
        """The process has the slave: drop ours, so its exit ends the output (EIO)."""
        if self._slave >= 0:
            os.close(self._slave)
            self._slave = -1

    def resize(self, width: int, height: int) -> None:
        if self._master < 0:
            raise errdefs.FailedPrecondition("the exec's terminal is closed")
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def wait_output(self, timeout: float) -> bool:
        if self._out is None:
            return True
        done, _ = await asyncio.wait({self._out.done}, timeout=timeout)
        return bool(done)

    def close(self) -> None:
        for p in self._pumps:
            p.cancel()
        self._pumps.clear()
        for fd in (self._slave, self._master):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._slave = self._master = -1
