"""From a decoded request to its handler's answer, for one connection of a server.

:class:`Dispatcher` finds the handler of a request, gives the call its
:class:`~podshim.ttrpc.services.CallContext`, runs the handler under the caller's
deadline (``timeout_nano``), and answers plain methods (an
:class:`~podshim.ttrpc.services.InlineHandler`) at once, without a task.

Calls without a deadline share their context with the calls of the same service, method
and metadata (a peer sends few kinds: containerd one per namespace), so most calls make
none: contexts are immutable, their metadata a read-only view.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import MappingProxyType

from podshim import errors as errdefs
from podshim.ttrpc.protocol import IncomingRequest, Metadata, ServerConnection, encode_response
from podshim.ttrpc.services import CallContext, InlineHandler, ServiceBinding

#: call contexts a connection keeps for reuse (one per service, method and metadata)
CONTEXT_CACHE_SIZE = 64


class Dispatcher:
    """Dispatches the calls of one connection to ``services``."""

    def __init__(
        self,
        services: Mapping[str, ServiceBinding],
        loop: asyncio.AbstractEventLoop,
        peer_pid: int = 0,
        peer_uid: int = -1,
    ) -> None:
        self._services = services
        self._loop = loop
        self._pid = peer_pid
        self._uid = peer_uid
        self._contexts: dict[tuple[str, str, Metadata], CallContext] = {}

    def context(self, req: IncomingRequest) -> CallContext:
        """The CallContext of ``req``: a shared one when it has no deadline."""
        if req.timeout_nano > 0:
            return self._new_context(req, self._loop.time() + req.timeout_nano / 1e9)
        key = (req.service, req.method, req.metadata)
        ctx = self._contexts.get(key)
        if ctx is None:
            if len(self._contexts) >= CONTEXT_CACHE_SIZE:
                self._contexts.clear()
            ctx = self._contexts[key] = self._new_context(req, None)
        return ctx

    def _new_context(self, req: IncomingRequest, deadline: float | None) -> CallContext:
        md: dict[str, tuple[str, ...]] = {}
        for k, v in req.metadata:
            md[k] = (*md.get(k, ()), v)
        return CallContext(
            req.service, req.method, MappingProxyType(md), deadline, self._pid, self._uid
        )

    def answer_inline(self, req: IncomingRequest) -> bytes | None:
        """The answer frame of ``req`` when its method is plain (run now), else None."""
        svc = self._services.get(req.service)
        handler = svc.methods.get(req.method) if svc is not None else None
        if type(handler) is not InlineHandler:
            return None
        try:
            return encode_response(req.stream_id, handler.inline(req.payload, self.context(req)))
        except asyncio.CancelledError:
            exc: BaseException = errdefs.Canceled("context canceled")
        except TimeoutError as timeout:  # as dispatch maps it under a deadline
            exc = _deadline_exceeded(req) if req.timeout_nano > 0 else timeout
        except Exception as other:
            exc = other
        code, message = errdefs.to_status(exc)
        return ServerConnection.reply(req.stream_id, b"", code, message)

    async def dispatch(self, req: IncomingRequest) -> bytes:
        """Run the handler of ``req`` (in the caller's task); its answer payload."""
        svc = self._services.get(req.service)
        if svc is None:
            raise errdefs.NotImplemented(f"service {req.service}")
        handler = svc.methods.get(req.method)
        if handler is None:
            raise errdefs.NotImplemented(f"method {req.method}")
        ctx = self.context(req)
        deadline = ctx.deadline
        if deadline is None:
            return await handler(req.payload, ctx)
        try:
            async with asyncio.timeout_at(deadline):
                return await handler(req.payload, ctx)
        except TimeoutError:
            raise _deadline_exceeded(req) from None


def _deadline_exceeded(req: IncomingRequest) -> errdefs.DeadlineExceeded:
    return errdefs.DeadlineExceeded(f"{req.service}/{req.method}: context deadline exceeded")
