"""Plain (not ``async``) methods: the ttrpc server answers them inline, with no task.

Also the call contexts a connection shares between calls (read-only metadata).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim.api.task.v2 import shim_pb2
from podshim.errors import Code
from podshim.ttrpc.protocol import ClientConnection, IncomingRequest, IncomingResponse
from podshim.ttrpc.server import Interceptor, Server
from podshim.ttrpc.services import CallContext, InlineHandler, bind

TASK = "containerd.task.v2.Task"
NS = (("containerd-namespace-ttrpc", "k8s.io"),)


class PlainTasks:
    """State is a plain method; Wait is async and blocks until released."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, asyncio.Task[object] | None]] = []
        self.contexts: list[CallContext] = []
        self.released = asyncio.Event()

    def State(self, req: shim_pb2.StateRequest, ctx: CallContext) -> shim_pb2.StateResponse:
        self.log.append(("State", req.id, asyncio.current_task()))
        self.contexts.append(ctx)
        if req.id == "missing":
            raise errdefs.NotFound(f"task {req.id}: not found")
        if req.id == "boom":
            raise RuntimeError("handler bug")
        if req.id == "slow":
            raise TimeoutError("took too long")
        return shim_pb2.StateResponse(id=req.id, pid=42)

    async def Wait(self, req: shim_pb2.WaitRequest, ctx: CallContext) -> shim_pb2.WaitResponse:
        self.log.append(("Wait", req.id, asyncio.current_task()))
        await self.released.wait()
        return shim_pb2.WaitResponse(exit_status=7)


@asynccontextmanager
async def serving(
    tmp: Path, interceptor: Interceptor | None = None
) -> AsyncIterator[tuple[Server, PlainTasks, str]]:
    fake = PlainTasks()
    binding = bind(shim_pb2.DESCRIPTOR.services_by_name["Task"], fake, partial=True)
    server = Server([binding], interceptor=interceptor)
    path = str(tmp / "s.sock")
    await server.serve_path(path)
    try:
        yield server, fake, path
    finally:
        fake.released.set()
        await server.shutdown(grace=0)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


def frames(*calls: tuple[str, bytes, int]) -> tuple[list[int], bytes]:
    """One write holding a request per (method, payload, timeout_nano)."""
    conn = ClientConnection()
    out = [conn.request(TASK, m, p, t, NS) for m, p, t in calls]
    return [sid for sid, _ in out], b"".join(data for _, data in out)


async def exchange(path: str, data: bytes, n: int) -> dict[int, IncomingResponse]:
    reader, writer = await asyncio.open_unix_connection(path)
    conn = ClientConnection()
    writer.write(data)
    got: dict[int, IncomingResponse] = {}
    while len(got) < n:
        chunk = await reader.read(65536)
        assert chunk, "server closed the connection"
        got.update((r.stream_id, r) for r in conn.receive(chunk))
    writer.close()
    return got


def state(tid: str, timeout_nano: int = 0) -> tuple[str, bytes, int]:
    return ("State", shim_pb2.StateRequest(id=tid).SerializeToString(), timeout_nano)


def test_bind_makes_plain_methods_inline_handlers() -> None:
    binding = bind(shim_pb2.DESCRIPTOR.services_by_name["Task"], PlainTasks(), partial=True)
    assert isinstance(binding.methods["State"], InlineHandler)
    assert not isinstance(binding.methods["Wait"], InlineHandler)


def test_plain_method_is_answered_inline_without_a_task(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, fake, path):
            sids, data = frames(*(state(f"t{i}") for i in range(40)))
            got = await exchange(path, data, 40)
            for i, sid in enumerate(sids):
                assert got[sid].code == 0
                resp = shim_pb2.StateResponse.FromString(got[sid].payload)
                assert (resp.id, resp.pid) == (f"t{i}", 42)
            assert [entry[1] for entry in fake.log] == [f"t{i}" for i in range(40)]
            assert {entry[2] for entry in fake.log} == {None}  # no task of its own

    run(main)


def test_plain_method_errors_are_answered_as_from_a_task(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, fake, path):
            calls = [
                state("missing"),
                state("boom"),
                state("slow"),
                state("slow", timeout_nano=10**9),
                ("State", b"\xff\xff\xff", 0),
            ]
            sids, data = frames(*calls)
            got = await exchange(path, data, len(calls))
            answers = [(got[s].code, got[s].message) for s in sids]
            assert answers[0] == (Code.NOT_FOUND, "task missing: not found")
            assert answers[1] == (Code.UNKNOWN, "handler bug")
            assert answers[2][0] == errdefs.to_status(TimeoutError("took too long"))[0]
            assert answers[3] == (
                Code.DEADLINE_EXCEEDED,
                f"{TASK}/State: context deadline exceeded",
            )
            assert answers[4][0] == Code.INTERNAL
            assert "unmarshalling payload" in answers[4][1]
            assert len(fake.log) == 4 and {task for _, _, task in fake.log} == {None}  # inline

    run(main)


def test_after_a_call_that_needs_a_task_plain_calls_of_that_read_wait_their_turn(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, fake, path):
            wait = ("Wait", shim_pb2.WaitRequest(id="w").SerializeToString(), 0)
            sids, data = frames(state("before"), wait, state("after"))
            task = asyncio.create_task(exchange(path, data, 3))
            while len(fake.log) < 3:
                await asyncio.sleep(0.01)
            fake.released.set()
            got = await task
            assert [got[s].code for s in sids] == [0, 0, 0]
            # calls start in the order they came; only the first State ran inline
            assert [(m, tid) for m, tid, _ in fake.log] == [
                ("State", "before"),
                ("Wait", "w"),
                ("State", "after"),
            ]
            assert fake.log[0][2] is None
            assert fake.log[1][2] is not None and fake.log[2][2] is not None

    run(main)


def test_an_interceptor_sees_plain_calls_too(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []

    async def intercept(req: IncomingRequest, proceed: Callable[[], Awaitable[bytes]]) -> bytes:
        seen.append((req.method, shim_pb2.StateRequest.FromString(req.payload).id))
        return await proceed()

    async def main() -> None:
        async with serving(tmp_path, intercept) as (_, fake, path):
            sids, data = frames(state("a"), state("b"))
            got = await exchange(path, data, 2)
            assert [got[s].code for s in sids] == [0, 0]
            assert seen == [("State", "a"), ("State", "b")]
            assert all(task is not None for _, _, task in fake.log)

    run(main)


def test_calls_alike_share_one_read_only_context(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, fake, path):
            _, data = frames(state("a"), state("b"), state("c", timeout_nano=10**9))
            await exchange(path, data, 3)
            a, b, c = fake.contexts
            assert a is b  # same service, method and metadata, no deadline
            assert a.deadline is None and c.deadline is not None
            assert (
                dict(c.metadata) == dict(a.metadata) == {"containerd-namespace-ttrpc": ("k8s.io",)}
            )
            assert a.get("containerd-namespace-ttrpc") == "k8s.io"
            with pytest.raises(TypeError):
                a.metadata["x"] = ("y",)  # type: ignore[index]

    run(main)
