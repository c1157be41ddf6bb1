"""Processes are named by pidfds, never by a pid that may be reused (issue 9, defect 8).

An exited process is reported only once its output has drained (up to 5 s after the
reap). In that window its pid is free for reuse: Kill must not signal it by pid, and
the container must not count as running (the pod accepts ``/proc/<pid>/ns/pid`` only of
running containers). We cannot make the kernel hand a pid out again, so the tests show
the mechanism: Kill goes through the pidfd (``kill(2)`` by pid fails the test), the
liveness comes from it, and a stale exit of an earlier holder of the pid is never taken
for the new process's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.linux.reaper import Exit, Reaper
from podshim.oci.runtime import RuntimeConfig
from podshim.task.container import Container
from podshim.task.contract import ExecRequest, ShimContext
from podshim.task.states import Status

from .fakeoci import FakeOci
from .fakes import RecordingPublisher

#: exits at once, but a child keeps its stdout open: the exit is reaped at once and
#: reported only when the output has drained (when the child ends)
LINGERING_OUTPUT = ["sh", "-c", "sleep 3 & exit 0"]


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 60))


class Env:
    def __init__(self, tmp: Path, args: list[str]) -> None:
        self.spec = {"process": {"args": args}, "root": {"path": "rootfs"},
                     "linux": {"namespaces": [{"type": "pid"}]}}  # fmt: skip
        self.bundle = tmp / "bundle"
        self.bundle.mkdir()
        (self.bundle / "config.json").write_text(json.dumps(self.spec))
        self.oci = FakeOci(RuntimeConfig(binary="fake-runc", root=str(tmp / "root")))
        self.stdout = str(tmp / "stdout")
        os.mkfifo(self.stdout)
        # containerd's side of the FIFO: open before Create, read what comes
        self.reader = os.open(self.stdout, os.O_RDONLY | os.O_NONBLOCK)

    def container(self, reaper: Reaper) -> Container:
        ctx = ShimContext("ns", reaper, RecordingPublisher())
        return Container(ctx, "c1", str(self.bundle), self.spec, [], self.oci,
                         terminal=False, stdin="", stdout=self.stdout, stderr="")  # fmt: skip

    def close(self) -> None:
        """Also kill what a failed test left: only children of this process (a child's
        pid is not reused before it is waited for)."""
        os.close(self.reader)
        left = [*self.oci.inits.values(), *(p for ps in self.oci.execs.values() for p in ps)]
        for pid in left:
            if _parent(pid) == os.getpid():
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except OSError:
        return 0


async def _until_reaped(pid: int) -> None:
    """Until ``pid`` has no /proc entry (a zombie has one): the reaper collected it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while os.path.exists(f"/proc/{pid}"):
        assert loop.time() < deadline, f"pid {pid} not reaped"
        await asyncio.sleep(0.01)


def _no_kill_by_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    def kill(pid: int, sig: int) -> None:
        raise AssertionError(f"kill({pid}, {sig}) by pid: the pid may be reused")

    monkeypatch.setattr(os, "kill", kill)


def test_exec_kill_after_the_reap_before_the_report_signals_no_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Env(tmp_path, ["sleep", "1000"])

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        c = env.container(reaper)
        await c.create()
        await c.start("")
        process = any_pb2.Any(value=json.dumps({"args": LINGERING_OUTPUT}).encode())
        await c.exec(ExecRequest("e1", False, "", env.stdout, "", process))
        pid = await c.start("e1")
        await _until_reaped(pid)
        assert c.state("e1").status is Status.RUNNING  # exit not reported yet
        with monkeypatch.context() as m:
            _no_kill_by_pid(m)
            with pytest.raises(errdefs.NotFound, match="already finished"):
                await c.kill("e1", 9, False)
        assert (await c.wait("e1")).status == 0
        await c.kill("", 9, False)
        await c.wait("")
        await c.delete("e1")
        await c.delete("")
        reaper.stop()

    try:
        run(main)
    finally:
        env.close()


def test_exec_kill_of_a_running_exec_goes_through_its_pidfd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Env(tmp_path, ["sleep", "1000"])

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        c = env.container(reaper)
        await c.create()
        await c.start("")
        process = any_pb2.Any(value=json.dumps({"args": ["sleep", "1000"]}).encode())
        await c.exec(ExecRequest("e1", False, "", "", "", process))
        await c.start("e1")
        sent: list[tuple[int, int]] = []
        real = signal.pidfd_send_signal

        def pidfd_send_signal(fd: int, sig: int, *args: Any) -> None:
            sent.append((fd, sig))
            real(fd, sig, *args)

        with monkeypatch.context() as m:
            _no_kill_by_pid(m)
            m.setattr(signal, "pidfd_send_signal", pidfd_send_signal)
            await c.kill("e1", 15, False)
        assert sent == [(c.execs["e1"].pidfd, 15)]
        assert (await c.wait("e1")).status == 128 + 15
        await c.kill("", 9, False)
        await c.wait("")
        await c.delete("")
        reaper.stop()

    try:
        run(main)
    finally:
        env.close()


def test_an_exited_init_is_not_running_before_its_exit_is_reported(tmp_path: Path) -> None:
    """What the pod asks before it accepts ``/proc/<pid>/ns/pid`` of a container."""
    env = Env(tmp_path, LINGERING_OUTPUT)

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        c = env.container(reaper)
        await c.create()
        pid = await c.start("")
        await _until_reaped(pid)
        assert c.state("").status is Status.RUNNING  # exit not reported yet
        assert not c.running
        with pytest.raises(errdefs.NotFound):
            c.metrics()  # nor measured by its pid
        assert (await c.wait("")).status == 0
        await c.delete("")
        reaper.stop()

    try:
        run(main)
    finally:
        env.close()


def test_a_stale_exit_of_an_earlier_holder_of_the_pid_is_not_this_process(
    tmp_path: Path,
) -> None:
    """The reaper keeps exits nobody claimed yet; one reaped before this process existed
    (its pid's earlier holder) must not be reported as this process's exit."""
    env = Env(tmp_path, ["sleep", "1000"])
    reapers: list[Reaper] = []
    real_create = FakeOci.create

    async def create(self: FakeOci, cid: str, bundle: str, pid_file: str, *a: Any) -> None:
        await real_create(self, cid, bundle, pid_file, *a)
        pid = self.inits[cid]  # pretend the pid's earlier holder exited unclaimed
        reapers[0]._unclaimed[pid] = Exit(pid, 99, time.time() - 60)

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        reapers.append(reaper)
        c = env.container(reaper)
        await c.create()
        await c.start("")
        await asyncio.sleep(0.2)
        assert c.state("").status is Status.RUNNING and c.running
        await c.kill("", 9, False)
        assert (await c.wait("")).status == 137
        await c.delete("")
        reaper.stop()

    with pytest.MonkeyPatch.context() as m:
        m.setattr(FakeOci, "create", create)
        try:
            run(main)
        finally:
            env.close()


def _pidfds() -> set[int]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                out.add(int(fd))
        except OSError:
            pass
    return out


def test_pidfds_are_held_while_processes_live_and_closed_after(tmp_path: Path) -> None:
    env = Env(tmp_path, ["sleep", "1000"])

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        fds_before, pidfds_before = len(os.listdir("/proc/self/fd")), _pidfds()
        for _ in range(5):
            c = env.container(reaper)
            await c.create()
            await c.start("")
            process = any_pb2.Any(value=json.dumps({"args": ["sleep", "1000"]}).encode())
            await c.exec(ExecRequest("e1", False, "", "", "", process))
            await c.start("e1")
            held = _pidfds() - pidfds_before
            assert held == {c.init.pidfd, c.execs["e1"].pidfd}
            await c.kill("e1", 9, False)
            await c.wait("e1")
            assert _pidfds() - pidfds_before == {c.init.pidfd}  # closed on the reap
            await c.delete("e1")
            await c.kill("", 9, False)
            await c.wait("")
            await c.delete("")
        assert _pidfds() == pidfds_before
        assert len(os.listdir("/proc/self/fd")) == fds_before
        reaper.stop()

    try:
        run(main)
    finally:
        env.close()
