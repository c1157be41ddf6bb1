"""The serving shim daemon (no action on the command line).

``start`` spawned us with the listening socket on fd 3, stdio on /dev/null, our own
session, and ``-bundle`` naming the first task's bundle. We become a child subreaper,
log to that bundle's ``log`` FIFO, and serve ttrpc until a Shutdown finds no task left
(or SIGTERM/SIGINT, or nothing ever arrives), then remove our socket and exit.

This module is the composition root: it builds the reaper, the event publisher, the OCI
driver factory, the daemon's job group, the Task service with its factories and
observers, the Diag service and the ttrpc server (with tracing as an interceptor when
tracing is on), and wires them together. Nothing below it reads the environment for
behaviour that tests inject: the tests' fault hooks arrive as Create observers named in
``PODSHIM_HOOKS`` (``module:function`` entries, comma-separated; never set it in
production).

A crash (an exception escaping the asyncio main, a failed job of the daemon's own group,
or a non-zero ``SystemExit``) writes the traceback to ``panic.log`` in the pod sandbox's
bundle (for a shim without a pod: the first task's bundle) and exits with status 2; the
sandbox's ``delete`` action relays that file to containerd (see ``panic.py``). A failed
job of a *pod* fails that pod only (``Pod.fail``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
from collections.abc import Callable

from podshim import RUNTIME_TYPE, logs, rundir, tracing
from podshim.api.task.v2 import shim_pb2
from podshim.diag.shim import ShimDiag
from podshim.jobs import JobGroup
from podshim.linux.reaper import Reaper, set_child_subreaper
from podshim.oci import bundle as files
from podshim.oci import runc
from podshim.service.publisher import ForwardPublisher, publisher_from_env
from podshim.service.router import NodeService
from podshim.service.tasks import CreateObserver, TaskService
from podshim.shim.flags import Flags
from podshim.shim.panic import write_panic
from podshim.shim.spawn import CONTAINERD_PID_ENV, LISTEN_FD
from podshim.shim.zygote import is_socket_file_of
from podshim.task.contract import ShimContext
from podshim.task.events import NullPublisher
from podshim.ttrpc.server import Interceptor, Server
from podshim.ttrpc.services import ServiceBinding, bind

log = logging.getLogger("podshim.daemon")

#: exit when no task and no connection has been seen for this long (until a Create
#: brought the config's ``idle_exit_seconds``)
IDLE_EXIT_SECONDS = 60.0
#: how long tasks and connections must be unchanged before the heap is trimmed
TRIM_AFTER_QUIET = 0.5
#: a node daemon's log, in its directory ``<run dir>/node/<key>/``
NODE_LOG = "daemon.log"
#: Create observers to load (tests' fault hooks): ``module:function,...``
HOOKS_ENV = "PODSHIM_HOOKS"
#: a directory: every daemon runs under cProfile and leaves its statistics there
PROFILE_ENV = "PODSHIM_PROFILE_DIR"


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


def _log_to(path: str, flags: int, mode: int = 0o600) -> None:
    """Make ``path`` our stderr (the log); if it cannot be opened, keep /dev/null.

    A pod-scope shim writes to its first task's ``log`` FIFO, which containerd reads
    (opened non-blocking, as containerd may not read yet, then made blocking). A node
    daemon outlives the task that started it, and containerd stops reading a task's FIFO
    when the task goes: it appends to a file of its own."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError:
        return  # no FIFO (e.g. run by hand)
    os.set_blocking(fd, True)
    os.dup2(fd, 2)
    os.close(fd)


class _ProcessWatch:
    """Whether a process (containerd) has exited, told by its pidfd (no polling)."""

    def __init__(self, pid: int) -> None:
        self.gone = False
        self.changed = asyncio.Event()
        self._fd = -1
        try:
            self._fd = os.pidfd_open(pid)
        except OSError:
            self.gone = True  # already gone (or never there)
            return
        asyncio.get_running_loop().add_reader(self._fd, self._exited)

    def _exited(self) -> None:
        self.gone = True
        self.changed.set()
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


class _Crash:
    """Where a crash of this daemon is recorded (decided when it happens)."""

    def __init__(self, bundle: str) -> None:
        self.bundle = bundle
        self.service: TaskService | NodeService | None = None
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
        path = write_panic(self.panic_bundle(), exc)
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


def load_hooks(spec: str) -> list[CreateObserver]:
    """The Create observers named by ``PODSHIM_HOOKS`` (``module:function,...``)."""
    hooks: list[CreateObserver] = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        module, _, name = entry.partition(":")
        hooks.append(getattr(importlib.import_module(module), name))
    return hooks


async def _wait_either(*events: asyncio.Event, timeout: float | None = None) -> bool:
    """Wait until one of ``events`` is set (then clear them all); False on timeout."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    for e in events:
        e.clear()
    return bool(done)


async def _exit_when_idle(
    service: TaskService | NodeService,
    server: Server,
    stop: asyncio.Event,
    containerd: _ProcessWatch | None = None,
) -> None:
    """Stop the daemon once it has held no task and no connection for
    :data:`IDLE_EXIT_SECONDS` (woken by task and connection changes, never polling);
    give freed heap back to the kernel once work has settled for :data:`TRIM_AFTER_QUIET`
    (never right after a change: that is when the next calls of a pod's start or stop
    arrive, and the trim would hold up the event loop they need)."""
    trim_heap = _heap_trimmer()
    while True:
        while not service.empty or server.connections:
            await _wait_either(service.activity, server.activity)
            while await _wait_either(service.activity, server.activity, timeout=TRIM_AFTER_QUIET):
                pass
            trim_heap()
        if containerd is not None and containerd.gone:
            log.info("no task, and the containerd that started us is gone: exiting")
            stop.set()
            return
        wake = [service.activity, server.activity]
        if containerd is not None:
            wake.append(containerd.changed)
        cfg = service.config
        idle = cfg.idle_exit_seconds if cfg is not None else IDLE_EXIT_SECONDS
        if not await _wait_either(*wake, timeout=idle):
            log.info("no task and no connection for %.0fs: exiting", idle)
            stop.set()
            return


async def _serve_until_stopped(flags: Flags, crash: _Crash) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fatal: asyncio.Future[BaseException] = loop.create_future()

    def on_fatal(exc: BaseException, job: str) -> None:
        if not fatal.done():
            fatal.set_result(exc)
        stop.set()

    jobs = JobGroup("daemon", on_failure=on_fatal)
    reaper = Reaper()
    reaper.start()
    publishers: dict[str, ForwardPublisher | NullPublisher] = {}
    observers = load_hooks(os.environ.get(HOOKS_ENV, ""))

    def context(namespace: str) -> ShimContext:
        """One publisher (one ordered event queue) per containerd namespace."""
        publisher = publishers.get(namespace)
        if publisher is None:
            publisher = publishers[namespace] = publisher_from_env(namespace)
        oci = runc.factory(namespace, reaper)
        return ShimContext(namespace, reaper, publisher, oci=oci, jobs=jobs)

    service: TaskService | NodeService
    containerd: _ProcessWatch | None = None
    if flags.node:  # every pod of this containerd: one pod-scope service per group
        service = NodeService(
            flags.namespace,
            lambda ns, _group: TaskService(context(ns), lambda: None, observers=observers),
        )
        with contextlib.suppress(ValueError):
            containerd = _ProcessWatch(int(os.environ.get(CONTAINERD_PID_ENV, "")))
    else:
        service = TaskService(context(flags.namespace), stop.set, observers=observers)
    crash.service = service
    sock = socket.socket(fileno=LISTEN_FD)
    path = flags.socket or sock.getsockname()
    tasks = bind(shim_pb2.DESCRIPTOR.services_by_name["Task"], service)
    diag = ShimDiag(service, tasks, address=flags.address, namespace=flags.namespace,
                    first_id=flags.id, socket_path=str(path))  # Diag service + registry entry
    interceptor: Interceptor | None = tracing.rpc_interceptor if tracing.enabled() else None
    sandbox: list[ServiceBinding] = []
    if not flags.node:  # containerd 2.x, sandboxer = "shim": a pod's own shim only
        from podshim.service import sandbox_api  # the zygote preloads it

        sandbox = sandbox_api.bindings(service, stop.set)
    server = Server([tasks, diag.binding, *sandbox], interceptor=interceptor)
    crash.server = server
    await server.serve(sock)
    diag.register()
    log.info("serving on %s; tracing: %s", path, tracing.describe())
    jobs.spawn(_exit_when_idle(service, server, stop, containerd), "daemon::exitWhenIdle")
    await stop.wait()
    diag.unregister()  # first: `podshim diag list` stops showing a shim that is leaving
    if fatal.done():
        raise fatal.result()
    log.info("shutting down")
    if isinstance(path, str) and is_socket_file_of(path, sock.fileno()):  # never another file
        with contextlib.suppress(OSError):
            os.unlink(path)
    await server.shutdown(grace=1.0)
    await asyncio.gather(*(p.close(timeout=5.0) for p in publishers.values()))
    await jobs.aclose()
    if containerd is not None:
        containerd.close()
    reaper.stop()


def serve(flags: Flags) -> int:
    if flags.node:  # a node daemon belongs to no bundle: it keeps its own directory
        if "/" in flags.node or flags.node.startswith("."):
            log.error("bad node key %r", flags.node)
            return 2
        home = os.path.join(rundir.nodes_dir(), flags.node)
        os.makedirs(home, mode=0o700, exist_ok=True)
    else:
        home = flags.bundle or os.getcwd()
    os.chdir(home)
    rundir.bind_instance(flags.address)
    set_child_subreaper()
    if flags.node:
        _log_to(os.path.join(home, NODE_LOG), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    else:
        _log_to(os.path.join(home, files.LOG_FIFO), os.O_WRONLY | os.O_NONBLOCK)
    logs.setup(2, "info", {"runtime": RUNTIME_TYPE}, debug=flags.debug)
    tracing.init_from_env("containerd-shim-podshim-v1")  # after a zygote's fork: it threads
    crash = _Crash(home)
    try:
        _run_profiled(lambda: asyncio.run(_serve(flags, crash)), flags)
    except BaseException as exc:
        if _is_crash(exc):
            crash.record(exc)  # a node daemon's directory stays, with panic.log
            return 2
    finally:
        tracing.shutdown(timeout=5.0)  # flush the last spans (Delete, Shutdown, ...)
    if flags.node:
        _remove_node_home(home)
    return 0


def _run_profiled(run: Callable[[], None], flags: Flags) -> None:
    """``run()``; with ``PODSHIM_PROFILE_DIR`` in the environment (containerd's), under
    cProfile, the statistics then written to ``<dir>/<node key or task id>-<pid>.prof``
    when the daemon ends (read them with ``python -m pstats``)."""
    where = os.environ.get(PROFILE_ENV)
    if not where:
        run()
        return
    import cProfile

    prof = cProfile.Profile()
    try:
        prof.runcall(run)
    finally:
        os.makedirs(where, exist_ok=True)
        prof.dump_stats(os.path.join(where, f"{flags.node or flags.id}-{os.getpid()}.prof"))


def _remove_node_home(home: str) -> None:
    """After a clean exit: the log and the directory go, unless a newer daemon of the
    same key already writes there (then the log is not ours: its inode differs)."""
    path = os.path.join(home, NODE_LOG)
    try:
        mine = os.fstat(2)
        st = os.stat(path)
    except OSError:
        return
    if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(home)
