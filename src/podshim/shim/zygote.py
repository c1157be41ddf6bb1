"""The pre-warmed parent ("zygote") that forks shim daemons.

Every pod starts a shim. Spawned fresh, each daemon pays Python's start-up and ~130 ms of
imports, and keeps ~14 MB of private memory. Forked from one parent that has already
imported everything (and frozen its objects with ``gc.freeze()``), a daemon starts at
once and shares those pages copy-on-write.

* **One per containerd instance**: its socket is ``/run/podshim/z/<sha256(address)>``.
  ``start`` spawns it on first use (detached, its own session, stdio on /dev/null, the
  environment containerd gave the shim) and asks it to fork a daemon, passing the
  listening socket with SCM_RIGHTS. Any failure falls back to spawning the daemon.
* **Lifetime**: it exits when it has had no live child for ``IDLE_SECONDS``, or as soon as
  the containerd that first used it exits. Forked daemons do not depend on it: they are
  full shims in their own sessions and outlive it.
* It is single-threaded (forking is safe), reaps its children, and counts as a shim
  process in every leak check and memory figure (comm ``podshim-zygote``).
* Opt-in: ``zygote = true`` in the podshim config, or ``PODSHIM_ZYGOTE=1`` in
  containerd's environment.
"""

from __future__ import annotations

import _socket
import contextlib
import hashlib
import json
import os
import select
import socket
import time

from podshim.shim.flags import Flags
from podshim.shim.paths import RUN_DIR

ZYGOTE_DIR = os.path.join(RUN_DIR, "z")
IDLE_SECONDS = float(os.environ.get("PODSHIM_ZYGOTE_IDLE", "30"))
LISTEN_FD = 3


def zygote_path(address: str) -> str:
    return os.path.join(ZYGOTE_DIR, hashlib.sha256(address.encode()).hexdigest()[:40])


def _set_name(name: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


# -- client side (runs in `start`) ------------------------------------------------------
def _ask(path: str, request: dict[str, object], fd: int, timeout: float) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        socket.send_fds(s, [json.dumps(request).encode()], [fd])
        reply = json.loads(s.recv(4096) or b"{}")
    finally:
        s.close()
    pid = int(reply.get("pid", 0))
    if pid <= 0:
        raise OSError(f"zygote: {reply.get('error', 'no pid')}")
    return pid


def _spawn_zygote(flags: Flags) -> None:
    from podshim.shim.start import self_command, spawn_detached

    cmd = ["-address", flags.address, "-namespace", flags.namespace, "zygote"]
    spawn_detached(self_command() + cmd)


def request_fork(flags: Flags, bundle: str, sock: _socket.socket, socket_path: str) -> int:
    """Have this containerd's zygote fork a daemon serving ``sock``; returns its pid.

    Raises:
        OSError: no zygote could be reached (the caller spawns the daemon itself).
    """
    path = zygote_path(flags.address)
    request = {
        "namespace": flags.namespace,
        "id": flags.id,
        "address": flags.address,
        "bundle": bundle,
        "socket": socket_path,
        "debug": flags.debug,
        "containerd_pid": os.getppid(),
    }
    try:
        return _ask(path, request, sock.fileno(), 10.0)
    except (OSError, ValueError):
        pass
    _spawn_zygote(flags)
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return _ask(path, request, sock.fileno(), 10.0)
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# -- the zygote itself -------------------------------------------------------------------
def _preload() -> None:
    import gc

    import podshim.api.cgroups.v1.metrics_pb2
    import podshim.api.cgroups.v2.metrics_pb2
    import podshim.cgroups.stats
    import podshim.host.namespaces.host
    import podshim.pod.pod
    import podshim.shim.daemon  # noqa: F401  (and everything it imports)

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
        from podshim.shim.daemon import serve

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
