"""The Controller served over gRPC (grpcio's asyncio server), on a private unix socket.

Imported only by the proxy daemon (``podshim daemon``): grpcio is not needed by the
shim's ``start``, ``delete`` or serving paths. No generated gRPC code: each method of
our ``Controller`` descriptor gets a handler that decodes its request with the generated
message class, passes the call's containerd namespace (gRPC metadata
``containerd-namespace``, as containerd's namespaces package sends it) and maps podshim's
errors to gRPC status codes with the one mapping (:func:`podshim.errors.to_status`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import message_factory
from google.protobuf.message import Message

from podshim import errors as errdefs
from podshim.api.services.sandbox.v1 import sandbox_pb2 as pb
from podshim.service.controller import Controller

# before grpc is imported: its fork handlers are not wanted (pods fork children that
# only make namespaces and exec; they never touch grpc)
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
import grpc  # type: ignore[import-untyped,unused-ignore]
from grpc import aio  # type: ignore[import-untyped,unused-ignore]

log = logging.getLogger("podshim.grpcctl")
# grpc's own debug lines (one per call) would drown a debug log
logging.getLogger("grpc").setLevel(logging.INFO)

#: gRPC metadata key of the containerd namespace of a call
NAMESPACE_KEY = "containerd-namespace"
_STATUS = {code.value[0]: code for code in grpc.StatusCode}

Method = Callable[[Any, str], Awaitable[Message]]


def _namespace(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_KEY:
            return str(value)
    return ""


def _handler(name: str, fn: Method) -> Callable[[Any, Any], Awaitable[Message]]:
    async def handle(request: Any, context: Any) -> Message:
        try:
            return await fn(request, _namespace(context))
        except Exception as exc:
            code, message = errdefs.to_status(exc)
            if not isinstance(exc, errdefs.ShimError):
                log.error("Controller.%s failed", name, exc_info=exc)
        await context.abort(_STATUS.get(int(code), grpc.StatusCode.UNKNOWN), message)
        raise AssertionError("unreachable: abort raises")

    return handle


def generic_handler(controller: Controller) -> Any:
    """The Controller service of ``controller`` as a grpcio generic handler."""
    service = pb.DESCRIPTOR.services_by_name["Controller"]
    methods: dict[str, Any] = {}
    for m in service.methods:
        in_cls = message_factory.GetMessageClass(m.input_type)
        out_cls = message_factory.GetMessageClass(m.output_type)
        methods[m.name] = grpc.unary_unary_rpc_method_handler(
            _handler(m.name, getattr(controller, m.name)),
            request_deserializer=in_cls.FromString,
            response_serializer=out_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, methods)


async def start(controller: Controller, path: str) -> Any:
    """Serve ``controller`` on the unix socket ``path``; returns the started server
    (``await server.stop(grace)`` ends it)."""
    server = aio.server()
    server.add_generic_rpc_handlers((generic_handler(controller),))
    if not server.add_insecure_port(f"unix:{path}"):
        raise OSError(f"gRPC: cannot listen on {path}")
    await server.start()
    return server
