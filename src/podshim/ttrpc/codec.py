"""ttrpc framing, sans-IO: bytes in, frames out; frames in, bytes out.

Wire format (containerd/ttrpc v1.1)::

    +--------+--------+--------+--------+--------+--------+--------+--------+------+-------+
    | length (uint32 BE, body only)     | stream id (uint32 BE)             | type | flags |
    +--------+--------+--------+--------+--------+--------+--------+--------+------+-------+
    | body: `length` bytes (a protobuf ttrpc.Request or ttrpc.Response)                    |
    +--------------------------------------------------------------------------------------+

Nothing here touches a socket: :class:`FrameDecoder` is fed whatever bytes arrived and
hands back complete events, so it can be tested with any split of the byte stream.

Sizes: a body up to :data:`MAX_BODY` is a message; one up to :data:`MAX_SKIP` is skipped
as it arrives and reported (:class:`Oversized`), so its stream can be answered; a header
declaring more than that ends the connection (:class:`ProtocolError`): no ttrpc peer
sends it, and skipping it would tie the connection up for up to 4 GiB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_BODY = 4 << 20  # 4 MiB, ttrpc's messageLengthMax
MAX_SKIP = 2 * MAX_BODY  # the largest oversized body skipped rather than fatal

TYPE_REQUEST = 0x01
TYPE_RESPONSE = 0x02


class ProtocolError(Exception):
    """The peer broke the framing itself; the connection cannot go on.

    Raised for a header naming stream 0 (never a valid stream: nothing could be
    answered on it), for a header declaring a body over the decoder's ``max_skip``, and
    for a stream that ends in the middle of a frame.
    Problems confined to one stream (a body over ``max_body`` but not ``max_skip``, an
    undecodable message, an even stream id) are *not* protocol errors: they are answered
    on that stream.
    """


class Frame(NamedTuple):
    """A complete frame (immutable; a named tuple, the cheapest such object to make: one
    is made per message received)."""

    stream_id: int
    type: int
    flags: int
    body: bytes


_new_frame = tuple.__new__  # Frame(...) without the named tuple's Python-level __new__


@dataclass(frozen=True, slots=True)
class Oversized:
    """A frame whose body exceeds ``max_body`` (but not ``max_skip``); its body is skipped
    as it arrives."""

    stream_id: int
    type: int
    length: int


Event = Frame | Oversized


def encode_frame(stream_id: int, type_: int, body: bytes, flags: int = 0) -> bytes:
    """Return header + body for one frame.

    Raises:
        ValueError: the body is over :data:`MAX_BODY` (the peer would discard it) or a
            header field is out of range.
    """
    if len(body) > MAX_BODY:
        raise ValueError(f"message length {len(body)} exceeds maximum of {MAX_BODY}")
    if not 0 < stream_id <= 0xFFFFFFFF:
        raise ValueError(f"stream id {stream_id} out of range")
    return HEADER.pack(len(body), stream_id, type_, flags) + body


class FrameDecoder:
    """Incremental frame decoder.

    Feed it bytes with :meth:`feed`; it returns the events completed by them. It keeps at
    most one partial frame buffered, and never buffers the body of an oversized frame:
    those bytes are dropped as they arrive, up to ``max_skip`` of them.
    """

    def __init__(self, max_body: int = MAX_BODY, max_skip: int = MAX_SKIP) -> None:
        self._max_body = max_body
        self._max_skip = max_skip
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized body still to drop

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete (for tests and metrics)."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """True between the first byte of a frame and its last (skipped bodies included)."""
        return bool(self._buf) or self._skip > 0

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data`` and return every event it completes, in order.

        Raises:
            ProtocolError: a header is unusable (stream 0, or a body over ``max_skip``);
                the caller must close the connection.
        """
        events: list[Event] = []
        pos = 0
        if not self._buf and not self._skip:
            # Fast path: the whole frames at the start of ``data``, each body copied once.
            n = len(data)
            unpack = HEADER.unpack_from
            max_body = self._max_body
            while n - pos >= HEADER_SIZE:
                length, sid, type_, flags = unpack(data, pos)
                start = pos + HEADER_SIZE
                end = start + length
                if not sid or length > max_body or end > n:
                    break
                events.append(_new_frame(Frame, (sid, type_, flags, bytes(data[start:end]))))
                pos = end
            if pos == n:
                return events
        view = memoryview(data)[pos:]
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            if not self._buf and len(view) >= HEADER_SIZE:
                # A whole frame at the start of the view, not copied twice.
                length, sid, type_, flags = HEADER.unpack_from(view)
                end = HEADER_SIZE + length
                if sid and length <= self._max_body and len(view) >= end:
                    events.append(
                        _new_frame(Frame, (sid, type_, flags, bytes(view[HEADER_SIZE:end])))
                    )
                    view = view[end:]
                    continue
            need = HEADER_SIZE - len(self._buf) if len(self._buf) < HEADER_SIZE else 0
            if need:
                self._buf += view[:need]
                view = view[need:]
                if len(self._buf) < HEADER_SIZE:
                    break
                length, sid, type_, _flags = HEADER.unpack_from(self._buf)
                if sid == 0:
                    self._buf.clear()
                    raise ProtocolError("frame header names stream 0")
                if length > self._max_body:
                    self._buf.clear()
                    if length > self._max_skip:
                        raise ProtocolError(
                            f"frame header declares {length} bytes (skipping at most "
                            f"{self._max_skip})"
                        )
                    self._skip = length
                    events.append(Oversized(sid, type_, length))
                    continue
            length, sid, type_, flags = HEADER.unpack_from(self._buf)
            missing = HEADER_SIZE + length - len(self._buf)
            take = min(missing, len(view))
            self._buf += view[:take]
            view = view[take:]
            if take == missing:
                events.append(Frame(sid, type_, flags, bytes(self._buf[HEADER_SIZE:])))
                self._buf.clear()
        return events

    def eof(self) -> None:
        """Signal the end of the byte stream.

        Raises:
            ProtocolError: the stream ended inside a frame.
        """
        if self._buf or self._skip:
            partial = len(self._buf) + self._skip
            self._buf.clear()
            self._skip = 0
            raise ProtocolError(f"connection closed inside a frame ({partial} bytes pending)")
