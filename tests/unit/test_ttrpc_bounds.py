"""Bounds of a ttrpc server connection: backpressure, oversized headers, stalled frames."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from podshim.errors import Code
from podshim.ttrpc.client import Client
from podshim.ttrpc.codec import (
    HEADER,
    HEADER_SIZE,
    MAX_BODY,
    MAX_SKIP,
    TYPE_REQUEST,
    FrameDecoder,
    Oversized,
    ProtocolError,
    encode_frame,
)
from podshim.ttrpc.protocol import ClientConnection, IncomingResponse
from podshim.ttrpc.server import Limits, Server, _Conn
from podshim.ttrpc.services import CallContext, ServiceBinding

SVC = "podshim.test.Bounds"
ANSWER = 64 << 10  # bytes each Big call answers


class Bounds:
    """``Big`` answers ANSWER bytes at once; ``Hold`` answers its payload's size once
    released."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.started = 0

    async def big(self, payload: bytes, ctx: CallContext) -> bytes:
        return b"x" * ANSWER

    async def hold(self, payload: bytes, ctx: CallContext) -> bytes:
        self.started += 1
        await self.released.wait()
        return str(len(payload)).encode()

    def binding(self) -> ServiceBinding:
        return ServiceBinding(SVC, {"Big": self.big, "Hold": self.hold})


@asynccontextmanager
async def serving(tmp: Path, limits: Limits) -> AsyncIterator[tuple[Server, Bounds, str]]:
    svc = Bounds()
    server = Server([svc.binding()], limits=limits)
    path = str(tmp / "b.sock")
    await server.serve_path(path)
    try:
        yield server, svc, path
    finally:
        svc.released.set()
        await server.shutdown(grace=0)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


def only_conn(server: Server) -> _Conn:
    (conn,) = server._conns
    return conn


def rss() -> int:
    """Resident set size of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def read_responses(
    reader: asyncio.StreamReader, conn: ClientConnection, n: int
) -> list[IncomingResponse]:
    out: list[IncomingResponse] = []
    while len(out) < n:
        chunk = await reader.read(1 << 20)
        assert chunk, f"server closed the connection after {len(out)} answers"
        out.extend(conn.receive(chunk))
    return out


async def time_to_eof(reader: asyncio.StreamReader, timeout: float = 10.0) -> tuple[float, bytes]:
    """Seconds until the server closes, and what it sent before."""
    t0 = time.monotonic()
    data = await asyncio.wait_for(reader.read(), timeout)
    return time.monotonic() - t0, data


# -- backpressure -------------------------------------------------------------------------


def test_2000_pipelined_calls_unread_stay_bounded_then_all_answered(tmp_path: Path) -> None:
    limits = Limits(max_in_flight=16, max_queued_bytes=256 << 10, frame_timeout=0.3)
    calls = 2000
    # ~1 KiB requests: socket reads end inside frames, so the stall below also shows that
    # time the server is not reading does not count against the peer's frame_timeout.
    payload = b"p" * 1000
    answer_frame = HEADER_SIZE + ANSWER + 8  # protobuf Response: tag + length + payload

    async def main() -> None:
        base = rss()
        async with serving(tmp_path, limits) as (server, _svc, path):
            reader, writer = await asyncio.open_unix_connection(path)
            client = ClientConnection()
            writer.write(b"".join(client.request(SVC, "Big", payload)[1] for _ in range(calls)))
            sending = asyncio.create_task(writer.drain())  # blocks while the server stalls
            await until(lambda: server.connections == 1 and only_conn(server).reading_paused)
            conn = only_conn(server)
            await asyncio.sleep(1.0)  # stalled well past frame_timeout: still open
            assert server.connections == 1 and conn.reading_paused
            grown = rss() - base
            assert conn.in_flight <= limits.max_in_flight
            assert conn.peak_in_flight <= limits.max_in_flight
            assert conn.queued_bytes <= limits.max_queued_bytes + answer_frame
            assert conn.peak_queued_bytes <= limits.max_queued_bytes + answer_frame
            assert conn.held <= (256 << 10) // len(payload)  # one socket read, at most
            # both bounds were reached, not merely unneeded
            assert conn.peak_in_flight == limits.max_in_flight
            assert conn.peak_queued_bytes > limits.max_queued_bytes
            # Unbounded, the 2000 answers (128 MiB) were queued: RSS grew by > 128 MiB.
            assert grown < 48 << 20, f"RSS grew by {grown >> 20} MiB"

            answered: list[tuple[int, int, int]] = []  # not the payloads: 128 MiB
            while len(answered) < calls:
                chunk = await reader.read(1 << 20)
                assert chunk, f"server closed the connection after {len(answered)} answers"
                answered += [(r.stream_id, r.code, len(r.payload)) for r in client.receive(chunk)]
            await sending
            assert sorted(sid for sid, _, _ in answered) == list(range(1, 2 * calls, 2))
            assert {(code, size) for _, code, size in answered} == {(0, ANSWER)}
            assert conn.peak_in_flight <= limits.max_in_flight
            assert conn.peak_queued_bytes <= limits.max_queued_bytes + answer_frame
            await until(lambda: conn.in_flight == 0 and not conn.reading_paused)
            writer.close()

    run(main)


def test_slow_calls_hold_reading_at_the_in_flight_bound(tmp_path: Path) -> None:
    limits = Limits(max_in_flight=8)

    async def main() -> None:
        async with serving(tmp_path, limits) as (server, svc, path):
            reader, writer = await asyncio.open_unix_connection(path)
            client = ClientConnection()
            writer.write(b"".join(client.request(SVC, "Hold", b"")[1] for _ in range(100)))
            await until(lambda: svc.started == 8 and only_conn(server).reading_paused)
            await asyncio.sleep(0.1)
            conn = only_conn(server)
            assert svc.started == 8 and conn.in_flight == 8 and conn.peak_in_flight == 8
            assert conn.busy
            svc.released.set()
            got = await read_responses(reader, client, 100)
            assert len({r.stream_id for r in got}) == 100
            assert conn.peak_in_flight == 8
            writer.close()

    run(main)


def test_in_flight_request_bytes_are_bounded_but_one_big_call_always_runs(
    tmp_path: Path,
) -> None:
    limits = Limits(max_in_flight_bytes=300_000)
    big = b"b" * 100_000

    async def main() -> None:
        async with serving(tmp_path, limits) as (server, svc, path):
            reader, writer = await asyncio.open_unix_connection(path)
            client = ClientConnection()
            writer.write(b"".join(client.request(SVC, "Hold", big)[1] for _ in range(20)))
            await until(lambda: svc.started == 3 and only_conn(server).reading_paused)
            conn = only_conn(server)
            await asyncio.sleep(0.1)
            assert svc.started == 3 and conn.in_flight_bytes == 300_000
            svc.released.set()
            got = await read_responses(reader, client, 20)
            assert {r.payload for r in got} == {b"100000"}
            assert conn.peak_in_flight == 3
            # a single request over the byte bound still runs, alone
            _, frame = client.request(SVC, "Hold", b"h" * 400_000)
            writer.write(frame)
            (resp,) = await read_responses(reader, client, 1)
            assert resp.code == 0 and resp.payload == b"400000"
            writer.close()

    run(main)


def test_graceful_shutdown_answers_held_requests(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, Limits(max_in_flight=2)) as (server, svc, path):
            reader, writer = await asyncio.open_unix_connection(path)
            client = ClientConnection()
            writer.write(b"".join(client.request(SVC, "Hold", b"")[1] for _ in range(10)))
            await until(lambda: svc.started == 2 and only_conn(server).held > 0)
            asyncio.get_running_loop().call_later(0.1, svc.released.set)
            await server.shutdown(grace=10)
            got = await read_responses(reader, client, 10)
            assert {r.code for r in got} == {0}
            writer.close()

    run(main)


def record_writes(conn: _Conn, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every ``transport.write`` of ``conn`` from now on, in order."""
    transport = conn._transport
    assert transport is not None
    writes: list[bytes] = []
    real = transport.write

    def write(data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        real(data)

    monkeypatch.setattr(transport, "write", write)
    return writes


def test_answers_finished_in_one_loop_turn_leave_in_one_write_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = [b"a" * n for n in range(1, 11)]

    async def main() -> None:
        async with serving(tmp_path, Limits()) as (server, svc, path):
            reader, writer = await asyncio.open_unix_connection(path)
            await until(lambda: server.connections == 1)
            writes = record_writes(only_conn(server), monkeypatch)
            client = ClientConnection()
            writer.write(b"".join(client.request(SVC, "Hold", p)[1] for p in payloads))
            await until(lambda: svc.started == len(payloads))
            assert writes == []
            svc.released.set()  # the ten calls finish in the same turn, oldest first
            got = await read_responses(reader, client, len(payloads))
            expected = [(2 * i + 1, str(len(p)).encode()) for i, p in enumerate(payloads)]
            assert [(r.stream_id, r.payload) for r in got] == expected
            assert len(writes) == 1
            whole = ClientConnection()  # the one write holds the ten frames, whole
            assert [r.stream_id for r in whole.receive(writes[0])] == [s for s, _ in expected]
            assert not whole.decoder.in_frame
            writer.close()

    run(main)


def test_a_slow_reader_pauses_answers_joined_in_one_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64 Big calls finish in the same turn: joined unbounded, they were one 4 MiB write.
    limits = Limits(max_in_flight=64, max_queued_bytes=256 << 10)
    calls = 200
    answer_frame = HEADER_SIZE + ANSWER + 8

    async def main() -> None:
        async with serving(tmp_path, limits) as (server, _svc, path):
            reader, writer = await asyncio.open_unix_connection(path)
            await until(lambda: server.connections == 1)
            conn = only_conn(server)
            writes = record_writes(conn, monkeypatch)
            client = ClientConnection()
            writer.write(b"".join(client.request(SVC, "Big", b"")[1] for _ in range(calls)))
            await until(lambda: conn.reading_paused and conn.peak_queued_bytes > 0)
            await asyncio.sleep(0.2)  # the reader is slow: nothing more leaves
            assert conn.reading_paused and conn.in_flight > 0
            assert conn.peak_queued_bytes > limits.max_queued_bytes  # the bound was reached
            assert conn.queued_bytes <= limits.max_queued_bytes + answer_frame
            assert conn.peak_queued_bytes <= limits.max_queued_bytes + answer_frame
            assert max(len(w) for w in writes) <= limits.max_queued_bytes + answer_frame
            got = await read_responses(reader, client, calls)
            assert sorted(r.stream_id for r in got) == list(range(1, 2 * calls, 2))
            assert {(r.code, len(r.payload)) for r in got} == {(0, ANSWER)}
            assert conn.peak_queued_bytes <= limits.max_queued_bytes + answer_frame
            assert max(len(w) for w in writes) <= limits.max_queued_bytes + answer_frame
            await until(lambda: conn.in_flight == 0 and not conn.reading_paused)
            writer.close()

    run(main)


# -- oversized headers --------------------------------------------------------------------


def test_decoder_refuses_to_skip_more_than_max_skip() -> None:
    dec = FrameDecoder(max_body=10, max_skip=100)
    assert dec.feed(HEADER.pack(100, 1, TYPE_REQUEST, 0)) == [Oversized(1, TYPE_REQUEST, 100)]
    assert dec.in_frame
    dec.feed(bytes(100))
    assert not dec.in_frame
    with pytest.raises(ProtocolError, match="declares 101 bytes"):
        dec.feed(HEADER.pack(101, 3, TYPE_REQUEST, 0))
    with pytest.raises(ProtocolError, match="declares 4294967295 bytes"):
        FrameDecoder().feed(HEADER.pack(0xFFFFFFFF, 1, TYPE_REQUEST, 0))


def test_decoder_in_frame_tracks_partial_frames() -> None:
    dec = FrameDecoder()
    frame = encode_frame(1, TYPE_REQUEST, b"abc")
    assert not dec.in_frame
    dec.feed(frame[:4])
    assert dec.in_frame
    dec.feed(frame[4:] + frame[:HEADER_SIZE])
    assert dec.in_frame  # a whole header, no body yet
    dec.feed(frame[HEADER_SIZE:])
    assert not dec.in_frame


@pytest.mark.parametrize("length", [0xFFFFFFFF, MAX_SKIP + 1])
def test_oversize_header_closes_the_connection_promptly(tmp_path: Path, length: int) -> None:
    async def main() -> None:
        async with serving(tmp_path, Limits()) as (server, svc, path):
            svc.released.set()
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(HEADER.pack(length, 1, TYPE_REQUEST, 0) + bytes(1000))
            elapsed, data = await time_to_eof(reader)
            assert data == b"" and elapsed < 2.0
            writer.close()
            await until(lambda: server.connections == 0)
            async with Client(path) as client:  # the server lives on
                assert await client.call_raw(SVC, "Hold", b"12") == b"2"

    run(main)


def test_skippable_oversize_is_answered_and_the_connection_lives(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, Limits()) as (_server, svc, path):
            svc.released.set()
            reader, writer = await asyncio.open_unix_connection(path)
            client = ClientConnection(next_stream_id=3)
            writer.write(HEADER.pack(MAX_SKIP, 1, TYPE_REQUEST, 0))
            writer.write(bytes(MAX_SKIP) + client.request(SVC, "Hold", b"x")[1])
            got = {r.stream_id: r for r in await read_responses(reader, client, 2)}
            assert got[1].code == Code.RESOURCE_EXHAUSTED
            assert str(MAX_BODY) in got[1].message
            assert got[3].payload == b"1"
            writer.close()

    run(main)


# -- stalled frames -----------------------------------------------------------------------


def partial_frames() -> dict[str, bytes]:
    frame = ClientConnection().request(SVC, "Hold", b"y" * 100)[1]
    return {
        "header": frame[:5],
        "body": frame[:40],
        "skipped-body": HEADER.pack(MAX_BODY + 10, 1, TYPE_REQUEST, 0) + bytes(1000),
    }


@pytest.mark.parametrize("kind", sorted(partial_frames()))
def test_half_sent_frame_is_closed_after_the_frame_timeout(tmp_path: Path, kind: str) -> None:
    async def main() -> None:
        async with serving(tmp_path, Limits(frame_timeout=0.3)) as (server, _svc, path):
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(partial_frames()[kind])
            elapsed, data = await time_to_eof(reader)
            assert 0.25 <= elapsed < 5.0
            if kind == "skipped-body":  # the stream was answered at its header
                (resp,) = ClientConnection().receive(data)
                assert resp.code == Code.RESOURCE_EXHAUSTED
            else:
                assert data == b""
            await until(lambda: server.connections == 0)
            writer.close()

    run(main)


def test_frame_timeout_counts_from_the_last_byte_not_the_first(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, Limits(frame_timeout=0.5)) as (_server, svc, path):
            svc.released.set()
            reader, writer = await asyncio.open_unix_connection(path)
            client = ClientConnection()
            frame = client.request(SVC, "Hold", b"z" * 50)[1]
            assert len(frame) > 70
            for i in range(0, len(frame), 10):  # > 0.7 s for the frame, 0.1 s between bytes
                writer.write(frame[i : i + 10])
                await asyncio.sleep(0.1)
            (resp,) = await read_responses(reader, client, 1)
            assert resp.payload == b"50"
            writer.close()

    run(main)


def test_frame_left_unfinished_during_backpressure_is_timed_from_the_resume(
    tmp_path: Path,
) -> None:
    limits = Limits(max_in_flight=8, frame_timeout=0.3)

    async def main() -> None:
        async with serving(tmp_path, limits) as (server, svc, path):
            reader, writer = await asyncio.open_unix_connection(path)
            client = ClientConnection()
            frames = [client.request(SVC, "Hold", b"")[1] for _ in range(10)]
            writer.write(b"".join(frames[:9]) + frames[9][:12])  # 8 run, 1 held, half a frame
            await until(lambda: server.connections == 1 and only_conn(server).held == 1)
            conn = only_conn(server)
            assert conn.reading_paused and conn._state.in_frame
            await asyncio.sleep(0.6)  # the server is not reading: no timeout
            assert server.connections == 1
            svc.released.set()
            await read_responses(reader, client, 9)
            elapsed, data = await time_to_eof(reader)  # the peer's own stall now counts
            assert data == b"" and elapsed < 5.0
            writer.close()

    run(main)


def test_idle_between_frames_is_not_closed(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, Limits(frame_timeout=0.2)) as (server, svc, path):
            svc.released.set()
            # silent from the start
            reader, writer = await asyncio.open_unix_connection(path)
            # idle after whole frames
            async with Client(path) as client:
                assert await client.call_raw(SVC, "Hold", b"abc") == b"3"
                await asyncio.sleep(1.0)
                assert server.connections == 2
                assert await client.call_raw(SVC, "Hold", b"abcd") == b"4"
            c = ClientConnection()
            writer.write(c.request(SVC, "Hold", b"")[1])
            (resp,) = await read_responses(reader, c, 1)
            assert resp.code == 0 and resp.payload == b"0"
            writer.close()

    run(main)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Limits(max_in_flight=0)
    with pytest.raises(ValueError, match="positive"):
        Limits(frame_timeout=0)
