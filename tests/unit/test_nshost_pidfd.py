"""The namespaces host names its PID-namespace init by a pidfd and watches its exit from
a reaper mark taken before the init was started (issue 9, follow-up of defect 8).

A stand-in launcher (a shell script in place of ``podshim-init``) starts a ``sleep`` that
is reparented to this process (made a child subreaper) and reports its pid, as the real
launcher does. We cannot make the kernel hand a pid out again, so the tests show the
mechanism: an unclaimed exit of an earlier holder of the init's pid is not taken for the
init's, and no signal goes to the init by pid once it could have been reaped (``kill(2)``
of a pid the reaper already reaped fails the test).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from podshim.host.namespaces import host as host_mod
from podshim.host.namespaces.cgroup import Resources
from podshim.host.namespaces.host import NamespacesHost
from podshim.linux.reaper import Exit, Reaper, Result, set_child_subreaper

from .nshostutil import Guard, pidfds, poll, run

LAUNCHER = "#!/bin/sh\nsleep 1000 </dev/null >/dev/null 2>&1 &\necho $!\n"
SPEC: dict[str, Any] = {"linux": {"namespaces": [{"type": "pid"}]}}


@pytest.fixture
def subreaper() -> Iterator[None]:
    set_child_subreaper()  # the init is reparented to this process, as to the shim
    try:
        yield
    finally:
        ctypes.CDLL(None, use_errno=True).prctl(36, 0, 0, 0, 0)


@pytest.fixture
def launcher(tmp_path: Path) -> str:
    path = tmp_path / "fake-podshim-init"
    path.write_text(LAUNCHER)
    path.chmod(0o755)
    return str(path)


def _kill_left(pids: list[int]) -> None:
    for pid in pids:  # what a failed test left: our children only
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_a_stale_exit_of_the_inits_pid_is_not_the_inits_and_close_kills_by_pidfd(
    tmp_path: Path, subreaper: None, launcher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        real_run = reaper.run

        async def run_launcher(argv: list[str], **kw: Any) -> Result:
            res = await real_run(argv, **kw)
            if argv[0] == launcher:
                pid = int(res.stdout)
                started.append(pid)
                # an earlier holder of the pid exited unclaimed (reaped before the mark)
                reaper._unclaimed[pid] = Exit(pid, 99, time.time() - 60)
            return res

        monkeypatch.setattr(reaper, "run", run_launcher)
        pidfds_before = pidfds()
        host = NamespacesHost("p1", "ns", SPEC, reaper, state_root=str(tmp_path / "st"),
                              init_binary=launcher)  # fmt: skip
        try:
            await host.create()
            path = await host.namespace_path("pid")
            (pid,) = started
            assert path == f"/proc/{pid}/ns/pid"
            assert host.init_pid == pid
            waiter = asyncio.ensure_future(host.wait())
            await asyncio.sleep(0.2)
            assert not waiter.done()  # the stale exit did not end the host
            assert len(pidfds() - pidfds_before) == 1  # the init's
            with monkeypatch.context() as m:
                guard = Guard(reaper, m)
                m.setattr(os, "kill", lambda *a: guard.bad.append(f"kill{a} by pid"))
                await host.close()
            assert guard.bad == []
            assert guard.pidfd_signals == [signal.SIGKILL]
            assert await asyncio.wait_for(waiter, 30) == 128 + signal.SIGKILL
            assert not os.path.exists(f"/proc/{pid}")  # killed and reaped
            assert pidfds() == pidfds_before
        finally:
            await host.close()
            reaper.stop()

    try:
        run(main)
    finally:
        _kill_left(started)


_REAL_KILL = os.kill


class _FailingCgroup:
    """A sandbox cgroup whose ``add`` fails after the init died and was reaped."""

    reaper: ClassVar[Reaper]
    added: ClassVar[list[int]] = []
    dirs: ClassVar[list[Any]] = []
    version = 1

    def __init__(self, path: str, *, pod_id: str) -> None:
        pass

    def planned(self) -> list[str]:
        return []

    async def create(self) -> None:
        pass

    def apply(self, res: Resources) -> None:
        pass

    async def add(self, pid: int) -> None:
        self.added.append(pid)
        _REAL_KILL(pid, signal.SIGKILL)  # the init dies ...
        # ... and is reaped before the host acts on the failure
        await poll(lambda: self.reaper.reaped_since(pid, 0), f"init {pid} to be reaped")
        raise OSError(f"fake cgroup: cannot add {pid}")

    async def remove(self, timeout: float = 10.0) -> list[str]:
        return []


def test_an_init_that_failed_to_start_is_not_killed_by_pid_after_its_reap(
    tmp_path: Path, subreaper: None, launcher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        _FailingCgroup.reaper = reaper
        monkeypatch.setattr(host_mod, "SandboxCgroup", _FailingCgroup)
        spec = {"linux": {"namespaces": [{"type": "pid"}], "cgroupsPath": "/podshim-t-fake"}}
        host = NamespacesHost("p2", "ns", spec, reaper, state_root=str(tmp_path / "st"),
                              init_binary=launcher)  # fmt: skip
        pidfds_before = pidfds()
        try:
            await host.create()
            with monkeypatch.context() as m:
                guard = Guard(reaper, m)
                with pytest.raises(OSError, match="fake cgroup"):
                    await host.namespace_path("pid")
            assert guard.bad == []
            assert guard.pidfd_signals == []  # it was gone: nothing to signal
            assert host.init_pid == 0
            assert pidfds() == pidfds_before
        finally:
            await host.close()
            reaper.stop()

    _FailingCgroup.added = []
    try:
        run(main)
    finally:
        _kill_left(_FailingCgroup.added)
