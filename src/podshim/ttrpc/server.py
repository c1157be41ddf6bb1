"""asyncio ttrpc server over unix sockets, on top of the sans-IO :mod:`protocol`.

Every request runs in its own task, so a long ``Wait`` never holds up other calls on the
same connection; each response frame is written with a single ``transport.write``, which
makes it atomic. A peer whose framing breaks, or who vanishes mid-frame, loses only its
own connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from podshim import errors as errdefs
from podshim.ttrpc.codec import ProtocolError
from podshim.ttrpc.protocol import ErrorReply, IncomingRequest, ServerConnection
from podshim.ttrpc.services import CallContext, ServiceBinding

log = logging.getLogger("podshim.ttrpc.server")

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """SO_PEERCRED of a connected unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


def same_user(cred: PeerCred) -> bool:
    """The check containerd's ttrpc servers make: peer uid and gid equal ours."""
    return cred.uid == os.geteuid() and cred.gid == os.getegid()


PeerCheck = Callable[[PeerCred], bool]

#: Wraps every call: ``interceptor(request, proceed)`` must return ``await proceed()``'s
#: reply (or raise); it may observe the request (service, method, payload, metadata),
#: e.g. to trace it. The application plugs it in; this layer knows no service.
Interceptor = Callable[[IncomingRequest, Callable[[], Awaitable[bytes]]], Awaitable[bytes]]


class _Conn(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._state = ServerConnection()
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._cred = PeerCred(0, -1, -1)

    # asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        try:
            self._cred = peer_cred(sock)
        except OSError as exc:
            log.warning("ttrpc: cannot read peer credentials: %s", exc)
            transport.abort()
            return
        if not self._server.peer_check(self._cred):
            log.warning("ttrpc: rejecting peer pid=%d uid=%d gid=%d", *self._server_cred_tuple())
            transport.abort()
            return
        self._server._conns.add(self)
        self._server.activity.set()

    def _server_cred_tuple(self) -> tuple[int, int, int]:
        return self._cred.pid, self._cred.uid, self._cred.gid

    def data_received(self, data: bytes) -> None:
        try:
            items = self._state.receive(data)
        except ProtocolError as exc:
            log.warning("ttrpc: closing connection from pid %d: %s", self._cred.pid, exc)
            self.abort()
            return
        for item in items:
            if isinstance(item, ErrorReply):
                self._write(item.data)
            else:
                self._spawn(item)

    def eof_received(self) -> bool:
        try:
            self._state.eof()
        except ProtocolError as exc:
            log.info("ttrpc: peer pid %d left mid-frame: %s", self._cred.pid, exc)
        # Let in-flight calls finish writing? The peer cannot read them: close now.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self._server._conns:
            self._server._conns.discard(self)
            self._server.activity.set()
        for t in list(self._tasks):
            t.cancel()

    # ------------------------------------------------------------------------------
    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _spawn(self, req: IncomingRequest) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    async def wait_idle(self) -> None:
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def _handle(self, req: IncomingRequest) -> None:
        code: int = 0
        message = ""
        payload = b""
        try:
            intercept = self._server.interceptor
            if intercept is None:
                payload = await self._dispatch(req)
            else:
                payload = await intercept(req, lambda: self._dispatch(req))
        except asyncio.CancelledError:
            if self._transport is None or self._transport.is_closing():
                raise  # connection gone: nothing to answer
            code, message = errdefs.to_status(errdefs.Canceled("context canceled"))
        except Exception as exc:
            code, message = errdefs.to_status(exc)
        self._write(ServerConnection.reply(req.stream_id, payload, code, message))

    async def _dispatch(self, req: IncomingRequest) -> bytes:
        svc = self._server.services.get(req.service)
        if svc is None:
            raise errdefs.NotImplemented(f"service {req.service}")
        handler = svc.methods.get(req.method)
        if handler is None:
            raise errdefs.NotImplemented(f"method {req.method}")
        md: dict[str, tuple[str, ...]] = {}
        for k, v in req.metadata:
            md[k] = (*md.get(k, ()), v)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        ctx = CallContext(req.service, req.method, md, deadline, self._cred.pid, self._cred.uid)
        if deadline is None:
            return await handler(req.payload, ctx)
        try:
            async with asyncio.timeout_at(deadline):
                return await handler(req.payload, ctx)
        except TimeoutError:
            raise errdefs.DeadlineExceeded(
                f"{req.service}/{req.method}: context deadline exceeded"
            ) from None


class Server:
    """A ttrpc server. Register services, then :meth:`serve` on one or more sockets."""

    def __init__(
        self,
        services: Iterable[ServiceBinding] = (),
        *,
        peer_check: PeerCheck = same_user,
        interceptor: Interceptor | None = None,
    ) -> None:
        self.services: dict[str, ServiceBinding] = {}
        self.peer_check = peer_check
        self.interceptor = interceptor
        #: set whenever a connection opens or closes (the owner clears it)
        self.activity = asyncio.Event()
        self._conns: set[_Conn] = set()
        self._servers: list[asyncio.AbstractServer] = []
        for s in services:
            self.register(s)

    def register(self, binding: ServiceBinding) -> None:
        """Add a service; its name must be new."""
        if binding.name in self.services:
            raise ValueError(f"service {binding.name} already registered")
        self.services[binding.name] = binding

    @property
    def connections(self) -> int:
        """Open connections (for tests and diagnostics)."""
        return len(self._conns)

    async def serve(self, sock: socket.socket) -> None:
        """Start accepting on an already bound and listening unix socket."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        srv = await loop.create_unix_server(lambda: _Conn(self), sock=sock)
        self._servers.append(srv)

    async def serve_path(
        self, path: str, *, mode: int = 0o600, backlog: int = 128
    ) -> socket.socket:
        """Bind ``path`` (which must not exist), listen and serve; returns the socket."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, mode)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        await self.serve(sock)
        return sock

    async def shutdown(self, grace: float | None = 5.0) -> None:
        """Stop accepting, let in-flight calls finish (up to ``grace`` s), then close.

        ``grace=0`` is the immediate shutdown: in-flight calls are cancelled unanswered.
        """
        for srv in self._servers:
            srv.close()
        if grace:
            waits = [c.wait_idle() for c in list(self._conns)]
            if waits:
                try:
                    async with asyncio.timeout(grace):
                        await asyncio.gather(*waits)
                except TimeoutError:
                    log.warning("ttrpc: %d connection(s) still busy at shutdown", len(self._conns))
        for c in list(self._conns):
            c.abort()
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()
        # Let connection_lost run for the aborted transports.
        await asyncio.sleep(0)
