"""The asyncio ttrpc server and client over real unix sockets."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from podshim import errors as errdefs
from podshim.api.task.v2 import shim_pb2
from podshim.errors import Code
from podshim.ttrpc.client import Client
from podshim.ttrpc.codec import HEADER, MAX_BODY, TYPE_REQUEST, encode_frame
from podshim.ttrpc.protocol import ClientConnection, IncomingResponse
from podshim.ttrpc.server import PeerCred, Server
from podshim.ttrpc.services import CallContext, bind

TASK = "containerd.task.v2.Task"


class FakeTasks:
    """A partial Task service: State answers at once, Wait blocks until released."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.waiting = 0
        self.seen_metadata: list[dict[str, tuple[str, ...]]] = []

    async def State(self, req: shim_pb2.StateRequest, ctx: CallContext) -> shim_pb2.StateResponse:
        self.seen_metadata.append(dict(ctx.metadata))
        if req.id == "boom":
            raise RuntimeError("handler bug")
        if req.id == "missing":
            raise errdefs.NotFound(f"task {req.id}: not found")
        return shim_pb2.StateResponse(id=req.id, pid=42, status="RUNNING")

    async def Wait(self, req: shim_pb2.WaitRequest, ctx: CallContext) -> shim_pb2.WaitResponse:
        self.waiting += 1
        await self.released.wait()
        return shim_pb2.WaitResponse(exit_status=7)

    async def Shutdown(self, req: shim_pb2.ShutdownRequest, ctx: CallContext) -> empty_pb2.Empty:
        return empty_pb2.Empty()


@asynccontextmanager
async def serving(
    tmp: Path, peer_check: Callable[[PeerCred], bool] | None = None
) -> AsyncIterator[tuple[Server, FakeTasks, str]]:
    fake = FakeTasks()
    server = Server([bind(shim_pb2.DESCRIPTOR.services_by_name["Task"], fake, partial=True)])
    if peer_check is not None:
        server.peer_check = peer_check
    path = str(tmp / "s.sock")
    await server.serve_path(path)
    try:
        yield server, fake, path
    finally:
        fake.released.set()
        await server.shutdown(grace=0)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


async def raw_exchange(path: str, data: bytes, n: int) -> list[IncomingResponse]:
    """Send raw bytes and read ``n`` responses with a fresh client state machine."""
    reader, writer = await asyncio.open_unix_connection(path)
    conn = ClientConnection()
    writer.write(data)
    out: list[IncomingResponse] = []
    while len(out) < n:
        chunk = await reader.read(65536)
        assert chunk, "server closed the connection"
        out.extend(conn.receive(chunk))
    writer.close()
    return out


def state_frame(sid: int, payload: bytes, service: str = TASK, method: str = "State") -> bytes:
    c = ClientConnection(next_stream_id=sid)
    return c.request(service, method, payload)[1]


def test_200_concurrent_calls_with_blocking_ones(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, fake, path):
            client = Client(path)
            waits = [
                asyncio.create_task(
                    client.call(TASK, "Wait", shim_pb2.WaitRequest(id="t"), shim_pb2.WaitResponse)
                )
                for _ in range(50)
            ]
            states = [
                client.call(
                    TASK, "State", shim_pb2.StateRequest(id=f"t{i}"), shim_pb2.StateResponse
                )
                for i in range(150)
            ]
            answered = await asyncio.gather(*states)  # answered while 50 Waits block
            assert [r.id for r in answered] == [f"t{i}" for i in range(150)]
            assert not any(w.done() for w in waits)
            assert fake.waiting == 50
            fake.released.set()
            assert {r.exit_status for r in await asyncio.gather(*waits)} == {7}
            await client.close()

    run(main)


def test_deadline_from_timeout_nano(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, _fake, path):
            c = ClientConnection()
            _, frame = c.request(TASK, "Wait", b"", timeout_nano=100_000_000)
            (resp,) = await raw_exchange(path, frame, 1)
            assert resp.code == Code.DEADLINE_EXCEEDED
            client = Client(path)
            with pytest.raises(errdefs.DeadlineExceeded):
                await client.call(
                    TASK, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse, timeout=0.1
                )
            # the connection is still good after a timed-out call
            r = await client.call(
                TASK, "State", shim_pb2.StateRequest(id="x"), shim_pb2.StateResponse
            )
            assert r.pid == 42
            await client.close()

    run(main)


def test_error_kinds_and_messages(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, _fake, path):
            client = Client(path)

            async def state(tid: str) -> shim_pb2.StateResponse:
                return await client.call(
                    TASK, "State", shim_pb2.StateRequest(id=tid), shim_pb2.StateResponse
                )

            with pytest.raises(errdefs.NotFound, match="task missing: not found"):
                await state("missing")
            with pytest.raises(errdefs.Unknown, match="handler bug"):
                await state("boom")
            with pytest.raises(errdefs.NotImplemented, match=r"service nope\.Svc"):
                await client.call_raw("nope.Svc", "State", b"")
            with pytest.raises(errdefs.NotImplemented, match="method Frobnicate"):
                await client.call_raw(TASK, "Frobnicate", b"")
            with pytest.raises(errdefs.NotImplemented, match="method Pids"):
                await client.call_raw(TASK, "Pids", b"")  # not provided by the partial fake
            with pytest.raises(errdefs.Internal, match="unmarshalling payload"):
                await client.call_raw(TASK, "State", b"\xff\xff\xff")
            assert (await state("ok")).pid == 42  # still serving
            await client.close()

    run(main)


def test_garbage_body_and_even_stream_answered_on_that_stream_only(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, _fake, path):
            good = shim_pb2.StateRequest(id="g").SerializeToString()
            data = (
                encode_frame(1, TYPE_REQUEST, b"\x0a\xff\xff")  # not a ttrpc.Request
                + state_frame(2, good)  # even stream id
                + encode_frame(5, 0x7F, b"unknown type")  # ignored
                + state_frame(3, good)
            )
            got = {r.stream_id: r for r in await raw_exchange(path, data, 3)}
            assert got[1].code == Code.INVALID_ARGUMENT
            assert "unmarshal request error" in got[1].message
            assert got[2].code == Code.INVALID_ARGUMENT
            assert "StreamID must be odd" in got[2].message
            assert got[3].code == 0
            assert shim_pb2.StateResponse.FromString(got[3].payload).id == "g"
            assert 5 not in got

    run(main)


def test_oversized_request_answered_and_connection_lives(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, _fake, path):
            big = MAX_BODY + 10
            data = HEADER.pack(big, 1, TYPE_REQUEST, 0) + bytes(big)
            data += state_frame(3, shim_pb2.StateRequest(id="after").SerializeToString())
            got = {r.stream_id: r for r in await raw_exchange(path, data, 2)}
            assert got[1].code == Code.RESOURCE_EXHAUSTED
            assert (
                f"message length {big} exceed maximum message size of {MAX_BODY}" == got[1].message
            )
            assert got[3].code == 0

    run(main)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_bad_header_closes_only_that_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _fake, path):
            client = Client(path)
            await client.call(TASK, "State", shim_pb2.StateRequest(id="a"), shim_pb2.StateResponse)
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(HEADER.pack(4, 0, TYPE_REQUEST, 0) + b"abcd")  # stream 0
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
            writer.close()
            r = await client.call(
                TASK, "State", shim_pb2.StateRequest(id="b"), shim_pb2.StateResponse
            )
            assert r.id == "b"
            assert server.connections == 1
            await client.close()

    run(main)


def test_peer_vanishing_mid_frame_frees_the_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _fake, path):
            before = open_fds()
            for _ in range(20):
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                s.sendall(state_frame(1, b"x" * 100)[:37])  # half a frame
                s.close()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while (server.connections or open_fds() > before) and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert server.connections == 0
            assert open_fds() <= before

    run(main)


def test_peer_credentials_are_checked(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, peer_check=lambda cred: False) as (_, _fake, path):
            client = Client(path)
            with pytest.raises(errdefs.Unavailable, match="closed"):
                await client.call(
                    TASK, "State", shim_pb2.StateRequest(id="a"), shim_pb2.StateResponse
                )

    run(main)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_default_check_rejects_another_uid() -> None:
    # pytest's tmp_path lives under 0700 directories: use one nobody can reach.
    base = Path(tempfile.mkdtemp(prefix="podshim-cred-"))
    base.chmod(0o755)

    async def main() -> None:
        async with serving(base) as (_, _fake, path):
            os.chmod(path, 0o777)
            frame = state_frame(1, shim_pb2.StateRequest(id="a").SerializeToString())
            # A fresh, single-threaded Python (started as root, so it can run) drops to
            # nobody itself and then connects: forking this threaded test process would
            # run other libraries' at-fork handlers in the child.
            probe = (
                "import os, socket, sys\n"
                "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
                "s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sys.argv[1])\n"
                "try:\n"
                "    s.sendall(bytes.fromhex(sys.argv[2]))\n"
                "    n = len(s.recv(100))\n"
                "except (BrokenPipeError, ConnectionResetError):\n"
                "    n = 0  # closed by the server before or after our request\n"
                "print(n)\n"
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", probe, path, frame.hex(), stdout=asyncio.subprocess.PIPE
            )
            raw, _ = await proc.communicate()
            assert proc.returncode == 0
            out = raw.strip()
            assert out == b"0"  # closed without an answer

    try:
        run(main)
    finally:
        shutil.rmtree(base)


def test_client_fails_pending_calls_when_peer_closes_and_reconnects(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _fake, path):
            client = Client(path)
            pending = asyncio.create_task(
                client.call(TASK, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse)
            )
            await asyncio.sleep(0)
            while server.connections == 0:
                await asyncio.sleep(0.01)
            for conn in list(server._conns):
                conn.abort()
            with pytest.raises(errdefs.Unavailable, match="ttrpc: closed"):
                await pending
            r = await client.call(
                TASK, "State", shim_pb2.StateRequest(id="again"), shim_pb2.StateResponse
            )
            assert r.id == "again"
            await client.close()

    run(main)


def test_client_dial_error_is_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(errdefs.Unavailable, match="dial"):
            await Client(str(tmp_path / "none.sock")).call_raw(TASK, "State", b"")

    run(main)


def test_metadata_reaches_handlers(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, fake, path):
            client = Client(path, metadata=(("containerd-namespace-ttrpc", "k8s.io"),))
            await client.call(
                TASK,
                "State",
                shim_pb2.StateRequest(id="m"),
                shim_pb2.StateResponse,
                metadata=(("x", "1"), ("x", "2")),
            )
            assert fake.seen_metadata[-1] == {
                "containerd-namespace-ttrpc": ("k8s.io",),
                "x": ("1", "2"),
            }
            await client.close()

    run(main)


def test_graceful_shutdown_waits_and_immediate_cancels(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, fake, path):
            client = Client(path)
            pending = asyncio.create_task(
                client.call(TASK, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse)
            )
            while fake.waiting == 0:
                await asyncio.sleep(0.01)
            asyncio.get_running_loop().call_later(0.2, fake.released.set)
            await server.shutdown(grace=10)
            assert (await pending).exit_status == 7  # answered before the close
        async with serving(tmp_path / "..") as (server, fake, path):
            client = Client(path)
            pending = asyncio.create_task(
                client.call(TASK, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse)
            )
            while fake.waiting == 0:
                await asyncio.sleep(0.01)
            await server.shutdown(grace=0)
            with pytest.raises(errdefs.Unavailable):
                await pending
            with pytest.raises(errdefs.Unavailable):  # no longer accepting
                await Client(path).call_raw(TASK, "State", b"")

    run(main)
