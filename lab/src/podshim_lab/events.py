"""Forward one task event to containerd from synchronous code (the demo, the tests).

The shim itself publishes through its queued, retrying publisher; this is the small
one-shot version for code that wants containerd's answer at once.
"""

from __future__ import annotations

from google.protobuf import empty_pb2

from podshim.api.services.ttrpc.events.v1 import events_pb2
from podshim.task.events import EVENTS_SERVICE, NAMESPACE_METADATA_KEY
from podshim.ttrpc.client import call_sync

__all__ = ["forward_sync"]


def forward_sync(address: str, envelope: events_pb2.Envelope, timeout: float = 5.0) -> None:
    """Call ``Events/Forward`` with ``envelope`` on containerd's ttrpc socket ``address``.

    One call on a fresh connection, in the envelope's namespace (ttrpc metadata
    ``containerd-namespace-ttrpc``); no queue and no retry: the error kind containerd
    answers (``podshim.errors.InvalidArgument``, ...) is raised.
    """
    call_sync(
        address,
        EVENTS_SERVICE,
        "Forward",
        events_pb2.ForwardRequest(envelope=envelope),
        empty_pb2.Empty,
        metadata=((NAMESPACE_METADATA_KEY, envelope.namespace),),
        timeout=timeout,
    )
