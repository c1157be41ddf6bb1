"""Delivery of task events to containerd: ``Events/Forward`` over ttrpc, in order,
surviving containerd restarts (a :class:`~podshim.task.events.Publisher`)."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from podshim import errors as errdefs
from podshim.api.services.ttrpc.events.v1 import events_pb2
from podshim.task.events import EVENTS_SERVICE, NAMESPACE_METADATA_KEY, NullPublisher, envelope_for
from podshim.task.states import PUBLISHER_TABLE, Lifecycle, PublisherState, Verb
from podshim.ttrpc.client import Client

log = logging.getLogger("podshim.service.publisher")


@dataclass
class PublisherStats:
    """Counters of a :class:`ForwardPublisher` (for logs, diagnostics and tests)."""

    published: int = 0
    delivered: int = 0
    #: dropped because the queue was full (the oldest undelivered event goes)
    overflowed: int = 0
    #: dropped because containerd stayed unreachable for ``retry_for`` seconds
    expired: int = 0
    #: dropped because containerd answered with a non-retryable error
    rejected: int = 0
    #: dropped because the publisher was closed (before delivery, or published after)
    discarded: int = 0
    #: failed attempts that were retried (connection refused/closed, deadline exceeded)
    retries: int = 0


class _Item:
    __slots__ = ("dropped", "envelope", "seq")

    def __init__(self, seq: int, envelope: events_pb2.Envelope) -> None:
        self.seq = seq
        self.envelope = envelope
        self.dropped = False


_RETRYABLE = (errdefs.Unavailable, errdefs.DeadlineExceeded, OSError)
_DROP_WARN_INTERVAL = 5.0


class ForwardPublisher:
    """Deliver events to containerd with ``Events/Forward``, in order, surviving restarts.

    One background asyncio task sends the queued envelopes one at a time over a
    long-lived ttrpc connection (metadata ``containerd-namespace-ttrpc=<namespace>``,
    ``call_timeout`` per call). Delivery policy:

    * Unavailable (refused, closed, socket missing) or DeadlineExceeded: drop the
      connection, wait (``backoff_initial`` doubling up to ``backoff_max``) and send the
      *same* event again, until it is delivered or ``retry_for`` seconds have passed
      since its first attempt; then it is dropped with an error log. Later events wait
      behind it, so order is never broken. After a timeout containerd may have received
      the event anyway: delivery is at least once.
    * Any other error kind (e.g. INVALID_ARGUMENT): the event is dropped at once with an
      error log and the next one is sent.
    * At most ``maxlen`` events are undelivered (including the one being sent); when
      ``publish`` finds the queue full, the oldest undelivered event is dropped with a
      (rate-limited) warning and counted in :attr:`stats`.

    The constructor does no I/O. The sending task starts with :meth:`start` or on the
    first ``publish`` made inside a running event loop. ``publish`` must be called from
    that loop's thread, or, once started, from any thread (the event is handed to the
    loop thread; its timestamp is still taken at the call).
    """

    def __init__(
        self,
        address: str,
        namespace: str,
        *,
        maxlen: int = 2048,
        call_timeout: float = 5.0,
        retry_for: float = 120.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 2.0,
    ) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self.address = address
        self.namespace = namespace
        self.maxlen = maxlen
        self.call_timeout = call_timeout
        self.retry_for = retry_for
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stats = PublisherStats()
        self._client = Client(
            address, metadata=((NAMESPACE_METADATA_KEY, namespace),), timeout=call_timeout
        )
        self._queue: collections.deque[_Item] = collections.deque()
        self._last_seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        #: the sender job, owned by this publisher: close() cancels and awaits it
        self._task: asyncio.Task[None] | None = None
        #: IDLE -> SENDING -> CLOSED (tables in podshim.task.states)
        self.life = Lifecycle(PUBLISHER_TABLE, PublisherState.IDLE, "events publisher")
        self._wakeup = asyncio.Event()  # queue became non-empty
        self._head_dropped = asyncio.Event()  # cut a retry backoff short
        self._progress = asyncio.Event()  # replaced each time the queue head advances
        self._failing = False
        self._last_drop_warning = -_DROP_WARN_INTERVAL
        self._unlogged_drops = 0

    # -- Publisher ---------------------------------------------------------------------
    def publish(self, event: Message) -> None:
        """Queue ``event`` for delivery; see the class docstring. Never raises."""
        now_ns = time.time_ns()
        try:
            envelope = envelope_for(event, self.namespace, now_ns=now_ns)
        except Exception as exc:
            log.error("events: cannot publish %s: %s", type(event).__name__, exc)
            return
        loop = self._loop
        if loop is not None and threading.get_ident() != self._thread:
            try:
                loop.call_soon_threadsafe(self._enqueue, envelope)
            except RuntimeError:  # loop closed
                self.stats.discarded += 1
                log.warning("events: event loop closed; %s dropped", envelope.topic)
            return
        self._enqueue(envelope)
        if self._task is None and not self._closed:
            try:
                self.start()
            except RuntimeError:
                pass  # no running loop yet: start() or flush() will start sending

    async def flush(self, timeout: float) -> bool:
        """Wait until every event published so far is delivered or dropped.

        Returns False if ``timeout`` seconds passed first (events stay queued).
        """
        target = self._last_seq
        if self._settled(target):
            return True
        if self._task is None and not self._closed:
            self.start()
        try:
            async with asyncio.timeout(timeout):
                while not self._settled(target):
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float) -> None:
        """Flush for up to ``timeout`` s, then stop sending and close the connection.

        Undelivered events are dropped (counted as ``discarded``) with a warning. Later
        ``publish`` calls drop their event. Safe to call more than once.
        """
        if not self._closed:
            flushed = await self.flush(timeout)
            self.life.fire(Verb.CLOSE)
            if not flushed:
                log.warning(
                    "events: closing with %d undelivered event(s); dropped", len(self._queue)
                )
        self.stats.discarded += len(self._queue)
        for item in self._queue:
            item.dropped = True
        self._queue.clear()
        self._advance()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        await self._client.close()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the sending task in the running event loop (idempotent).

        Raises:
            RuntimeError: no running event loop in this thread, or the publisher is closed.
        """
        if self._closed:
            raise RuntimeError("events publisher is closed")
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self.life.fire(Verb.START)
        self._loop = loop
        self._thread = threading.get_ident()
        self._task = loop.create_task(self._run(), name="podshim-events")

    @property
    def pending(self) -> int:
        """Events queued and not yet delivered or dropped."""
        return len(self._queue)

    # -- internals ---------------------------------------------------------------------
    @property
    def _closed(self) -> bool:
        return self.life.state is PublisherState.CLOSED

    def _settled(self, seq: int) -> bool:
        return not self._queue or self._queue[0].seq > seq

    def _advance(self) -> None:
        """Wake flush() waiters: the queue head moved."""
        self._progress.set()
        self._progress = asyncio.Event()

    def _enqueue(self, envelope: events_pb2.Envelope) -> None:
        if self._closed:
            self.stats.discarded += 1
            log.warning("events: publisher closed; %s dropped", envelope.topic)
            return
        self.stats.published += 1
        if len(self._queue) >= self.maxlen:
            old = self._queue.popleft()
            old.dropped = True
            self.stats.overflowed += 1
            self._head_dropped.set()
            self._advance()
            self._warn_drop(old)
        self._last_seq += 1
        self._queue.append(_Item(self._last_seq, envelope))
        self._wakeup.set()

    def _warn_drop(self, item: _Item) -> None:
        self._unlogged_drops += 1
        now = time.monotonic()
        if now - self._last_drop_warning >= _DROP_WARN_INTERVAL:
            log.warning(
                "events: queue full (%d); dropped %d oldest event(s) (latest %s), "
                "%d dropped in total",
                self.maxlen,
                self._unlogged_drops,
                item.envelope.topic,
                self.stats.overflowed,
            )
            self._last_drop_warning = now
            self._unlogged_drops = 0

    async def _run(self) -> None:
        """The sending task: deliver the queue head, then remove it; forever."""
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            item = self._queue[0]
            try:
                await self._deliver(item)
            except Exception as exc:  # a bug: never let the sender die
                self.stats.rejected += 1
                log.error("events: dropping %s: %r", item.envelope.topic, exc, exc_info=exc)
            if self._queue and self._queue[0] is item:
                self._queue.popleft()
                self._advance()

    async def _deliver(self, item: _Item) -> None:
        """Send one event, retrying as the class docstring says; return when settled."""
        loop = asyncio.get_running_loop()
        first = loop.time()
        delay = self.backoff_initial
        request = events_pb2.ForwardRequest(envelope=item.envelope)
        topic = item.envelope.topic
        while not item.dropped:
            try:
                await self._client.call(
                    EVENTS_SERVICE,
                    "Forward",
                    request,
                    empty_pb2.Empty,
                    timeout=self.call_timeout,
                )
            except _RETRYABLE as exc:
                await self._client.close()  # a timed-out connection may be wedged
                elapsed = loop.time() - first
                if elapsed >= self.retry_for:
                    self.stats.expired += 1
                    log.error(
                        "events: %s not delivered to %s for %.0fs (%s); dropped",
                        topic,
                        self.address,
                        elapsed,
                        exc,
                    )
                    return
                self.stats.retries += 1
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "events: cannot forward %s to %s (%s); retrying", topic, self.address, exc
                    )
                await self._pause(item, min(delay, self.retry_for - elapsed))
                delay = min(delay * 2, self.backoff_max)
            except errdefs.ShimError as exc:
                self.stats.rejected += 1
                log.error(
                    "events: containerd rejected %s: %s (%s); dropped", topic, exc, exc.code.name
                )
                return
            else:
                self.stats.delivered += 1
                if self._failing:
                    self._failing = False
                    log.info("events: forwarding to %s again", self.address)
                return

    async def _pause(self, item: _Item, seconds: float) -> None:
        """Sleep ``seconds``, or less if ``item`` (the queue head) is dropped meanwhile."""
        self._head_dropped.clear()
        if item.dropped:
            return
        try:
            async with asyncio.timeout(seconds):
                await self._head_dropped.wait()
        except TimeoutError:
            pass


def publisher_from_env(
    namespace: str,
    env: Mapping[str, str] | None = None,
    *,
    maxlen: int = 2048,
    retry_for: float = 120.0,
) -> ForwardPublisher | NullPublisher:
    """The publisher for a shim started by containerd (no I/O until the first event).

    A :class:`ForwardPublisher` to ``TTRPC_ADDRESS`` from ``env`` (default
    ``os.environ``); without that variable a :class:`NullPublisher` (with a warning).
    """
    address = (os.environ if env is None else env).get("TTRPC_ADDRESS", "")
    if not address:
        log.warning("events: TTRPC_ADDRESS not set; task events are discarded")
        return NullPublisher()
    return ForwardPublisher(address, namespace, maxlen=maxlen, retry_for=retry_for)
