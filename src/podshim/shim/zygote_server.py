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
    exits: dict[int, int] = {}  # pidfd -> pid of each child: readable once it exited
    watch: int | None = None  # pidfd of containerd
    poller = select.poll()  # not select(): pidfds of many children exceed FD_SETSIZE
    poller.register(lst.fileno(), select.POLLIN)
    idle_since = time.monotonic()
    try:
        while True:
            for pid in children - set(exits.values()):
                try:
                    fd = os.pidfd_open(pid)
                except OSError:  # no pidfd for it: reaped below by a periodic check
                    continue
                exits[fd] = pid
                poller.register(fd, select.POLLIN)
            had_children = bool(children)
            unwatched = len(children) > len(exits)
            if unwatched:
                timeout: float | None = 1.0
            elif children:
                timeout = None  # only an event wakes us
            else:
                timeout = max(0.0, IDLE_SECONDS - (time.monotonic() - idle_since))
            ready = {fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)}
            for fd in ready & exits.keys():
                pid = exits.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                os.waitpid(pid, 0)  # it has exited: this does not block
                children.discard(pid)
            if unwatched:
                _reap_unwatched(children, set(exits.values()))
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
                        poller.register(watch, select.POLLIN)
            if children or had_children:  # the idle time starts when the last child left
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= IDLE_SECONDS:
                return 0
    finally:
        for fd in exits:
            os.close(fd)
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ino:  # still ours, not a successor's
                os.unlink(path)
        lst.close()


def _reap_unwatched(children: set[int], watched: set[int]) -> None:
    """Reap exited children that have no pidfd (pidfd_open failed for them)."""
    for pid in children - watched:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                children.discard(pid)
        except ChildProcessError:
            children.discard(pid)
