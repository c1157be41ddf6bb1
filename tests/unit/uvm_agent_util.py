"""Shared by the guest agent's tests (``test_uvm_agent*.py``): the agent, compiled once per
session and run on the host with ``--listen`` in a test's temporary directory."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim.host.uvm.agentapi import SpawnSpec
from podshim.host.uvm.agentbuild import build_agent
from podshim.host.uvm.agentclient import AgentClient


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


@pytest.fixture(scope="session")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the guest agent cannot be compiled")
    # one path for the session: build_agent does nothing when it is current
    return build_agent(str(tmp_path_factory.getbasetemp() / "podshim-agent"))


class Agent:
    """An agent process serving ``sock``."""

    def __init__(self, binary: str, tmp: Path) -> None:
        self.sock = str(tmp / "agent.sock")
        self.log = tmp / "agent.log"
        self.tmp = tmp
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "--listen", self.sock],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(tmp)},
            )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the agent did not listen: {self.log.read_text()}")
            time.sleep(0.005)

    def client(self) -> AgentClient:
        return AgentClient(self.sock)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                asyncio.run(asyncio.wait_for(_shutdown(self.sock), 10))
            except (errdefs.ShimError, TimeoutError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()


async def _shutdown(sock: str) -> None:
    c = AgentClient(sock)
    try:
        await c.shutdown()
    finally:
        await c.close()


@pytest.fixture
def agent(agent_binary: str, tmp_path: Path) -> Iterator[Agent]:
    a = Agent(agent_binary, tmp_path)
    try:
        yield a
    finally:
        a.stop()


@asynccontextmanager
async def connected(agent: Agent) -> AsyncIterator[AgentClient]:
    c = agent.client()
    try:
        yield c
    finally:
        await c.close()


async def read_all(c: AgentClient, key: str, stream: int = 1) -> bytes:
    out = bytearray()
    while True:
        chunk = await c.read(key, stream)
        out += chunk.data
        if chunk.eof:
            return bytes(out)


async def read_until(c: AgentClient, key: str, want: bytes, stream: int = 1) -> bytes:
    """Read stdout until ``want`` was seen (AssertionError at EOF without it)."""
    out = bytearray()
    while want not in out:
        chunk = await c.read(key, stream)
        out += chunk.data
        if chunk.eof and want not in out:
            raise AssertionError(f"EOF without {want!r}: {bytes(out)!r}")
    return bytes(out)


async def sh(
    c: AgentClient, key: str, script: str, *, stdin: bool = False, stdout: bool = False,
    stderr: bool = False,
) -> int:  # fmt: skip
    return await c.spawn(
        SpawnSpec(key=key, args=("sh", "-c", script), stdin=stdin, stdout=stdout, stderr=stderr)
    )
