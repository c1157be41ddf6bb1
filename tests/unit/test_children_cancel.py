"""Cancelled calls leak no runtime child (issue 9, defect 6).

The real runc driver and the real reaper run a stand-in ``runc`` (a shell script with
runc's command line that takes its time, like a loaded machine's runc): a Create,
Start or Exec cancelled while it works must, by the time the CancelledError arrives,
have let it finish, undone its effect and reaped every process, and no other child's
exit status may be lost on the way. This test process is made a child subreaper for
the test, as the shim is, so the script's container processes are reparented to it.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from podshim.linux.reaper import Reaper, set_child_subreaper
from podshim.oci.runc import Runc
from podshim.oci.runtime import RuntimeConfig
from podshim.task.container import Container
from podshim.task.contract import ExecRequest, ShimContext
from podshim.task.states import Status

from .fakes import RecordingPublisher

#: runc's command line; each verb sleeps $DELAY first (long enough to be cancelled in)
FAKE_RUNC = r"""#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2;;
    --log) log=$2; shift 2;;
    --log-format) shift 2;;
    --systemd-cgroup) shift;;
    *) break;;
  esac
done
verb=$1; shift
echo "$verb" >> "$root/../calls"
fail() { echo "{\"level\":\"error\",\"msg\":\"$1\"}" >> "$log"; exit 1; }
sleep "$(cat "$root/../delay" 2>/dev/null || echo 0)"
case $verb in
create)
  while [ $# -gt 1 ]; do
    case "$1" in --bundle) shift 2;; --pid-file) pf=$2; shift 2;; *) shift;; esac
  done
  mkdir -p "$root/$1"
  sleep 1000 </dev/null >/dev/null 2>&1 &
  echo $! > "$root/$1/init"; echo $! > "$pf";;
start) [ -d "$root/$1" ] || fail "container does not exist"; touch "$root/$1/started";;
exec)
  while [ $# -gt 1 ]; do
    case "$1" in --pid-file) pf=$2; shift 2;; *) shift;; esac
  done
  [ -d "$root/$1" ] || fail "container does not exist"
  sleep 1000 </dev/null >/dev/null 2>&1 &
  echo $! >> "$root/$1/execs"; echo $! > "$pf";;
kill)
  [ "$1" = --all ] && shift
  [ -d "$root/$1" ] || fail "container does not exist"
  kill -"$2" "$(cat "$root/$1/init")" 2>/dev/null || fail "process already finished";;
delete)
  [ "$1" = --force ] && shift
  [ -d "$root/$1" ] || fail "container does not exist"
  kill -9 $(cat "$root/$1/init" "$root/$1/execs" 2>/dev/null) 2>/dev/null
  rm -rf "$root/$1";;
*) fail "unknown verb $verb";;
esac
"""


def _children() -> set[int]:
    """Pids whose parent is this process (zombies included)."""
    me, out = str(os.getpid()), set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[1] == me:
            out.add(int(name))
    return out


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.binary = tmp / "runc"
        self.binary.write_text(FAKE_RUNC)
        self.binary.chmod(0o755)
        self.root = tmp / "root"
        (self.root / "ns").mkdir(parents=True)
        self.bundle = tmp / "bundle"
        self.bundle.mkdir()
        spec = {"process": {"args": ["sleep", "1000"]}, "root": {"path": "rootfs"},
                "linux": {"namespaces": [{"type": "pid"}]}}  # fmt: skip
        (self.bundle / "config.json").write_text(json.dumps(spec))
        self.spec = spec
        self.pub = RecordingPublisher()

    def delay(self, seconds: float) -> None:
        (self.root / "delay").write_text(str(seconds))

    def calls(self) -> list[str]:
        path = self.root / "calls"
        return path.read_text().split() if path.exists() else []

    def container(self, reaper: Reaper) -> Container:
        cfg = RuntimeConfig(binary=str(self.binary), root=str(self.root))
        runc = Runc(cfg, "ns", reaper, str(self.bundle / "log.json"))
        ctx = ShimContext("ns", reaper, self.pub)
        return Container(ctx, "c1", str(self.bundle), self.spec, [], runc,
                         terminal=False, stdin="", stdout="", stderr="")  # fmt: skip


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    before = _children()
    set_child_subreaper()
    try:
        yield Lab(tmp_path)
    finally:
        ctypes.CDLL(None, use_errno=True).prctl(36, 0, 0, 0, 0)
        for pid in _children() - before:  # what a failing test left: ours only
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 90))


async def _cancel_when(coro: Awaitable[object], started: Callable[[], bool]) -> None:
    """Run ``coro``, cancel it once ``started()`` holds (the runtime is mid-verb)."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not started() and not task.done() and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert not task.done(), "the call ended before the runtime was mid-verb"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def _waitpid_spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every ``waitpid`` of one pid: only the reaper's ``waitpid(-1)`` may run."""
    by_pid: list[int] = []
    real = os.waitpid

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        if pid != -1:
            by_pid.append(pid)
        return real(pid, options)

    monkeypatch.setattr(os, "waitpid", waitpid)
    return by_pid


def test_cancelled_create_leaves_no_child_no_runtime_state_and_loses_no_exit(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    by_pid = _waitpid_spy(monkeypatch)
    before = _children()

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        c = lab.container(reaper)
        lab.delay(0.8)
        # other children of the shim come and go meanwhile: each exit is its own
        others = [asyncio.ensure_future(reaper.run(["sh", "-c", f"sleep 0.{i}; exit {i}"]))
                  for i in range(1, 9)]  # fmt: skip
        await _cancel_when(c.create(), lambda: lab.calls() == ["create"])
        # by now runc finished, its container was deleted and its init reaped
        assert not (lab.root / "ns" / "c1").exists()
        assert lab.calls() == ["create", "delete"]
        assert not (lab.bundle / "init.pid").exists()
        assert not (lab.bundle / "podshim-runtime.json").exists()
        assert _children() - before == {p for p in reaper.owned}  # only the others
        assert [r.status for r in await asyncio.gather(*others)] == list(range(1, 9))
        gc.collect()  # an abandoned Popen would now be queued to wait for its pid...
        assert (await reaper.run(["true"])).status == 0  # ... here, in Popen()
        assert lab.pub.topics == []
        reaper.stop()

    run(main)
    assert by_pid == []
    assert _children() == before


def test_cancelled_start_leaves_no_process(lab: Lab) -> None:
    before = _children()

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        c = lab.container(reaper)
        await c.create()
        init = c.pid
        lab.delay(0.8)
        await _cancel_when(c.start(""), lambda: lab.calls()[-1:] == ["start"])
        assert (lab.root / "ns" / "c1" / "started").exists()  # runc was let finish
        assert not os.path.exists(f"/proc/{init}")  # killed and reaped
        assert not c.running
        assert (await c.wait("")).status == 137
        assert c.state("").status is Status.STOPPED
        lab.delay(0)
        await c.delete("")
        assert lab.pub.topics == ["/tasks/create", "/tasks/exit", "/tasks/delete"]
        reaper.stop()

    run(main)
    assert _children() == before


def test_cancelled_exec_leaves_no_process(lab: Lab) -> None:
    before = _children()

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        c = lab.container(reaper)
        await c.create()
        await c.start("")
        process = any_pb2.Any(value=json.dumps({"args": ["sleep", "1000"]}).encode())
        await c.exec(ExecRequest("e1", False, "", "", "", process))
        lab.delay(0.8)
        await _cancel_when(c.start("e1"), lambda: lab.calls()[-1:] == ["exec"])
        execs = (lab.root / "ns" / "c1" / "execs").read_text().split()
        assert len(execs) == 1  # runc was let finish: the process existed...
        assert not os.path.exists(f"/proc/{execs[0]}")  # ... and is killed and reaped
        assert c.state("e1").status is Status.STOPPED
        assert c.running  # the init is untouched
        lab.delay(0)
        await c.delete("e1")
        await c.kill("", 9, False)
        await c.wait("")
        await c.delete("")
        reaper.stop()

    run(main)
    assert _children() == before


def test_cancelled_read_only_command_is_killed_and_reaped() -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        task = asyncio.ensure_future(reaper.run(["sleep", "1000"], on_cancel="kill"))
        while not reaper.owned:
            await asyncio.sleep(0.01)
        (pid,) = reaper.owned
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not reaper.owned and not os.path.exists(f"/proc/{pid}")
        reaper.stop()

    run(main)


def test_subprocess_keeps_no_popen_of_ours() -> None:
    """Popen objects whose child the reaper collected never wait for it themselves."""

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        task = asyncio.ensure_future(reaper.run(["sleep", "0.3"]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gc.collect()
        reaper.stop()

    run(main)
    active = getattr(subprocess, "_active", None) or []
    assert [p for p in active if p.returncode is None] == []


def test_a_runtime_call_cancelled_twice_is_awaited_to_its_end() -> None:
    """A ttrpc deadline and then the lost connection cancel a Create twice: the second
    must not end the wait for runc (the undo would look before runc made the container).
    The first cancellation reaches the call (the reaper's grace), the second does not."""
    from podshim.task.container import _to_its_end

    async def main() -> None:
        finished = asyncio.Event()
        seen: list[str] = []

        async def call() -> int:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                seen.append("cancelled")
                await asyncio.sleep(0.2)  # the reaper lets the command finish
                finished.set()
                raise
            return 1

        task = asyncio.ensure_future(_to_its_end(call()))
        await asyncio.sleep(0.05)
        task.cancel()  # the deadline
        await asyncio.sleep(0.05)
        task.cancel()  # the connection
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set() and seen == ["cancelled"]
        assert await _to_its_end(asyncio.sleep(0, result=7)) == 7

    asyncio.run(main())


def test_wait_through_cancels() -> None:
    """The one wait both runtime drivers use after a cancel (runc on the host, and in
    the guest through the agent): cancellations do not end it, its timeout does."""
    from podshim.jobs import wait_through_cancels

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        loop.call_later(0.3, fut.set_result, 1)
        waiter = asyncio.ensure_future(wait_through_cancels(fut))
        for _ in range(3):
            await asyncio.sleep(0.05)
            waiter.cancel()
        assert await waiter is True and fut.done()
        never: asyncio.Future[int] = loop.create_future()
        t0 = loop.time()
        assert await wait_through_cancels(never, 0.2) is False
        assert loop.time() - t0 >= 0.2

    asyncio.run(main())
