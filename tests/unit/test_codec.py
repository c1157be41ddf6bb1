"""Property tests of the sans-IO ttrpc framing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from podshim.ttrpc.codec import (
    HEADER,
    MAX_BODY,
    TYPE_REQUEST,
    Frame,
    FrameDecoder,
    Oversized,
    ProtocolError,
    encode_frame,
)

frames = st.builds(
    Frame,
    stream_id=st.integers(1, 0xFFFFFFFF),
    type=st.integers(0, 255),
    flags=st.integers(0, 255),
    body=st.binary(max_size=300),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 10_000), max_size=20))
def test_any_split_decodes_to_the_same_frames(fs: list[Frame], cuts: list[int]) -> None:
    data = b"".join(encode_frame(f.stream_id, f.type, f.body, f.flags) for f in fs)
    dec = FrameDecoder()
    got = []
    for chunk in split(data, cuts):
        got.extend(dec.feed(chunk))
    assert got == fs
    assert dec.buffered == 0
    dec.eof()  # clean end: no error


@given(st.lists(frames, min_size=1, max_size=4))
def test_byte_at_a_time(fs: list[Frame]) -> None:
    data = b"".join(encode_frame(f.stream_id, f.type, f.body, f.flags) for f in fs)
    dec = FrameDecoder()
    got = []
    for i in range(len(data)):
        got.extend(dec.feed(data[i : i + 1]))
    assert got == fs


@given(
    max_body=st.integers(0, 64),
    extra=st.integers(1, 300),
    cuts=st.lists(st.integers(0, 10_000), max_size=10),
    after=frames,
)
def test_oversized_body_is_skipped_as_it_arrives(
    max_body: int, extra: int, cuts: list[int], after: Frame
) -> None:
    length = max_body + extra
    after = Frame(after.stream_id, after.type, after.flags, after.body[:max_body])
    dec = FrameDecoder(max_body=max_body)
    events = dec.feed(HEADER.pack(length, 7, TYPE_REQUEST, 0))
    assert events == [Oversized(7, TYPE_REQUEST, length)]
    tail = encode_frame(after.stream_id, after.type, after.body, after.flags)
    got = []
    for chunk in split(bytes(length) + tail, cuts):
        got.extend(dec.feed(chunk))
        assert dec.buffered <= len(tail)  # the skipped body is never held
    assert got == [after]  # the connection lives on


def test_real_limit_oversized_body_is_never_buffered() -> None:
    length = MAX_BODY + 1
    dec = FrameDecoder()
    assert dec.feed(HEADER.pack(length, 9, TYPE_REQUEST, 0)) == [Oversized(9, TYPE_REQUEST, length)]
    block = bytes(1 << 20)
    sent = 0
    while sent < length:
        n = min(len(block), length - sent)
        assert dec.feed(block[:n]) == []
        assert dec.buffered == 0
        sent += n
    assert dec.feed(encode_frame(11, TYPE_REQUEST, b"ok")) == [Frame(11, TYPE_REQUEST, 0, b"ok")]


def test_body_at_the_limit_is_accepted() -> None:
    dec = FrameDecoder()
    body = b"x" * MAX_BODY
    assert dec.feed(encode_frame(1, TYPE_REQUEST, body)) == [Frame(1, TYPE_REQUEST, 0, body)]


def test_encoder_refuses_oversized_bodies() -> None:
    with pytest.raises(ValueError, match="exceeds maximum"):
        encode_frame(1, TYPE_REQUEST, bytes(MAX_BODY + 1))


@pytest.mark.parametrize("sid", [0, 1 << 32])
def test_encoder_refuses_bad_stream_ids(sid: int) -> None:
    with pytest.raises(ValueError, match="stream id"):
        encode_frame(sid, TYPE_REQUEST, b"")


@given(st.binary(min_size=1, max_size=9))
def test_eof_inside_header_is_a_protocol_error(partial: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(partial)
    with pytest.raises(ProtocolError, match="inside a frame"):
        dec.eof()


def test_eof_inside_body_is_a_protocol_error() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(3, TYPE_REQUEST, b"abcdef")[:-2])
    with pytest.raises(ProtocolError):
        dec.eof()


def test_stream_zero_header_is_a_protocol_error() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="stream 0"):
        dec.feed(HEADER.pack(4, 0, TYPE_REQUEST, 0) + b"abcd")
