"""Binding protobuf service descriptors to Python handlers.

A service implementation is any object with one method per RPC, named as in the .proto
(``State``, ``Create``, ...), taking the decoded request message and a
:class:`CallContext` and returning the response message. :func:`bind` reads the
request/response types from the generated descriptor, so no per-service glue is written
by hand.

A method is ``async`` (it may wait), or a plain function that answers at once (it must
not block: e.g. ``State``, which only reads). The server runs a plain one inline, as the
request is read, with no asyncio task of its own (see :class:`InlineHandler`).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from podshim import errors as errdefs


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a handler knows about its call besides the request."""

    service: str
    method: str
    metadata: Mapping[str, tuple[str, ...]]
    #: event-loop time by which the caller gives up (``timeout_nano``), or None
    deadline: float | None = None
    peer_pid: int = 0
    peer_uid: int = -1

    def get(self, key: str) -> str | None:
        """The first metadata value for ``key``, e.g. ``containerd-namespace-ttrpc``."""
        values = self.metadata.get(key)
        return values[0] if values else None


RawHandler = Callable[[bytes, CallContext], Awaitable[bytes]]
#: a plain (not async) handler: request bytes in, answer bytes out, at once
SyncRawHandler = Callable[[bytes, CallContext], bytes]


class InlineHandler:
    """The :data:`RawHandler` of a plain (not ``async``) method: awaiting it runs
    :attr:`inline`, which a server may also call directly (no task, no coroutine)."""

    __slots__ = ("inline",)

    def __init__(self, inline: SyncRawHandler) -> None:
        self.inline = inline

    async def __call__(self, payload: bytes, ctx: CallContext) -> bytes:
        return self.inline(payload, ctx)


@dataclass
class ServiceBinding:
    """A fully-qualified service name and its raw (bytes in, bytes out) methods."""

    name: str
    methods: dict[str, RawHandler] = field(default_factory=dict)


def _undecodable(exc: DecodeError) -> errdefs.Internal:
    # Go's ttrpc answers an undecodable payload with INTERNAL; we match it.
    return errdefs.Internal(f"ttrpc: error unmarshalling payload: {exc}")


def _raw(fn: Callable[[Any, CallContext], Any], in_cls: type[Message]) -> RawHandler:
    parse = in_cls.FromString
    if not inspect.iscoroutinefunction(fn):

        def inline(payload: bytes, ctx: CallContext) -> bytes:
            try:
                req = parse(payload)
            except DecodeError as exc:
                raise _undecodable(exc) from None
            resp: Message = fn(req, ctx)
            return resp.SerializeToString()

        return InlineHandler(inline)

    async def handler(payload: bytes, ctx: CallContext) -> bytes:
        try:
            req = parse(payload)
        except DecodeError as exc:
            raise _undecodable(exc) from None
        resp: Message = await fn(req, ctx)
        return resp.SerializeToString()

    return handler


def bind(descriptor: ServiceDescriptor, impl: object, *, partial: bool = False) -> ServiceBinding:
    """Bind ``impl``'s methods to every RPC of ``descriptor``.

    Args:
        descriptor: e.g. ``shim_pb2.DESCRIPTOR.services_by_name["Task"]``.
        impl: the object with one method per RPC (``async``, or plain for one that
            answers at once and never blocks).
        partial: when True, RPCs ``impl`` lacks are answered UNIMPLEMENTED instead of
            raising here (useful for test doubles).

    Raises:
        TypeError: ``impl`` lacks a method and ``partial`` is False.
    """
    binding = ServiceBinding(descriptor.full_name)
    for m in descriptor.methods:
        fn = getattr(impl, m.name, None)
        if fn is None:
            if partial:
                continue
            raise TypeError(
                f"{type(impl).__name__} does not implement {descriptor.full_name}.{m.name}"
            )
        in_cls = message_factory.GetMessageClass(m.input_type)
        binding.methods[m.name] = _raw(fn, in_cls)
    return binding
