"""A guest agent that answers garbage or oversized frames is cut off, and the shim's side
(:class:`~podshim.host.uvm.agentclient.AgentClient`) is not harmed: the call fails with
an error kind, the process goes on, and a sane agent on the same path is served again.

The "agent" here is a unix socket server in the test that reads a request and writes
what a broken or hostile guest could write.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from podshim import errors as errdefs
from podshim.api.agent.v1 import agent_pb2 as pb
from podshim.api.ttrpc import ttrpc_pb2
from podshim.host.uvm.agentclient import AgentClient

Answer = Callable[[int], bytes]
T = TypeVar("T")


def _frame(stream: int, body: bytes, length: int | None = None, ftype: int = 2) -> bytes:
    return struct.pack(">IIBB", len(body) if length is None else length, stream, ftype, 0) + body


def _pong(stream: int) -> bytes:
    reply = pb.PingResponse(version="test", kernel="6.1-test", uptime_ms=1)
    body = ttrpc_pb2.Response(payload=reply.SerializeToString()).SerializeToString()
    return _frame(stream, body)


async def _serve(path: str, answer: Answer) -> asyncio.Server:
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(10)
                length, stream = struct.unpack(">II", head[:8])
                await reader.readexactly(length)
                writer.write(answer(stream))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(conn, path)


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "agent.sock")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _ping_after(path: str, answer: Answer) -> BaseException | None:
    server = await _serve(path, answer)
    client = AgentClient(path, timeout=5)
    try:
        await client.ping()
    except errdefs.ShimError as exc:
        return exc
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    return None


def test_garbage_frames_cut_the_channel_with_unavailable(sock: str) -> None:
    err = _run(_ping_after(sock, lambda stream: b"\x00\x00\x00\x05\x00\x00\x00\x00\x02\x00junk!"))
    assert isinstance(err, errdefs.Unavailable), err  # a frame naming stream 0: cut off


def test_an_undecodable_response_is_an_error_not_a_crash(sock: str) -> None:
    err = _run(_ping_after(sock, lambda stream: _frame(stream, b"\xff\xff\xff\xff\xff")))
    assert isinstance(err, errdefs.ShimError), err


def test_an_oversized_frame_is_refused_without_reading_it_into_memory(sock: str) -> None:
    # declares 64 MiB (far over ttrpc's 4 MiB): the client must not wait for or buffer it
    err = _run(asyncio.wait_for(
        _ping_after(sock, lambda stream: _frame(stream, b"", length=64 << 20)), timeout=10
    ))
    assert isinstance(err, errdefs.Unavailable | errdefs.ResourceExhausted), err


def test_after_a_hostile_agent_a_sane_one_is_served(sock: str) -> None:
    assert _run(_ping_after(sock, lambda stream: b"\xde\xad\xbe\xef" * 8)) is not None
    assert _run(_ping_after(sock, _pong)) is None
