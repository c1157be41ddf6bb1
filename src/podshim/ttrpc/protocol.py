"""ttrpc connections as pure state machines: the layer between frames and RPCs.

:class:`ServerConnection` turns received bytes into :class:`IncomingRequest` events
(or into error replies for streams it can answer by itself) and turns replies into
bytes. :class:`ClientConnection` does the same for the calling side. Neither does I/O;
``podshim.ttrpc.server`` and ``podshim.ttrpc.client`` put asyncio under them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from podshim.api.google.rpc import status_pb2
from podshim.api.ttrpc import ttrpc_pb2
from podshim.errors import Code
from podshim.ttrpc.codec import (
    MAX_BODY,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    Frame,
    FrameDecoder,
    Oversized,
    encode_frame,
)

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class IncomingRequest:
    """A well-formed request the application must answer with :meth:`ServerConnection.reply`."""

    stream_id: int
    service: str
    method: str
    payload: bytes
    timeout_nano: int
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A request the connection answered on its own; ``data`` must be written as is."""

    stream_id: int
    code: Code
    message: str
    data: bytes


@dataclass(frozen=True, slots=True)
class IncomingResponse:
    """A response to one of our calls. ``code`` is OK when the status was absent."""

    stream_id: int
    code: int
    message: str
    payload: bytes


def _size_error(length: int) -> str:
    return f"message length {length} exceed maximum message size of {MAX_BODY}"


def encode_response(
    stream_id: int, payload: bytes = b"", code: int = 0, message: str = ""
) -> bytes:
    """Encode one response frame. Success leaves the status out, as Go's server does.

    A reply too large for the wire becomes RESOURCE_EXHAUSTED instead.
    """
    resp = ttrpc_pb2.Response()
    if code:
        resp.status.CopyFrom(status_pb2.Status(code=code, message=message))
    else:
        resp.payload = payload
    body = resp.SerializeToString()
    if len(body) > MAX_BODY:
        return encode_response(
            stream_id, code=Code.RESOURCE_EXHAUSTED, message=_size_error(len(body))
        )
    return encode_frame(stream_id, TYPE_RESPONSE, body)


@dataclass
class ServerConnection:
    """Server side of one ttrpc connection."""

    decoder: FrameDecoder = field(default_factory=FrameDecoder)

    def receive(self, data: bytes) -> list[IncomingRequest | ErrorReply]:
        """Feed received bytes; raises :class:`~podshim.ttrpc.codec.ProtocolError`."""
        out: list[IncomingRequest | ErrorReply] = []
        for ev in self.decoder.feed(data):
            if isinstance(ev, Oversized):
                if ev.type == TYPE_REQUEST:
                    out.append(
                        self._error(ev.stream_id, Code.RESOURCE_EXHAUSTED, _size_error(ev.length))
                    )
                continue
            item = self._on_frame(ev)
            if item is not None:
                out.append(item)
        return out

    @property
    def in_frame(self) -> bool:
        """True while a frame is partly received (the transport times such a pause)."""
        return self.decoder.in_frame

    def eof(self) -> None:
        """The peer closed; raises ProtocolError when it stopped inside a frame."""
        self.decoder.eof()

    def _on_frame(self, frame: Frame) -> IncomingRequest | ErrorReply | None:
        if frame.type != TYPE_REQUEST:
            return None  # unknown frame types are ignored, as ttrpc does
        if frame.stream_id % 2 == 0:
            return self._error(
                frame.stream_id,
                Code.INVALID_ARGUMENT,
                "StreamID must be odd for client initiated streams",
            )
        req = ttrpc_pb2.Request()
        try:
            req.ParseFromString(frame.body)
        except DecodeError as exc:
            return self._error(
                frame.stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}"
            )
        return IncomingRequest(
            stream_id=frame.stream_id,
            service=req.service,
            method=req.method,
            payload=req.payload,
            timeout_nano=req.timeout_nano,
            metadata=tuple([(kv.key, kv.value) for kv in req.metadata]),
        )

    @staticmethod
    def _error(stream_id: int, code: Code, message: str) -> ErrorReply:
        return ErrorReply(
            stream_id, code, message, encode_response(stream_id, code=code, message=message)
        )

    @staticmethod
    def reply(stream_id: int, payload: bytes = b"", code: int = 0, message: str = "") -> bytes:
        """Bytes answering ``stream_id``: a payload on success, else a status."""
        return encode_response(stream_id, payload, code, message)


@dataclass
class ClientConnection:
    """Client side of one ttrpc connection: allocates odd stream ids, parses responses."""

    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    next_stream_id: int = 1

    def request(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout_nano: int = 0,
        metadata: Metadata = (),
    ) -> tuple[int, bytes]:
        """Return ``(stream_id, frame bytes)`` for a new call.

        Raises:
            ValueError: the request would exceed the 4 MiB limit.
        """
        sid = self.next_stream_id
        self.next_stream_id += 2
        req = ttrpc_pb2.Request(
            service=service, method=method, payload=payload, timeout_nano=timeout_nano
        )
        for k, v in metadata:
            req.metadata.add(key=k, value=v)
        return sid, encode_frame(sid, TYPE_REQUEST, req.SerializeToString())

    def receive(self, data: bytes) -> list[IncomingResponse]:
        """Feed received bytes; raises ProtocolError on broken framing."""
        out: list[IncomingResponse] = []
        for ev in self.decoder.feed(data):
            if isinstance(ev, Oversized):
                if ev.type == TYPE_RESPONSE:
                    out.append(
                        IncomingResponse(
                            ev.stream_id, Code.RESOURCE_EXHAUSTED, _size_error(ev.length), b""
                        )
                    )
                continue
            if ev.type != TYPE_RESPONSE:
                continue
            resp = ttrpc_pb2.Response()
            try:
                resp.ParseFromString(ev.body)
            except DecodeError as exc:
                out.append(
                    IncomingResponse(
                        ev.stream_id, Code.INTERNAL, f"unmarshal response error: {exc}", b""
                    )
                )
                continue
            if resp.HasField("status") and resp.status.code != 0:
                out.append(
                    IncomingResponse(ev.stream_id, resp.status.code, resp.status.message, b"")
                )
            else:
                out.append(IncomingResponse(ev.stream_id, 0, "", resp.payload))
        return out

    def eof(self) -> None:
        self.decoder.eof()
