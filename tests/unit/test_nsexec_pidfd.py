"""An exec in a namespaces pod host signals its process group only while the group's
leader is not reaped (issue 9, follow-up of defect 8).

Once the leader is reaped its pid is free: a process that got it and made itself a group
leader would get ``killpg(pid)``. The target here has no namespaces and no cgroup (no root
needed): what is checked is the group signalling alone. ``killpg``/``kill`` of a pid the
reaper already reaped fails the test (:class:`nshostutil.Guard`).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim.host.control import ExecControl
from podshim.host.namespaces import nsexec
from podshim.linux.reaper import Reaper

from .nshostutil import Guard, pidfds, poll

WAIT = "while :; do sleep 0.1; done"


def run(main: Callable[[Reaper, Guard], Awaitable[None]]) -> None:
    async def outer() -> None:
        reaper = Reaper()
        reaper.start()
        before = pidfds()
        try:
            with pytest.MonkeyPatch.context() as m:
                guard = Guard(reaper, m)
                await main(reaper, guard)
            assert guard.bad == []
            assert pidfds() == before  # the leader's pidfd is closed with the call
        finally:
            reaper.stop()

    asyncio.run(asyncio.wait_for(outer(), 60))


def _exec(reaper: Reaper, args: list[str], out: str, control: ExecControl) -> Awaitable[int]:
    target = nsexec.Target("p1", reaper)
    return nsexec.exec_in_host(target, args, "", out, "", False, control)


def test_the_group_is_not_signalled_after_the_leader_is_reaped(tmp_path: Path) -> None:
    async def main(reaper: Reaper, guard: Guard) -> None:
        for args in (["true"], ["sh", "-c", "exit 3"], ["sh", "-c", "kill -9 $$"]):
            await _exec(reaper, args, "", ExecControl())

    run(main)


def test_signals_reach_the_group_while_the_leader_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"

    async def main(reaper: Reaper, guard: Guard) -> None:
        c = ExecControl("s1")
        script = f"trap 'echo got-int; exit 3' INT; echo ready; {WAIT}"
        call = asyncio.ensure_future(_exec(reaper, ["sh", "-c", script], f"file://{out}", c))
        await poll(lambda: out.exists() and "ready" in out.read_text(), "the exec to be ready")
        c.signal(signal.SIGINT)  # the group: sleep dies too, the trap runs at once
        assert await asyncio.wait_for(call, 20) == 3
        assert out.read_text() == "ready\ngot-int\n"
        with pytest.raises(errdefs.FailedPrecondition):
            c.signal(signal.SIGINT)

    run(main)


def test_a_cancelled_call_kills_the_group_of_a_running_leader(tmp_path: Path) -> None:
    async def main(reaper: Reaper, guard: Guard) -> None:
        c = ExecControl("k1")
        call = asyncio.ensure_future(_exec(reaper, ["sleep", "300"], "", c))
        await poll(lambda: c.pid != 0, "the exec to start")
        pid = c.pid
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await poll(lambda: not os.path.exists(f"/proc/{pid}"), f"pid {pid} to be gone")

    run(main)
