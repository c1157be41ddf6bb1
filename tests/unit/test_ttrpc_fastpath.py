"""The ttrpc codec's fast paths give exactly what the protobuf runtime gives.

A request in field order whose metadata bytes the connection has seen is read without the
protobuf runtime (its metadata from the connection's cache); a success response is
written by hand. Both are checked here against the plain protobuf encoding and decoding,
on well-formed and on damaged bodies.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podshim.api.google.rpc import status_pb2
from podshim.api.ttrpc import ttrpc_pb2
from podshim.errors import Code
from podshim.ttrpc import protocol
from podshim.ttrpc.codec import MAX_BODY, TYPE_REQUEST, TYPE_RESPONSE, Frame, encode_frame
from podshim.ttrpc.protocol import (
    METADATA_CACHE_SIZE,
    ErrorReply,
    IncomingRequest,
    ServerConnection,
    encode_response,
)

NS = (("containerd-namespace-ttrpc", "k8s.io"),)


def request_body(
    service: str = "containerd.task.v2.Task",
    method: str = "State",
    payload: bytes = b"\n\x03abc",
    timeout_nano: int = 0,
    metadata: tuple[tuple[str, str], ...] = NS,
) -> bytes:
    req = ttrpc_pb2.Request(
        service=service, method=method, payload=payload, timeout_nano=timeout_nano
    )
    for k, v in metadata:
        req.metadata.add(key=k, value=v)
    return req.SerializeToString()


def reference_decode(body: bytes) -> tuple[Any, ...]:
    """What the protobuf runtime makes of ``body`` (a request's fields, or the error)."""
    req = ttrpc_pb2.Request()
    try:
        req.ParseFromString(body)
    except Exception as exc:
        return ("error", f"unmarshal request error: {exc}")
    md = tuple((kv.key, kv.value) for kv in req.metadata)
    return (req.service, req.method, req.payload, req.timeout_nano, md)


def decoded(conn: ServerConnection, body: bytes, sid: int = 1) -> tuple[Any, ...]:
    item = conn._on_frame(Frame(sid, TYPE_REQUEST, 0, body))
    if isinstance(item, ErrorReply):
        assert item.code == Code.INVALID_ARGUMENT
        return ("error", item.message)
    assert isinstance(item, IncomingRequest)
    assert item.stream_id == sid
    return (item.service, item.method, item.payload, item.timeout_nano, item.metadata)


def reference_response(stream_id: int, payload: bytes) -> bytes:
    """A success response as the protobuf runtime writes it."""
    resp = ttrpc_pb2.Response(payload=payload)
    body = resp.SerializeToString()
    if len(body) > MAX_BODY:
        status = status_pb2.Status(code=Code.RESOURCE_EXHAUSTED)
        status.message = f"message length {len(body)} exceed maximum message size of {MAX_BODY}"
        body = ttrpc_pb2.Response(status=status).SerializeToString()
    return encode_frame(stream_id, TYPE_RESPONSE, body)


texts = st.text(max_size=140)  # past 127 UTF-8 bytes the runtime reads the name
requests = st.builds(
    request_body,
    service=texts,
    method=texts,
    payload=st.binary(max_size=300),
    timeout_nano=st.one_of(st.just(0), st.integers(-(2**63), 2**63 - 1)),
    metadata=st.lists(st.tuples(texts, texts), max_size=3).map(tuple),
)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    body = draw(requests)
    how = draw(st.sampled_from(["none", "truncate", "flip", "append", "prepend"]))
    at = draw(st.integers(0, max(len(body) - 1, 0)))
    if how == "truncate":
        return body[:at]
    if how == "flip" and body:
        return body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
    extra = draw(st.binary(min_size=1, max_size=12))
    if how == "append":
        return body + extra
    if how == "prepend":
        return extra + body
    return body


@settings(max_examples=400)
@given(st.lists(damaged(), min_size=1, max_size=6))
def test_requests_decode_as_the_protobuf_runtime_decodes_them(bodies: list[bytes]) -> None:
    conn = ServerConnection()
    for body in bodies + bodies:  # the second time, metadata comes from the cache
        assert decoded(conn, body) == reference_decode(body)


def test_seen_metadata_is_not_decoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []

    class Counting:
        Response = ttrpc_pb2.Response

        @staticmethod
        def Request() -> ttrpc_pb2.Request:
            parsed.append(b"")
            return ttrpc_pb2.Request()

    monkeypatch.setattr(protocol, "ttrpc_pb2", Counting)
    conn = ServerConnection()
    for i in range(5):
        assert decoded(conn, request_body(payload=b"p%d" % i), 2 * i + 1)[2] == b"p%d" % i
    assert len(parsed) == 1  # only the first request went through the runtime
    other = (("containerd-namespace-ttrpc", "default"),)
    assert decoded(conn, request_body(metadata=other))[4] == other
    assert decoded(conn, request_body(metadata=other))[4] == other
    assert len(parsed) == 2
    assert decoded(conn, request_body(metadata=()))[4] == ()
    assert decoded(conn, request_body(timeout_nano=5))[3] == 5
    assert len(parsed) == 2


def test_metadata_cache_is_bounded() -> None:
    conn = ServerConnection()
    for i in range(3 * METADATA_CACHE_SIZE):
        md = (("k", str(i)),)
        assert decoded(conn, request_body(metadata=md))[4] == md
        assert len(conn.metadata_cache) <= METADATA_CACHE_SIZE


@given(st.integers(1, 0xFFFFFFFF), st.binary(max_size=20_000))
def test_success_responses_are_written_as_the_protobuf_runtime_writes_them(
    sid: int, payload: bytes
) -> None:
    assert encode_response(sid, payload) == reference_response(sid, payload)


@pytest.mark.parametrize(
    "size", [0, 1, 127, 128, 16383, 16384, MAX_BODY - 4, MAX_BODY - 5, MAX_BODY]
)
def test_success_responses_at_varint_and_size_bounds(size: int) -> None:
    payload = b"x" * size
    assert encode_response(7, payload) == reference_response(7, payload)


def test_response_stream_id_is_checked() -> None:
    for sid in (0, -1, 1 << 32):
        with pytest.raises(ValueError):
            encode_response(sid, b"x")


def test_success_responses_do_not_go_through_the_protobuf_runtime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class NoResponse:
        Request = ttrpc_pb2.Request

        @staticmethod
        def Response() -> ttrpc_pb2.Response:
            raise AssertionError("the protobuf runtime wrote a success response")

    expected = [reference_response(3, p) for p in (b"", b"x", b"y" * 300)]
    monkeypatch.setattr(protocol, "ttrpc_pb2", NoResponse)
    assert [encode_response(3, p) for p in (b"", b"x", b"y" * 300)] == expected
