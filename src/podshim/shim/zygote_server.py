"""The zygote process itself (the ``zygote`` action); see :mod:`podshim.shim.zygote`.

It trusts no peer: only root may connect (SO_PEERCRED); every request is checked (JSON
types, required fields, ids, the zygote's own containerd address, an existing bundle, and
a socket path that is the passed listening socket's file in the shim socket directory)
and a bad one is answered with an error; one poll loop serves every connection, so a
client that sends nothing (it is dropped after :data:`REQUEST_SECONDS`) delays nobody.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import time

from podshim.oci.ids import valid_id
from podshim.shim.daemon import serve
from podshim.shim.flags import Flags
from podshim.shim.spawn import LISTEN_FD
from podshim.shim.zygote import GO, PROTOCOL, REQUEST_FIELDS, is_socket_file_of, zygote_path

IDLE_SECONDS = float(os.environ.get("PODSHIM_ZYGOTE_IDLE", "30"))
#: a connection must deliver its request within this long, or it is dropped
REQUEST_SECONDS = 5.0
#: a forked daemon waits this long for ``start``'s go, then exits without serving
GO_SECONDS = 60.0
#: connections waiting for their request; beyond this the oldest is dropped
MAX_PENDING = 64
#: a request is one line in one message, at most this long
MAX_REQUEST = 65536
_UCRED = struct.Struct("3i")  # pid, uid, gid


class BadRequest(ValueError):
    """The request is refused; the message (sent back as the error) says why."""


def peer_allowed(creds: tuple[int, int, int]) -> bool:
    """Whether the peer with SO_PEERCRED ``creds`` (pid, uid, gid) may ask for a daemon:
    root only (the daemon runs as root, on a socket and in a bundle the peer names)."""
    return creds[1] == 0


def peer_creds(conn: socket.socket) -> tuple[int, int, int]:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def check_request(req: object, fd: int, address: str) -> tuple[Flags, int]:
    """The daemon's flags and containerd's pid from request ``req`` (decoded JSON), which
    passed the listening socket ``fd``, sent to the zygote of containerd ``address``.

    Raises:
        BadRequest: anything is missing, of the wrong type or not as ``start`` sends it.
    """
    if not isinstance(req, dict):
        raise BadRequest("the request is not a JSON object")
    missing = sorted(REQUEST_FIELDS.keys() - req.keys())
    unknown = sorted(req.keys() - REQUEST_FIELDS.keys())
    if missing or unknown:
        raise BadRequest(f"missing fields {missing}, unknown fields {unknown}")
    for key, kind in REQUEST_FIELDS.items():
        if type(req[key]) is not kind:  # exact: a bool is no int here
            raise BadRequest(f"{key}: expected a {kind.__name__}")
    if req["v"] != PROTOCOL:
        raise BadRequest(f"v: this zygote speaks version {PROTOCOL}")
    if not valid_id(req["namespace"]) or not valid_id(req["id"]):
        raise BadRequest("namespace and id must be containerd identifiers")
    if req["address"] != address:
        raise BadRequest(f"address: this zygote serves {address}")
    bundle, path = req["bundle"], req["socket"]
    if not os.path.isabs(bundle) or os.path.normpath(bundle) != bundle or not os.path.isdir(bundle):
        raise BadRequest("bundle: not an absolute path of a directory")
    if req["containerd_pid"] <= 0:
        raise BadRequest("containerd_pid: not a pid")
    if not is_socket_file_of(path, fd):
        raise BadRequest("socket: not the passed listening socket's file in the socket directory")
    f = Flags()
    f.namespace, f.id, f.address, f.bundle = req["namespace"], req["id"], address, bundle
    f.socket, f.debug = path, req["debug"]
    return f, req["containerd_pid"]


def _set_name(name: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _preload() -> None:
    import gc

    import podshim.api.cgroups.v1.metrics_pb2
    import podshim.api.cgroups.v2.metrics_pb2
    import podshim.cgroups.stats
    import podshim.host.namespaces.host  # the default host kind, imported late
    import podshim.host.uvm.agentclient
    import podshim.host.uvm.host  # VM pods: ~27 ms of RunPodSandbox, 2.6 MB shared here
    import podshim.host.uvm.workload  # their first container: ~14 ms
    import podshim.service.sandbox_api  # noqa: F401  (pod scope's Sandbox service, imported late)

    gc.collect()
    gc.freeze()  # keep the GC from touching (and so copying) the parent's objects


def _send_line(conn: socket.socket, answer: dict[str, object]) -> None:
    """Answer (never blocks, never raises: a peer that left gets nothing)."""
    with contextlib.suppress(OSError):
        conn.send(json.dumps(answer).encode() + b"\n", socket.MSG_DONTWAIT)


def _hung_up(conn: socket.socket) -> bool:
    """The peer closed its end (a ``start`` that gave up on its request)."""
    p = select.poll()
    p.register(conn.fileno(), select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


def await_go(conn: socket.socket, timeout: float) -> bool:
    """In the forked daemon: whether ``start`` sent the go (False: it closed, or sent
    nothing within ``timeout``). On a timeout the read side is shut down first: from then
    on ``start``'s send fails, so a go is either read here or known to ``start`` as failed."""
    try:
        conn.settimeout(timeout)
        return conn.recv(1) == GO
    except TimeoutError:
        pass
    except OSError:
        return False
    try:
        conn.shutdown(socket.SHUT_RD)
        conn.setblocking(False)
        return conn.recv(1) == GO  # a go that arrived before the shutdown
    except OSError:
        return False


def _child(
    conn: socket.socket, fd: int, flags: Flags, others: list[socket.socket], fds: list[int]
) -> None:
    """In the forked child: become the daemon once ``start`` says go. Never returns."""
    rc = 1
    try:
        for other in others:  # the zygote's listener and other clients' connections
            other.close()
        for other_fd in fds:  # pidfds
            os.close(other_fd)
        os.setsid()
        if not await_go(conn, GO_SECONDS):
            rc = 0  # start gave up on us and serves the socket otherwise: leave it alone
            return
        conn.close()
        if fd != LISTEN_FD:
            os.dup2(fd, LISTEN_FD)
            os.close(fd)
        _set_name("containerd-shim")
        rc = serve(flags)
    finally:
        os._exit(rc)


class _Zygote:
    """The zygote's state: its listener, connections waiting for their request, children."""

    def __init__(self, lst: socket.socket, address: str) -> None:
        self.lst = lst
        self.address = address
        self.children: set[int] = set()
        self.exits: dict[int, int] = {}  # pidfd -> pid of each child: readable once it exited
        self.watch: int | None = None  # pidfd of containerd
        self.pending: dict[int, tuple[socket.socket, float]] = {}  # fd -> (conn, deadline)
        self.poller = select.poll()  # not select(): pidfds of many children exceed FD_SETSIZE
        lst.setblocking(False)
        self.poller.register(lst.fileno(), select.POLLIN)

    def loop(self) -> int:
        idle_since = time.monotonic()
        while True:
            for pid in self.children - set(self.exits.values()):
                try:
                    fd = os.pidfd_open(pid)
                except OSError:  # no pidfd for it: reaped below by a periodic check
                    continue
                self.exits[fd] = pid
                self.poller.register(fd, select.POLLIN)
            had_children = bool(self.children)
            unwatched = len(self.children) > len(self.exits)
            ready = {fd for fd, _ in self.poller.poll(self._timeout(unwatched, idle_since))}
            for fd in ready & self.exits.keys():
                pid = self.exits.pop(fd)
                self.poller.unregister(fd)
                os.close(fd)
                os.waitpid(pid, 0)  # it has exited: this does not block
                self.children.discard(pid)
            if unwatched:
                _reap_unwatched(self.children, set(self.exits.values()))
            if self.watch is not None and self.watch in ready:
                return 0  # containerd exited
            for fd in [fd for fd in self.pending if fd in ready]:  # in the order they came
                conn, _ = self._drop(fd)
                with conn:
                    self._serve(conn)
            if self.lst.fileno() in ready:
                self._accept()
            now = time.monotonic()
            for fd in [fd for fd, (_, deadline) in self.pending.items() if deadline <= now]:
                conn, _ = self._drop(fd)
                with conn:
                    _send_line(conn, {"error": f"no request within {REQUEST_SECONDS:.0f}s"})
            if self.children or had_children or self.pending:  # idle from the last child's exit
                idle_since = now
            elif now - idle_since >= IDLE_SECONDS:
                return 0

    def _timeout(self, unwatched: bool, idle_since: float) -> int | None:
        """How long to poll, in ms (None: until an event)."""
        now = time.monotonic()
        if unwatched:
            timeout: float | None = 1.0
        elif self.children:
            timeout = None  # only an event wakes us
        else:
            timeout = max(0.0, IDLE_SECONDS - (now - idle_since))
        if self.pending:
            first = max(0.0, min(d for _, d in self.pending.values()) - now)
            timeout = first if timeout is None else min(timeout, first)
        return None if timeout is None else int(timeout * 1000) + 1

    def _drop(self, fd: int) -> tuple[socket.socket, float]:
        self.poller.unregister(fd)
        return self.pending.pop(fd)

    def _accept(self) -> None:
        for _ in range(MAX_PENDING):
            try:
                conn, _ = self.lst.accept()
            except OSError:  # none left (or out of fds: the next poll retries)
                return
            conn.setblocking(False)
            try:
                creds = peer_creds(conn)
            except OSError:
                conn.close()
                continue
            if not peer_allowed(creds):
                with conn:
                    _send_line(conn, {"error": f"refused: peer uid {creds[1]} is not root"})
                continue
            if len(self.pending) >= MAX_PENDING:
                old, _ = self._drop(next(iter(self.pending)))
                old.close()
            self.pending[conn.fileno()] = (conn, time.monotonic() + REQUEST_SECONDS)
            self.poller.register(conn.fileno(), select.POLLIN)

    def _serve(self, conn: socket.socket) -> None:
        """Answer one request: fork its daemon or say what is wrong; never raises."""
        try:
            msg, fds, msg_flags, _ = socket.recv_fds(conn, MAX_REQUEST, 1)
        except OSError:
            return
        try:
            if not msg and not fds:
                return  # the peer left without a request
            if msg_flags & socket.MSG_CTRUNC or len(fds) != 1:
                raise BadRequest("pass exactly one socket")
            if not msg.endswith(b"\n"):
                raise BadRequest("the request must be one line, sent in one message")
            try:
                req = json.loads(msg)
            except ValueError:
                raise BadRequest("the request is not JSON") from None
            flags, containerd_pid = check_request(req, fds[0], self.address)
            if _hung_up(conn):
                return  # its start gave up (and serves the socket otherwise): fork nothing
            self._fork(conn, fds[0], flags, containerd_pid)
        except BadRequest as exc:
            _send_line(conn, {"error": str(exc)})
        except Exception as exc:  # one request must not end the zygote
            _send_line(conn, {"error": f"zygote: {exc!r}"})
        finally:
            for fd in fds:
                os.close(fd)

    def _fork(self, conn: socket.socket, fd: int, flags: Flags, containerd_pid: int) -> None:
        others = [self.lst] + [c for c, _ in self.pending.values()]
        fds = list(self.exits) + ([] if self.watch is None else [self.watch])
        pid = os.fork()
        if pid == 0:
            _child(conn, fd, flags, others, fds)
        self.children.add(pid)
        _send_line(conn, {"v": PROTOCOL, "pid": pid})
        if self.watch is None:
            with contextlib.suppress(OSError):
                self.watch = os.pidfd_open(containerd_pid)
                self.poller.register(self.watch, select.POLLIN)

    def close(self) -> None:
        for conn, _ in self.pending.values():
            conn.close()
        for fd in list(self.exits) + ([] if self.watch is None else [self.watch]):
            os.close(fd)


def _bind(path: str) -> socket.socket | None:
    """Listen at ``path``; None when another zygote does. Bound and listening under a
    temporary name first, then linked into place (as ``start`` does for shim sockets): a
    ``start`` never finds ``path`` refusing connections (it would spawn another zygote)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        s.bind(tmp)
        os.chmod(tmp, 0o600)
        s.listen(64)
        try:
            for _ in range(50):
                try:
                    os.link(tmp, path)
                    return s
                except FileExistsError:
                    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        probe.connect(path)
                        s.close()
                        return None  # another zygote serves this containerd
                    except OSError:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)  # stale
                    finally:
                        probe.close()
            raise OSError(f"cannot bind {path}")
        finally:
            os.unlink(tmp)
    except BaseException:
        s.close()
        raise


def run(flags: Flags) -> int:
    """The ``zygote`` action."""
    _set_name("podshim-zygote")
    _preload()
    path = zygote_path(flags.address)
    lst = _bind(path)
    if lst is None:
        return 0
    ino = os.stat(path).st_ino
    zygote = _Zygote(lst, flags.address)
    try:
        return zygote.loop()
    finally:
        zygote.close()
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
