"""The serving shim daemon (no action on the command line).

``start`` spawned us with the listening socket on fd 3, stdio on /dev/null, our own
session, and ``-bundle`` naming the first task's bundle. We become a child subreaper,
log to that bundle's ``log`` FIFO, and serve ttrpc until a Shutdown finds no task left
(or SIGTERM/SIGINT, or nothing ever arrives), then remove our socket and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from podshim.api.task.v2 import shim_pb2
from podshim.shim import logs
from podshim.shim.events import publisher_from_env
from podshim.shim.flags import Flags
from podshim.shim.reaper import Reaper, set_child_subreaper
from podshim.shim.service import TaskService
from podshim.shim.start import LISTEN_FD
from podshim.shim.task import ShimContext
from podshim.ttrpc.server import Server
from podshim.ttrpc.services import bind

log = logging.getLogger("podshim.daemon")

#: exit when no task and no connection has been seen for this long
IDLE_EXIT_SECONDS = 60.0


def _trim_heap() -> None:
    """Give freed heap pages back to the kernel (``malloc_trim``): a shim's work leaves
    freed-but-resident memory behind, which would otherwise count in its PSS for good."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _open_log_fifo(bundle: str) -> None:
    try:
        fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # no FIFO (e.g. run by hand): keep /dev/null
    os.set_blocking(fd, True)
    os.dup2(fd, 2)
    os.close(fd)


async def _serve(flags: Flags) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reaper = Reaper()
    reaper.start()
    publisher = publisher_from_env(flags.namespace)
    service = TaskService(ShimContext(flags.namespace, reaper, publisher), stop.set)
    server = Server([bind(shim_pb2.DESCRIPTOR.services_by_name["Task"], service)])
    sock = socket.socket(fileno=LISTEN_FD)
    path = flags.socket or sock.getsockname()
    await server.serve(sock)
    log.info("serving on %s", path)
    idle = loop.time()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await stop.wait()
        _trim_heap()
        if not service.empty or server.connections:
            idle = loop.time()
        elif loop.time() - idle > IDLE_EXIT_SECONDS:
            log.info("no task and no connection for %.0fs: exiting", IDLE_EXIT_SECONDS)
            break
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
    logs.setup(2, "debug" if flags.debug else "info", {"runtime": "io.containerd.podshim.v1"})
    try:
        asyncio.run(_serve(flags))
    except Exception:
        log.exception("shim daemon failed")
        return 1
    return 0
