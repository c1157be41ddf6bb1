"""The zygote process itself (the ``zygote`` action); see :mod:`podshim.shim.zygote`."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import time

from podshim.shim.daemon import serve
from podshim.shim.flags import Flags
from podshim.shim.spawn import LISTEN_FD
from podshim.shim.zygote import zygote_path

IDLE_SECONDS = float(os.environ.get("PODSHIM_ZYGOTE_IDLE", "30"))


def _set_name(name: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _preload() -> None:
    import gc

    import podshim.api.cgroups.v1.metrics_pb2
    import podshim.api.cgroups.v2.metrics_pb2
    import podshim.cgroups.stats
    import podshim.host.namespaces.host  # noqa: F401  (the default host kind, imported late)

    gc.collect()
    gc.freeze()  # keep the GC from touching (and so copying) the parent's objects


def _child(conn: socket.socket, lst: socket.socket, fd: int, req: dict[str, object]) -> None:
    """In the forked child: become the daemon. Never returns."""
    rc = 1
    try:
        conn.close()
        lst.close()
        os.setsid()
        if fd != LISTEN_FD:
            os.dup2(fd, LISTEN_FD)
            os.close(fd)
        _set_name("containerd-shim")
        f = Flags()
        f.namespace, f.id = str(req["namespace"]), str(req["id"])
        f.address, f.bundle = str(req["address"]), str(req["bundle"])
        f.socket = str(req.get("socket", ""))
        f.debug = bool(req.get("debug"))
        rc = serve(f)
    finally:
        os._exit(rc)


def _handle(conn: socket.socket, lst: socket.socket, children: set[int]) -> int:
    """Serve one fork request; returns containerd's pid from it."""
    conn.settimeout(5.0)
    with conn:
        msg, fds, _, _ = socket.recv_fds(conn, 65536, 1)
        if not fds:
            conn.sendall(b'{"error": "no socket passed"}')
            return 0
        req = json.loads(msg)
        pid = os.fork()
        if pid == 0:
            _child(conn, lst, fds[0], req)
        os.close(fds[0])
        children.add(pid)
        conn.sendall(json.dumps({"pid": pid}).encode())
        return int(req.get("containerd_pid", 0))


def _bind(path: str) -> socket.socket | None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
    except OSError:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            s.close()
            return None  # another zygote serves this containerd
        except OSError:
            os.unlink(path)  # stale
            s.bind(path)
        finally:
            probe.close()
    os.chmod(path, 0o600)
    s.listen(64)
    return s


def run(flags: Flags) -> int:
    """The ``zygote`` action."""
    _set_name("podshim-zygote")
    _preload()
    path = zygote_path(flags.address)
    lst = _bind(path)
    if lst is None:
        return 0
    ino = os.stat(path).st_ino
    children: set[int] = set()
    watch: int | None = None  # pidfd of containerd
    idle_since = time.monotonic()
    try:
        while True:
            rlist: list[int] = [lst.fileno()] + ([watch] if watch is not None else [])
            ready, _, _ = select.select(rlist, [], [], 1.0)
            while children:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    children.clear()
                    break
                if pid == 0:
                    break
                children.discard(pid)
            if watch is not None and watch in ready:
                return 0  # containerd exited
            if lst.fileno() in ready:
                conn, _ = lst.accept()
                try:
                    cpid = _handle(conn, lst, children)
                except (OSError, ValueError):
                    cpid = 0
                if watch is None and cpid > 0:
                    with contextlib.suppress(OSError):
                        watch = os.pidfd_open(cpid)
            if children:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > IDLE_SECONDS:
                return 0
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ino:  # still ours, not a successor's
                os.unlink(path)
        lst.close()
