"""asyncio ttrpc server over unix sockets, on top of the sans-IO :mod:`protocol`.

Every request runs in its own task, so a long ``Wait`` never holds up other calls on the
same connection; a method bound as a plain function (one that answers at once, e.g.
``State``: :class:`~podshim.ttrpc.services.InlineHandler`) runs inline instead, as its
request is read, unless an interceptor is plugged in, answers are waiting for the peer
to read, or an earlier request of the same read got a task (calls start in the order
they arrived). Response frames are never split or interleaved: those answered in one
turn of the event loop are joined, in order, into one ``transport.write`` at the end of
the turn (one send for many pipelined answers, not one each). A peer whose framing
breaks, or who vanishes mid-frame, loses only its own connection.

Each connection is bounded (:class:`Limits`): at most ``max_in_flight`` calls (and
``max_in_flight_bytes`` of their requests) run at once, and answers wait in their calls
while more than ``max_queued_bytes`` are unsent (joined ones included: they are written
at once when they would pass it). Past either bound the socket is no longer read
(``pause_reading``) until calls finish and the peer reads its answers, so a peer that
pipelines calls without reading answers is slowed down, not buffered for. A header
declaring a body the codec will not even skip (over ``codec.MAX_SKIP``) and a frame left
unfinished for ``frame_timeout`` seconds close the connection; a connection idle
*between* frames is never closed here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from podshim import errors as errdefs
from podshim.ttrpc.codec import ProtocolError
from podshim.ttrpc.dispatch import Dispatcher
from podshim.ttrpc.protocol import ErrorReply, IncomingRequest, ServerConnection
from podshim.ttrpc.services import ServiceBinding

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


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection bounds of a :class:`Server`.

    A connection's memory stays below about ``max_in_flight_bytes + max_queued_bytes +
    max_in_flight * (largest answer)``, plus the frame being received (at most 4 MiB) and
    the requests parsed from one socket read (256 KiB) that wait for a free slot.
    """

    #: calls running at once; past it the socket is not read until one finishes
    max_in_flight: int = 256
    #: request payload bytes of the running calls (one call is always let in)
    max_in_flight_bytes: int = 16 << 20
    #: unsent answer bytes (the transport's high-water mark); past it answers wait in
    #: their calls, which keep their slots, and the socket is not read
    max_queued_bytes: int = 1 << 20
    #: seconds a frame may stay unfinished with no byte arriving (time the server itself
    #: is not reading does not count); then the connection is closed
    frame_timeout: float = 30.0

    def __post_init__(self) -> None:
        if min(self.max_in_flight, self.max_in_flight_bytes, self.max_queued_bytes) < 1:
            raise ValueError(f"ttrpc limits must be positive: {self}")
        if not self.frame_timeout > 0:
            raise ValueError(f"ttrpc frame_timeout must be positive: {self.frame_timeout}")


class _Conn(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._state = ServerConnection()
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop  # set with the transport
        # The tasks of calls running, by a number of the connection's own.
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._next_call = 0
        self._dispatcher: Dispatcher  # set with the transport, once the peer is known
        self._cred = PeerCred(0, -1, -1)
        limits = server.limits
        self._max_in_flight = limits.max_in_flight
        self._max_in_flight_bytes = limits.max_in_flight_bytes
        self._max_queued_bytes = limits.max_queued_bytes
        self._frame_timeout = limits.frame_timeout
        # Backpressure: requests parsed while every slot is taken wait here, unread
        # bytes wait in the socket. The counters cover the calls started and unanswered.
        self._backlog: deque[IncomingRequest] = deque()
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._reading_paused = False
        self._writing_paused = False
        self._writable = asyncio.Event()  # set while the transport takes answers
        self._writable.set()
        self._warned_full = False
        # Answers of this loop turn, for _flush's one write (scheduled by the first).
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        # A frame left unfinished: when its last byte came, and the timer checking it.
        self._partial_since = 0.0
        self._frame_timer: asyncio.TimerHandle | None = None
        #: the most calls ever running at once
        self.peak_in_flight = 0
        #: the most answer bytes ever unsent, noted once over ``max_queued_bytes`` (the
        #: bound is about those; 0 while the transport never held that much)
        self.peak_queued_bytes = 0

    # asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._loop = asyncio.get_running_loop()
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
        transport.set_write_buffer_limits(high=self._max_queued_bytes)
        self._dispatcher = Dispatcher(
            self._server.services, self._loop, self._cred.pid, self._cred.uid
        )
        self._server._conns.add(self)
        self._server.activity.set()

    def _server_cred_tuple(self) -> tuple[int, int, int]:
        return self._cred.pid, self._cred.uid, self._cred.gid

    def data_received(self, data: bytes) -> None:
        state = self._state
        try:
            items = state.receive(data)
        except ProtocolError as exc:
            log.warning("ttrpc: closing connection from pid %d: %s", self._cred.pid, exc)
            self.abort()
            return
        inline = True  # no request of this read got a task yet
        for item in items:
            if isinstance(item, ErrorReply):
                self._write(item.data)  # small, and at most one read's worth unthrottled
            elif (
                self._backlog
                or self._in_flight >= self._max_in_flight
                or (
                    self._in_flight
                    and self._in_flight_bytes + len(item.payload) > self._max_in_flight_bytes
                )
            ):
                self._hold(item)
            elif not (inline and self._answer_inline(item)):
                inline = False
                self._start(item)
        if state.in_frame:
            self._frame_pending()

    def eof_received(self) -> bool:
        self._flush()  # answers made before the EOF leave ahead of the close, as ever
        try:
            self._state.eof()
        except ProtocolError as exc:
            log.info("ttrpc: peer pid %d left mid-frame: %s", self._cred.pid, exc)
        # Let in-flight calls finish writing? The peer cannot read them: close now.
        return False

    def pause_writing(self) -> None:
        # Over max_queued_bytes unsent: answers wait, and so do new requests.
        self._writing_paused = True
        self._writable.clear()
        self._note_queued()
        self._pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._writable.set()
        self._refill()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self._server._conns:
            self._server._conns.discard(self)
            self._server.activity.set()
        self._backlog.clear()
        self._out.clear()  # a _flush still due finds nothing
        self._out_bytes = 0
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()

    # ------------------------------------------------------------------------------
    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _write(self, data: bytes) -> None:
        """Queue one whole frame for this loop turn's write (see :meth:`_flush`)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes + transport.get_write_buffer_size() > self._max_queued_bytes:
            # Past the high-water mark with this frame: write now, so the transport
            # pauses us (pause_writing) before another answer is queued, as unjoined.
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write the queued frames, in order, in one ``transport.write``."""
        self._flush_handle = None  # one called early leaves a due one nothing to do
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            if self._writing_paused:  # past the high-water mark (only then can it peak)
                self._note_queued()

    def _note_queued(self) -> None:
        if self._transport is not None:
            queued = self._transport.get_write_buffer_size()
            if queued > self.peak_queued_bytes:
                self.peak_queued_bytes = queued

    def _hold(self, req: IncomingRequest) -> None:
        """Keep ``req`` until a call finishes (the bounds are reached); stop reading."""
        self._backlog.append(req)
        if not self._warned_full:
            self._warned_full = True
            log.info(
                "ttrpc: pid %d has %d calls (%d bytes) in flight: reading paused",
                self._cred.pid,
                self._in_flight,
                self._in_flight_bytes,
            )
        self._pause_reading()

    def _start(self, req: IncomingRequest) -> None:
        self._in_flight += 1
        self._in_flight_bytes += len(req.payload)
        if self._in_flight > self.peak_in_flight:
            self.peak_in_flight = self._in_flight
        # _handle takes its task out of _tasks itself (no done callback: one handle
        # less to run per call); connection_lost drops the ones cancelled unstarted.
        key = self._next_call
        self._next_call = key + 1
        self._tasks[key] = self._loop.create_task(self._handle(req, key))

    def _answer_inline(self, req: IncomingRequest) -> bool:
        """Answer ``req`` now if its method is plain (see :class:`Dispatcher`) and it may
        run inline (no interceptor, answers not held back); False: it needs a task."""
        if self._server.interceptor is not None or self._writing_paused:
            return False
        data = self._dispatcher.answer_inline(req)
        if data is None:
            return False
        self._write(data)
        return True

    def _refill(self) -> None:
        """Start held requests while the bounds allow; read again once none is held."""
        if self._transport is None or self._transport.is_closing():
            return
        backlog = self._backlog
        while (
            backlog
            and self._in_flight < self._max_in_flight
            and (
                not self._in_flight
                or self._in_flight_bytes + len(backlog[0].payload) <= self._max_in_flight_bytes
            )
        ):
            self._start(backlog.popleft())
        if not backlog and not self._writing_paused:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
            if self._state.in_frame:
                self._frame_pending()  # the peer's clock starts when we read again

    def _frame_pending(self) -> None:
        """A frame is unfinished after a read: (re)start its ``frame_timeout``."""
        loop = asyncio.get_running_loop()
        self._partial_since = loop.time()
        if self._frame_timer is None:
            self._frame_timer = loop.call_at(
                self._partial_since + self._frame_timeout, self._frame_expired
            )

    def _frame_expired(self) -> None:
        # One timer per connection, re-armed lazily: reads only note the time.
        self._frame_timer = None
        if self._reading_paused or not self._state.in_frame:
            return  # resumed reading restarts the clock; a finished frame needs none
        if self._transport is None or self._transport.is_closing():
            return
        due = self._partial_since + self._frame_timeout
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            self._frame_timer = loop.call_at(due, self._frame_expired)
            return
        log.warning(
            "ttrpc: closing connection from pid %d: no byte for %.1fs inside a frame",
            self._cred.pid,
            self._frame_timeout,
        )
        self.abort()

    @property
    def in_flight(self) -> int:
        """Calls started and not yet answered (for tests and diagnostics)."""
        return self._in_flight

    @property
    def in_flight_bytes(self) -> int:
        """Request payload bytes of those calls."""
        return self._in_flight_bytes

    @property
    def held(self) -> int:
        """Requests parsed but waiting for a slot (at most one read's worth)."""
        return len(self._backlog)

    @property
    def queued_bytes(self) -> int:
        """Answer bytes written (or joined for this turn's write), not taken by the socket."""
        t = self._transport
        return self._out_bytes + (t.get_write_buffer_size() if t is not None else 0)

    @property
    def reading_paused(self) -> bool:
        return self._reading_paused

    @property
    def busy(self) -> bool:
        return bool(self._tasks) or bool(self._backlog)

    async def wait_idle(self) -> None:
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))
        self._flush()  # the last answers are in the transport before any abort

    async def _handle(self, req: IncomingRequest, key: int) -> None:
        code: int = 0
        message = ""
        payload = b""
        try:
            try:
                intercept = self._server.interceptor
                dispatch = self._dispatcher.dispatch
                if intercept is None:
                    payload = await dispatch(req)
                else:
                    payload = await intercept(req, lambda: dispatch(req))
            except asyncio.CancelledError:
                if self._transport is None or self._transport.is_closing():
                    raise  # connection gone: nothing to answer
                code, message = errdefs.to_status(errdefs.Canceled("context canceled"))
            except Exception as exc:
                code, message = errdefs.to_status(exc)
            data = ServerConnection.reply(req.stream_id, payload, code, message)
            payload = b""  # only the frame waits below
            while self._writing_paused:  # the answer waits here, holding its slot
                await self._writable.wait()
            self._write(data)
        finally:
            self._tasks.pop(key, None)
            self._in_flight -= 1
            self._in_flight_bytes -= len(req.payload)
            if self._backlog or self._reading_paused:
                self._refill()


class Server:
    """A ttrpc server. Register services, then :meth:`serve` on one or more sockets."""

    def __init__(
        self,
        services: Iterable[ServiceBinding] = (),
        *,
        peer_check: PeerCheck = same_user,
        interceptor: Interceptor | None = None,
        limits: Limits = Limits(),
    ) -> None:
        self.services: dict[str, ServiceBinding] = {}
        self.peer_check = peer_check
        self.interceptor = interceptor
        #: bounds of each connection (read when a connection opens)
        self.limits = limits
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
