"""The serving shim daemon (no action on the command line).

``start`` spawned us with the listening socket on fd 3, stdio on /dev/null, our own
session, and ``-bundle`` naming the first task's bundle. We become a child subreaper,
log to that bundle's ``log`` FIFO, and serve ttrpc until a Shutdown finds no task left
(or SIGTERM/SIGINT, or nothing ever arrives), then remove our socket and exit.

A crash (an exception escaping the asyncio main, a background task reported fatal
through ``TaskService.on_fatal``, or a non-zero ``SystemExit``) writes the traceback to
``panic.log`` in the pod sandbox's bundle (for a shim without a pod: the first task's
bundle) and exits with status 2; the sandbox's ``delete`` action relays that file to
containerd (see ``delete.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable

from podshim import logs, tracing
from podshim.api.task.v2 import shim_pb2
from podshim.diag.shim import ShimDiag
from podshim.linux.reaper import Reaper, set_child_subreaper
from podshim.service.tasks import TaskService
from podshim.shim.flags import Flags
from podshim.shim.start import LISTEN_FD
from podshim.task.contract import ShimContext
from podshim.task.events import publisher_from_env
from podshim.ttrpc.server import Server
from podshim.ttrpc.services import bind

log = logging.getLogger("podshim.daemon")

#: exit when no task and no connection has been seen for this long
IDLE_EXIT_SECONDS = 60.0


def _heap_trimmer() -> Callable[[], None]:
    """``malloc_trim(0)``, resolved once: gives freed heap pages back to the kernel (a
    shim's work leaves freed-but-resident memory behind, which would otherwise count in
    its PSS for good). A no-op where libc has no malloc_trim."""
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0) and None


def _open_log_fifo(bundle: str) -> None:
    try:
        fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # no FIFO (e.g. run by hand): keep /dev/null
    os.set_blocking(fd, True)
    os.dup2(fd, 2)
    os.close(fd)


class _Crash:
    """Where a crash of this daemon is recorded (decided when it happens)."""

    def __init__(self, bundle: str) -> None:
        self.bundle = bundle
        self.service: TaskService | None = None
        self.server: Server | None = None
        self.recorded = False
        #: seconds a crashing daemon may take to unwind before SIGALRM ends it (None: no
        #: limit, for tests running this in-process)
        self.unwind_limit: int | None = 20

    def panic_bundle(self) -> str:
        """The pod sandbox's bundle, else the first task's (this daemon's)."""
        pod = self.service.pod if self.service is not None else None
        if pod is not None and pod.sandbox is not None:
            return pod.sandbox.bundle
        return self.bundle

    def record(self, exc: BaseException) -> None:
        """Log the crash and write ``panic.log`` (once); never raises."""
        if self.recorded:
            return
        self.recorded = True
        path = logs.write_panic(self.panic_bundle(), exc)
        log.critical("shim daemon crashed (traceback in %s)", path or "-", exc_info=exc)
        if self.unwind_limit:  # a crash must end the daemon, even if unwinding hangs
            with contextlib.suppress(Exception):
                signal.alarm(self.unwind_limit)

    async def stop_serving(self) -> None:
        """Drop every connection at once: a crashed shim serves no more calls, and
        containerd runs the ``delete`` actions (panic.log is written by then)."""
        server, self.server = self.server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.shutdown(grace=0)


def _is_crash(exc: BaseException) -> bool:
    return not (isinstance(exc, SystemExit) and exc.code in (None, 0))


async def _serve(flags: Flags, crash: _Crash | None = None) -> None:
    crash = crash or _Crash(flags.bundle or os.getcwd())
    try:
        await _serve_until_stopped(flags, crash)
    except BaseException as exc:
        if _is_crash(exc):
            crash.record(exc)  # now, while the loop still runs: unwinding may take a while
            await crash.stop_serving()
        raise


async def _serve_until_stopped(flags: Flags, crash: _Crash) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reaper = Reaper()
    reaper.start()
    publisher = publisher_from_env(flags.namespace)
    service = TaskService(ShimContext(flags.namespace, reaper, publisher), stop.set)
    crash.service = service
    fatal: asyncio.Future[BaseException] = loop.create_future()

    def on_fatal(exc: BaseException) -> None:
        if not fatal.done():
            fatal.set_result(exc)
        stop.set()

    service.on_fatal = on_fatal
    sock = socket.socket(fileno=LISTEN_FD)
    path = flags.socket or sock.getsockname()
    tasks = bind(shim_pb2.DESCRIPTOR.services_by_name["Task"], service)
    diag = ShimDiag(service, tasks, flags, str(path))  # podshim.diag.v1.Diag + registry entry
    server = Server([tasks, diag.binding])
    crash.server = server
    await server.serve(sock)
    diag.register()
    log.info("serving on %s; tracing: %s", path, tracing.describe())
    trim_heap = _heap_trimmer()
    idle = loop.time()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await stop.wait()
        trim_heap()
        if not service.empty or server.connections:
            idle = loop.time()
        elif loop.time() - idle > IDLE_EXIT_SECONDS:
            log.info("no task and no connection for %.0fs: exiting", IDLE_EXIT_SECONDS)
            break
    diag.unregister()  # first: `podshim diag list` stops showing a shim that is leaving
    if fatal.done():
        raise fatal.result()
    log.info("shutting down")
    with contextlib.suppress(OSError):
        if isinstance(path, str) and path:
            os.unlink(path)
    await server.shutdown(grace=1.0)
    await publisher.close(timeout=5.0)
    reaper.stop()


def serve(flags: Flags) -> int:
    bundle = flags.bundle or os.getcwd()
    os.chdir(bundle)
    set_child_subreaper()
    _open_log_fifo(bundle)
    logs.setup(2, "info", {"runtime": "io.containerd.podshim.v1"}, debug=flags.debug)
    tracing.init_from_env("containerd-shim-podshim-v1")  # after a zygote's fork: it threads
    crash = _Crash(bundle)
    try:
        asyncio.run(_serve(flags, crash))
    except BaseException as exc:
        if not _is_crash(exc):
            return 0
        crash.record(exc)
        return 2
    finally:
        tracing.shutdown(timeout=5.0)  # flush the last spans (Delete, Shutdown, ...)
    return 0
