"""ttrpc connections as pure state machines: the layer between frames and RPCs.

:class:`ServerConnection` turns received bytes into :class:`IncomingRequest` events
(or into error replies for streams it can answer by itself) and turns replies into
bytes. :class:`ClientConnection` does the same for the calling side. Neither does I/O;
``podshim.ttrpc.server`` and ``podshim.ttrpc.client`` put asyncio under them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from google.protobuf.message import DecodeError

from podshim.api.google.rpc import status_pb2
from podshim.api.ttrpc import ttrpc_pb2
from podshim.errors import Code
from podshim.ttrpc.codec import (
    HEADER,
    MAX_BODY,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    Frame,
    FrameDecoder,
    Oversized,
    encode_frame,
)

Metadata = tuple[tuple[str, str], ...]

#: distinct metadata encodings a connection keeps decoded (a peer sends few: containerd
#: one per namespace); past it the cache starts over
METADATA_CACHE_SIZE = 32
#: the longest metadata encoding kept decoded
METADATA_CACHE_KEY_MAX = 4096


class IncomingRequest(NamedTuple):
    """A well-formed request the application must answer with :meth:`ServerConnection.reply`
    (immutable; a named tuple, the cheapest such object to make: one is made per call)."""

    stream_id: int
    service: str
    method: str
    payload: bytes
    timeout_nano: int
    metadata: Metadata


_new_tuple = tuple.__new__  # a named tuple without its Python-level __new__


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


#: a response frame's header with the payload's tag and one-byte length (payload < 128)
_SMALL_OK = struct.Struct(">IIBBBB")
#: the same with a two-byte length (payload < 16 KiB)
_MEDIUM_OK = struct.Struct(">IIBBBBB")
_PAYLOAD_TAG = 0x12  # Response.payload: field 2, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_response(
    stream_id: int, payload: bytes = b"", code: int = 0, message: str = ""
) -> bytes:
    """Encode one response frame. Success leaves the status out, as Go's server does.

    A reply too large for the wire becomes RESOURCE_EXHAUSTED instead.
    """
    if not code:
        # Success: the protobuf Response is only the payload field (or nothing when the
        # payload is empty), written here as the protobuf runtime would write it.
        if not 0 < stream_id <= 0xFFFFFFFF:
            raise ValueError(f"stream id {stream_id} out of range")
        n = len(payload)
        if n < 0x80:
            if n:
                return _SMALL_OK.pack(n + 2, stream_id, TYPE_RESPONSE, 0, _PAYLOAD_TAG, n) + payload
            return HEADER.pack(0, stream_id, TYPE_RESPONSE, 0)
        if n < 0x4000:  # a two-byte length
            return (
                _MEDIUM_OK.pack(
                    n + 3, stream_id, TYPE_RESPONSE, 0, _PAYLOAD_TAG, n & 0x7F | 0x80, n >> 7
                )
                + payload
            )
        size = _varint(n)
        length = 1 + len(size) + n
        if length <= MAX_BODY:
            return b"".join(
                (HEADER.pack(length, stream_id, TYPE_RESPONSE, 0), b"\x12", size, payload)
            )
        return encode_response(stream_id, code=Code.RESOURCE_EXHAUSTED, message=_size_error(length))
    resp = ttrpc_pb2.Response()
    resp.status.CopyFrom(status_pb2.Status(code=code, message=message))
    body = resp.SerializeToString()
    if len(body) > MAX_BODY:
        return encode_response(
            stream_id, code=Code.RESOURCE_EXHAUSTED, message=_size_error(len(body))
        )
    return encode_frame(stream_id, TYPE_RESPONSE, body)


def _scan_request(body: bytes) -> tuple[str, str, bytes, int, int] | None:
    """The fields of a ``ttrpc.Request`` before its metadata, for a body in field order (as
    Go's ttrpc and the protobuf runtime write it): ``(service, method, payload,
    timeout_nano, offset of the first metadata entry)``; None for any other layout (the
    protobuf runtime then decodes it). Strings are checked as UTF-8 as the runtime does;
    whether the rest of the body is metadata is left to the caller.
    """
    n = len(body)
    pos = 0
    service = method = ""
    payload = b""
    timeout = 0
    try:
        if pos < n and body[pos] == 0x0A:  # 1: service
            size = body[pos + 1]
            if size & 0x80:
                return None
            pos += 2
            service = body[pos : pos + size].decode()
            pos += size
        if pos < n and body[pos] == 0x12:  # 2: method
            size = body[pos + 1]
            if size & 0x80:
                return None
            pos += 2
            method = body[pos : pos + size].decode()
            pos += size
        if pos < n and body[pos] == 0x1A:  # 3: payload
            pos += 1
            size = shift = 0
            while True:
                c = body[pos]
                pos += 1
                size |= (c & 0x7F) << shift
                if c < 0x80:
                    break
                shift += 7
                if shift > 28:  # over 4 GiB: not ours to read
                    return None
            payload = body[pos : pos + size]
            pos += size
        if pos < n and body[pos] == 0x20:  # 4: timeout_nano
            pos += 1
            shift = 0
            while True:
                c = body[pos]
                pos += 1
                timeout |= (c & 0x7F) << shift
                if c < 0x80:
                    break
                shift += 7
                if shift > 56:  # negative or overlong: the runtime's business
                    return None
    except (IndexError, UnicodeDecodeError):
        return None
    if pos > n:
        return None  # truncated
    return service, method, payload, timeout, pos


def _only_metadata(region: bytes) -> bool:
    """``region`` is a run of whole ``metadata`` (field 5) entries and nothing else."""
    pos, n = 0, len(region)
    try:
        while pos < n:
            if region[pos] != 0x2A:
                return False
            pos += 1
            size = shift = 0
            while True:
                c = region[pos]
                pos += 1
                size |= (c & 0x7F) << shift
                if c < 0x80:
                    break
                shift += 7
                if shift > 28:
                    return False
            pos += size
    except IndexError:
        return False
    return pos == n


@dataclass
class ServerConnection:
    """Server side of one ttrpc connection.

    A request is decoded by the protobuf runtime the first time its metadata is seen;
    after that, a request laid out in field order with the same metadata bytes (a peer
    sends the same few, e.g. containerd its namespace) has its few leading fields read
    here and its metadata taken from the connection's cache: the same values, without
    decoding the metadata again on every call.
    """

    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    #: metadata entries' bytes (a request's tail) -> their decoded value
    metadata_cache: dict[bytes, Metadata] = field(default_factory=dict)

    def receive(self, data: bytes) -> list[IncomingRequest | ErrorReply]:
        """Feed received bytes; raises :class:`~podshim.ttrpc.codec.ProtocolError`."""
        out: list[IncomingRequest | ErrorReply] = []
        for ev in self.decoder.feed(data):
            if type(ev) is not Frame:
                assert isinstance(ev, Oversized)
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
        sid, type_, _flags, body = frame
        if type_ != TYPE_REQUEST:
            return None  # unknown frame types are ignored, as ttrpc does
        if not sid & 1:
            return self._error(
                sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
        scanned = _scan_request(body)
        region = b""
        if scanned is not None:
            service, method, payload, timeout, pos = scanned
            if pos == len(body):
                return _new_tuple(IncomingRequest, (sid, service, method, payload, timeout, ()))
            region = body[pos:]
            metadata = self.metadata_cache.get(region)
            if metadata is not None:
                return _new_tuple(
                    IncomingRequest, (sid, service, method, payload, timeout, metadata)
                )
        req = ttrpc_pb2.Request()
        try:
            req.ParseFromString(body)
        except DecodeError as exc:
            return self._error(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
        metadata = tuple([(kv.key, kv.value) for kv in req.metadata])
        if region and len(region) <= METADATA_CACHE_KEY_MAX and _only_metadata(region):
            # The fields before ``region`` hold no metadata: all of it is ``region``'s.
            cache = self.metadata_cache
            if len(cache) >= METADATA_CACHE_SIZE:
                cache.clear()
            cache[region] = metadata
        return _new_tuple(
            IncomingRequest,
            (sid, req.service, req.method, req.payload, req.timeout_nano, metadata),
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
