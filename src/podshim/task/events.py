"""Task events: from the shim to containerd through ttrpc ``Events/Forward``.

The shim reports task lifecycle changes (``TaskCreate``, ``TaskExit``, ...) by calling
``containerd.services.events.ttrpc.v1.Events/Forward`` on containerd's ttrpc socket (the
``TTRPC_ADDRESS`` the shim was started with). Tasks talk to a
:class:`Publisher` (the contract below); the real one is
``podshim.service.publisher.ForwardPublisher``, :class:`NullPublisher` runs without
containerd, and the tests record events with a fake that passes the same contract.

Contract shared by every publisher:

* ``publish(event)`` never blocks and never raises; the topic comes from the event's
  type (:data:`TOPICS`); events reach containerd strictly in the order ``publish`` was
  called (some may be dropped, none reordered).
* ``await flush(timeout)`` waits until every event published before the call has been
  delivered or dropped, and answers False if ``timeout`` passed first.
* ``await close(timeout)`` flushes, then stops; events published afterwards are dropped.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from podshim.api.events import task_pb2
from podshim.api.services.ttrpc.events.v1 import events_pb2

log = logging.getLogger("podshim.task.events")

#: Full name of containerd's ttrpc events service (method ``Forward``).
EVENTS_SERVICE: str = events_pb2.DESCRIPTOR.services_by_name["Events"].full_name
#: ttrpc metadata key naming the containerd namespace of a call.
NAMESPACE_METADATA_KEY = "containerd-namespace-ttrpc"

#: Topic of every event the shim sends, by message class (containerd's runtime topics).
TOPICS: dict[type[Message], str] = {
    task_pb2.TaskCreate: "/tasks/create",
    task_pb2.TaskStart: "/tasks/start",
    task_pb2.TaskDelete: "/tasks/delete",
    task_pb2.TaskExit: "/tasks/exit",
    task_pb2.TaskOOM: "/tasks/oom",
    task_pb2.TaskExecAdded: "/tasks/exec-added",
    task_pb2.TaskExecStarted: "/tasks/exec-started",
    task_pb2.TaskPaused: "/tasks/paused",
    task_pb2.TaskResumed: "/tasks/resumed",
    task_pb2.TaskCheckpointed: "/tasks/checkpointed",
}


def topic_for(event: Message) -> str | None:
    """The topic of ``event`` (exact type lookup in :data:`TOPICS`), or None if unknown."""
    return TOPICS.get(type(event))


def envelope_for(
    event: Message, namespace: str, *, topic: str | None = None, now_ns: int | None = None
) -> events_pb2.Envelope:
    """Wrap ``event`` the way containerd expects it in ``Events/Forward``.

    The Any's ``type_url`` is the bare full name (``containerd.events.TaskExit``, no
    ``type.googleapis.com/`` prefix) because containerd resolves it in its own type
    registry. ``now_ns`` (default: the current wall-clock time) is the envelope's
    timestamp; containerd rejects a zero timestamp, so it is never zero.

    Raises:
        TypeError: ``topic`` is None and the event type has no entry in :data:`TOPICS`.
    """
    if topic is None:
        topic = topic_for(event)
        if topic is None:
            raise TypeError(f"no event topic for {type(event).__name__}")
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(max(now_ns if now_ns is not None else time.time_ns(), 1))
    return events_pb2.Envelope(
        timestamp=ts,
        namespace=namespace,
        topic=topic,
        event=any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString()),
    )


class Publisher(Protocol):
    """Where the shim sends task events. See the module docstring for the contract."""

    def publish(self, event: Message) -> None:
        """Queue ``event``; never blocks, never raises; order of calls is kept."""
        ...

    async def flush(self, timeout: float) -> bool:
        """Wait until all events queued so far are delivered or dropped; False on timeout."""
        ...

    async def close(self, timeout: float) -> None:
        """Flush (up to ``timeout`` s), then stop; later events are dropped."""
        ...


class NullPublisher:
    """A :class:`Publisher` that discards every event (no containerd to talk to)."""

    def publish(self, event: Message) -> None:
        """Discard ``event``."""

    async def flush(self, timeout: float) -> bool:
        """Nothing is ever pending: True."""
        return True

    async def close(self, timeout: float) -> None:
        """Nothing to stop."""
