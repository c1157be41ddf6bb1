"""The proxy daemon's public socket: a peer-credentials check in front of its gRPC server.

grpcio accepts connections in its own core and tells a handler nothing of the peer of a
unix socket, so the daemon's gRPC server listens on a private socket (in its 0700 home)
and this front door owns the socket containerd is configured with: it reads each
client's ``SO_PEERCRED`` as it is accepted, closes the connection of any client that is
not root (logged, before a byte is read), and relays the bytes of the others to the
private socket both ways, with flow control (a side that does not read slows the other
down instead of being buffered for). containerd keeps one connection per proxy plugin,
so the check costs once, not per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import cast

log = logging.getLogger("podshim.frontdoor")

_UCRED = struct.Struct("3i")
#: a side's unsent bytes above which the other side is no longer read
HIGH_WATER = 1 << 20


def peer_ids(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of a connected unix socket's peer."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def root_only(pid: int, uid: int, gid: int) -> bool:
    return uid == 0


class _Half(asyncio.Protocol):
    """One side of a relayed connection; ``peer`` is the other side's transport."""

    def __init__(
        self, on_close: Callable[[], None], on_made: Callable[[_Half], None] | None = None
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # what arrived before the other side was there
        self._on_close = on_close
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.can_write_eof():
            self.peer.write_eof()
            return True  # half-close: the other direction may still carry answers
        return False

    def pause_writing(self) -> None:  # our unsent bytes are many: stop reading the peer
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_close()


class FrontDoor:
    """Accepts on ``path``, checks each peer with ``allow``, relays to ``backend``."""

    def __init__(
        self, path: str, backend: str, allow: Callable[[int, int, int], bool] = root_only
    ) -> None:
        self.path = path
        self.backend = backend
        self.allow = allow
        self.refused = 0
        self._server: asyncio.AbstractServer | None = None
        self._pairs: set[tuple[_Half, _Half]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # a dead daemon's: ours is locked
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._server = await asyncio.get_running_loop().create_unix_server(
            self._accepted, sock=sock
        )

    def _accepted(self) -> _Half:
        pair: list[_Half] = []

        def close() -> None:
            for half in pair:
                if half.transport is not None and not half.transport.is_closing():
                    half.transport.close()
            if len(pair) == 2:
                self._pairs.discard((pair[0], pair[1]))

        client = _Half(close, lambda half: self._check(half, pair, close))
        pair.append(client)
        return client

    def _check(self, client: _Half, pair: list[_Half], close: Callable[[], None]) -> None:
        transport = client.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        try:
            ids = peer_ids(sock)
        except OSError:
            ids = (0, -1, -1)
        if not self.allow(*ids):
            self.refused += 1
            log.warning("refused a client of %s: pid %d uid %d gid %d is not root", self.path, *ids)
            transport.abort()
            return
        transport.pause_reading()  # until the backend is connected
        asyncio.get_running_loop().create_task(self._connect(client, pair, close))

    async def _connect(self, client: _Half, pair: list[_Half], close: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        backend = _Half(close)
        try:
            await loop.create_unix_connection(lambda: backend, self.backend)
        except OSError as exc:
            log.error("cannot reach the controller at %s: %s", self.backend, exc)
            close()
            return
        assert client.transport is not None and backend.transport is not None
        pair.append(backend)
        self._pairs.add((client, backend))
        client.peer, backend.peer = backend.transport, client.transport
        for data in client.pending:
            backend.transport.write(data)
        client.pending.clear()
        if client.transport.is_closing():
            close()
        else:
            client.transport.resume_reading()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for a, b in list(self._pairs):
            for half in (a, b):
                if half.transport is not None:
                    half.transport.abort()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
