"""asyncio ttrpc client: many concurrent calls on one connection.

The connection is opened on the first call and again on the first call after the peer
closed it (reconnect on demand). When the peer closes, every pending call fails with
:class:`~podshim.errors.Unavailable` (``ttrpc: closed``), like Go's ``ErrClosed``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from podshim import errors as errdefs
from podshim.ttrpc.codec import ProtocolError
from podshim.ttrpc.protocol import ClientConnection, IncomingResponse, Metadata

log = logging.getLogger("podshim.ttrpc.client")

M = TypeVar("M", bound=Message)


class _ClientProto(asyncio.Protocol):
    def __init__(self) -> None:
        self.state = ClientConnection()
        self.pending: dict[int, asyncio.Future[IncomingResponse]] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            responses = self.state.receive(data)
        except ProtocolError as exc:
            log.warning("ttrpc client: bad framing from server: %s", exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for r in responses:
            fut = self.pending.pop(r.stream_id, None)
            if fut is None:
                log.debug("ttrpc client: response for unknown stream %d dropped", r.stream_id)
            elif not fut.done():
                fut.set_result(r)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(errdefs.Unavailable("ttrpc: closed"))


class Client:
    """A ttrpc client for one unix socket path.

    Args:
        path: the socket path (a ``unix://`` prefix is accepted).
        metadata: sent with every call (e.g. ``containerd-namespace-ttrpc``).
        timeout: default per-call timeout in seconds (None: no deadline).
    """

    def __init__(self, path: str, *, metadata: Metadata = (), timeout: float | None = None) -> None:
        self.path = path.removeprefix("unix://")
        self.metadata = metadata
        self.timeout = timeout
        self._proto: _ClientProto | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _ClientProto:
        if self._proto is not None and not self._proto.closed:
            return self._proto
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is None or self._proto.closed:
                loop = asyncio.get_running_loop()
                try:
                    _, proto = await loop.create_unix_connection(_ClientProto, self.path)
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    raise errdefs.Unavailable(f"ttrpc: dial {self.path}: {exc.strerror}") from None
                self._proto = proto
            return self._proto

    async def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> bytes:
        """Call ``service/method`` with an encoded request; return the encoded reply.

        Raises:
            ShimError: the error kind the server answered with; DeadlineExceeded when the
                timeout passes first; Unavailable when the connection is lost.
        """
        timeout = self.timeout if timeout is None else timeout
        proto = await self._connection()
        timeout_nano = int(timeout * 1e9) if timeout else 0
        try:
            sid, data = proto.state.request(
                service, method, payload, timeout_nano, self.metadata + metadata
            )
        except ValueError as exc:
            raise errdefs.ResourceExhausted(str(exc)) from None
        fut: asyncio.Future[IncomingResponse] = asyncio.get_running_loop().create_future()
        proto.pending[sid] = fut
        assert proto.transport is not None
        proto.transport.write(data)
        try:
            async with asyncio.timeout(timeout):
                resp = await fut
        except TimeoutError:
            raise errdefs.DeadlineExceeded(
                f"{service}/{method}: context deadline exceeded"
            ) from None
        finally:
            proto.pending.pop(sid, None)
        if resp.code:
            raise errdefs.from_status(resp.code, resp.message)
        return resp.payload

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> M:
        """Call with protobuf messages. See :meth:`call_raw`."""
        raw = await self.call_raw(
            service, method, request.SerializeToString(), timeout=timeout, metadata=metadata
        )
        out = response_type()
        try:
            out.ParseFromString(raw)
        except DecodeError as exc:
            raise errdefs.Internal(f"{service}/{method}: undecodable response: {exc}") from None
        return out

    async def close(self) -> None:
        """Close the connection; pending calls fail with Unavailable."""
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
            await asyncio.sleep(0)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def call_sync(
    path: str,
    service: str,
    method: str,
    request: Message,
    response_type: type[M],
    *,
    metadata: Metadata = (),
    timeout: float | None = None,
) -> M:
    """One unary call on a fresh connection, from synchronous code (the CLI, the demo,
    tests). Raises what :meth:`Client.call` raises."""

    async def go() -> M:
        async with Client(path, metadata=metadata, timeout=timeout) as client:
            return await client.call(service, method, request, response_type)

    return asyncio.run(go())
