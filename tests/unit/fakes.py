"""Test doubles that honour the same contracts as the real objects."""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import any_pb2

from podshim import errors as errdefs


class FakeHost:
    """A pod host in memory: optional own namespaces, an init that tests can kill."""

    kind = "fake"

    def __init__(self, types: tuple[str, ...] = ("network", "ipc", "uts", "pid")) -> None:
        self.types = types
        self.created = False
        self.closes = 0
        self._died: asyncio.Future[int] | None = None
        self._closed = asyncio.Event()
        self._init_pid = 0

    async def create(self) -> None:
        self.created = True
        self._died = asyncio.get_running_loop().create_future()

    async def namespace_path(self, ns_type: str) -> str | None:
        if ns_type not in self.types:
            return None
        if ns_type == "pid" and not self._init_pid:
            self._init_pid = 4321
        return f"/run/fake/{ns_type}"

    @property
    def init_pid(self) -> int:
        return self._init_pid

    def die(self, status: int) -> None:
        assert self._died is not None
        self._died.set_result(status)

    async def wait(self) -> int:
        died = self._died
        assert died is not None
        closed: asyncio.Future[bool] = asyncio.ensure_future(self._closed.wait())
        waits: list[asyncio.Future[Any]] = [died, closed]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        return died.result() if died.done() else 0

    async def close(self) -> None:
        self.closes += 1
        self._closed.set()

    async def exec_in_host(
        self, args: list[str], stdin: str, stdout: str, stderr: str, terminal: bool
    ) -> int:
        return 0

    async def dump_stacks(self) -> str:
        return ""

    async def share(self, host_path: str, guest_path: str, read_only: bool) -> None:
        raise errdefs.FailedPrecondition("fake host cannot share")

    async def stats(self) -> any_pb2.Any | None:
        return None
