"""The guest agent (``src/podshim/host/uvm/agent/``) through :class:`AgentClient`: processes,
their stdio and exit statuses, orphans, signals, keys. The agent runs on the host with
``--listen`` (see ``uvm_agent_util``)."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from podshim import __version__
from podshim import errors as errdefs
from podshim.host.uvm.agentapi import STDERR, STDOUT, SpawnSpec
from tests.unit.uvm_agent_util import (
    Agent,
    connected,
    read_all,
    read_until,
    run,
    sh,
)


def test_ping(agent: Agent) -> None:
    async def go() -> None:
        async with connected(agent) as c:
            info = await c.ping()
            assert info.version == __version__
            assert info.kernel == os.uname().release
            assert info.uptime_ms > 0

    run(go)


def test_stdio_pipes(agent: Agent) -> None:
    async def go() -> None:
        async with connected(agent) as c:
            spec = SpawnSpec(key="cat", args=("cat",), stdin=True, stdout=True, stderr=True)
            pid = await c.spawn(spec)
            assert pid > 0
            assert await c.write_stdin("cat", b"hello ") == 6
            assert await c.write_stdin("cat", b"world\n") == 6
            await c.close_stdin("cat")
            assert await read_all(c, "cat") == b"hello world\n"
            assert await read_all(c, "cat", STDERR) == b""
            assert await c.wait("cat") == 0
            await sh(c, "err", "echo out; echo oops >&2; echo $0 $1", stdout=True, stderr=True)
            assert await read_all(c, "err", STDERR) == b"oops\n"
            assert await read_all(c, "err", STDOUT) == b"out\nsh\n"
            # env and cwd
            env = ("PATH=/usr/bin:/bin", "FOO=bar baz")
            spec = SpawnSpec(
                key="env", args=("sh", "-c", 'echo "$FOO"; pwd'), env=env, cwd="/tmp", stdout=True
            )
            await c.spawn(spec)
            assert await read_all(c, "env") == b"bar baz\n/tmp\n"

    run(go)


def test_exit_statuses_and_waiting_twice(agent: Agent) -> None:
    async def go() -> None:
        async with connected(agent) as c:
            await sh(c, "seven", "exit 7")
            await sh(c, "killed", "kill -9 $$")
            await sh(c, "termed", "kill -TERM $$")
            assert await c.wait("seven") == 7
            assert await c.wait("seven") == 7
            assert list(await asyncio.gather(c.wait("killed"), c.wait("killed"))) == [137, 137]
            assert await c.wait("termed") == 143

    run(go)


def test_output_stays_readable_after_exit(agent: Agent) -> None:
    async def go() -> None:
        async with connected(agent) as c:
            await sh(c, "gone", "printf abc; printf def >&2", stdout=True, stderr=True)
            assert await c.wait("gone") == 0
            assert await read_all(c, "gone", STDERR) == b"def"
            chunk = await c.read("gone", STDOUT, 2)
            assert chunk.data == b"ab" and not chunk.eof
            assert await read_all(c, "gone") == b"c"

    run(go)


def test_large_output(agent: Agent) -> None:
    """Several MiB through a 1 MiB buffer: the process is held back, nothing is lost."""

    async def go() -> None:
        async with connected(agent) as c:
            await c.spawn(SpawnSpec(key="seq", args=("seq", "1", "700000"), stdout=True))
            out = await read_all(c, "seq")
            assert len(out) > 4 << 20
            assert out == b"".join(b"%d\n" % i for i in range(1, 700001))
            assert await c.wait("seq") == 0

    run(go)


def test_stdin_back_pressure(agent: Agent) -> None:
    async def go() -> None:
        async with connected(agent) as c:
            # nobody reads: the queue fills up to 1 MiB (plus what the pipe holds)
            await sh(c, "idle", "exec sleep 30", stdin=True)
            taken = 0
            with pytest.raises(errdefs.ResourceExhausted):
                for _ in range(64):
                    taken += await c.write_stdin("idle", b"x" * (256 << 10))
            assert (1 << 20) <= taken <= (1 << 20) + (1 << 20)
            await c.signal(9, key="idle")
            assert await c.wait("idle") == 137
            # cat: 3 MiB in while reading out, retrying when the queue is full
            await c.spawn(SpawnSpec(key="cat", args=("cat",), stdin=True, stdout=True))
            data = bytes(range(256)) * (12 << 10)

            async def feed() -> None:
                pos = 0
                while pos < len(data):
                    try:
                        pos += await c.write_stdin("cat", data[pos : pos + (512 << 10)])
                    except errdefs.ResourceExhausted:
                        await asyncio.sleep(0.01)
                await c.close_stdin("cat")

            out, _ = await asyncio.gather(read_all(c, "cat"), feed())
            assert out == data

    run(go)


def test_orphans_wait_pid(agent: Agent) -> None:
    async def go() -> None:
        async with connected(agent) as c:
            await sh(c, "parent", "sleep 0.3 & echo $!", stdout=True)
            pid = int(await read_until(c, "parent", b"\n"))
            assert await c.wait("parent") == 0
            assert await c.wait_pid(pid) == 0
            # reaped before anybody asked: still answered
            await sh(c, "parent2", "(exit 5) & echo $!", stdout=True)
            pid2 = int(await read_until(c, "parent2", b"\n"))
            for _ in range(1000):
                agent_state, _ = await c.stacks()
                if f"reaped pid {pid2} status 5" in agent_state:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"pid {pid2} not reaped: {agent_state}")
            assert await c.wait_pid(pid2) == 5
            assert await c.wait_pid(pid2) == 5
            with pytest.raises(errdefs.NotFound):
                await c.wait_pid(0x3FFFFFF0)  # over pid_max: no such process

    run(go)


def test_signals(agent: Agent) -> None:
    async def go() -> None:
        async with connected(agent) as c:
            await sh(c, "bykey", "exec sleep 30")
            pid = await c.spawn(SpawnSpec(key="bypid", args=("sleep", "30")))
            await c.signal(15, key="bykey")
            await c.signal(9, pid=pid)
            assert await c.wait("bykey") == 143
            assert await c.wait("bypid") == 137
            with pytest.raises(errdefs.NotFound):
                await c.signal(9, key="bykey")  # exited
            with pytest.raises(errdefs.NotFound):
                await c.signal(9, pid=0x3FFFFFF0)

    run(go)


def test_release(agent: Agent) -> None:
    async def go() -> None:
        async with connected(agent) as c:
            # the key's process exits, a background child keeps its stdout open
            await sh(c, "k", "sleep 30 & echo $!", stdout=True)
            bg = int(await read_until(c, "k", b"\n"))
            assert await c.wait("k") == 0
            pending = asyncio.ensure_future(c.read("k", STDOUT))
            await asyncio.sleep(0.05)
            assert not pending.done()
            await c.release("k")
            chunk = await pending
            assert chunk.eof and chunk.data == b""
            with pytest.raises(errdefs.NotFound):
                await c.read("k", STDOUT)
            await c.signal(9, pid=bg)
            assert await c.wait_pid(bg) == 137
            # a running key cannot be released; the key can be used again once it is
            await sh(c, "run", "exec sleep 30")
            with pytest.raises(errdefs.FailedPrecondition):
                await c.release("run")
            await c.signal(9, key="run")
            await c.wait("run")
            await c.release("run")
            await sh(c, "run", "exit 3")
            assert await c.wait("run") == 3

    run(go)


def test_bad_keys_and_programs(agent: Agent) -> None:
    async def go() -> None:
        async with connected(agent) as c:
            for call in (
                c.wait("nope"),
                c.read("nope", STDOUT),
                c.write_stdin("nope", b"x"),
                c.close_stdin("nope"),
                c.signal(9, key="nope"),
                c.release("nope"),
                c.resize("nope", 80, 24),
            ):
                with pytest.raises(errdefs.NotFound, match="nope"):
                    await call
            await sh(c, "dup", "exec sleep 30")
            with pytest.raises(errdefs.AlreadyExists, match="dup"):
                await sh(c, "dup", "true")
            with pytest.raises(errdefs.NotFound, match="no-such-program"):
                await c.spawn(SpawnSpec(key="bad", args=("no-such-program",)))
            with pytest.raises(errdefs.NotFound, match="/no/such"):
                await c.spawn(SpawnSpec(key="bad", args=("/no/such/program",)))
            with pytest.raises(errdefs.NotFound, match="/no/such/dir"):
                await c.spawn(SpawnSpec(key="bad", args=("true",), cwd="/no/such/dir"))
            await c.spawn(SpawnSpec(key="bad", args=("true",)))  # no key was left behind
            assert await c.wait("bad") == 0
            with pytest.raises(errdefs.FailedPrecondition):
                await c.write_stdin("bad", b"x")  # it has no stdin
            with pytest.raises(errdefs.FailedPrecondition):
                await c.resize("bad", 80, 24)  # nor a terminal
            with pytest.raises(errdefs.InvalidArgument):
                await c.read("bad", 3)
            with pytest.raises(errdefs.InvalidArgument):
                await c.spawn(SpawnSpec(key="", args=("true",)))
            await c.signal(9, key="dup")

    run(go)


def test_stacks_name_live_keys(agent: Agent) -> None:
    async def go() -> None:
        async with connected(agent) as c:
            pid = await c.spawn(SpawnSpec(key="stk-sleeper", args=("sleep", "30")))
            waiting = asyncio.ensure_future(c.wait("stk-sleeper"))
            await asyncio.sleep(0.05)
            agent_state, tasks = await c.stacks()
            assert f"key stk-sleeper pid {pid} running" in agent_state
            assert "pending Wait" in agent_state and "key stk-sleeper" in agent_state
            assert re.search(rf"^{pid} sleep [RSD] ", tasks, re.M), tasks[:2000]
            await c.signal(9, key="stk-sleeper")
            assert await waiting == 137

    run(go)
