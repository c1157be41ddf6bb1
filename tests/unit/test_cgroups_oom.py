"""OOM watchers: v2 against ordinary files (inotify works on any filesystem), v1 live
(root on a cgroup v1 host): a real OOM kill, and cgroup removal ending the watch."""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim.cgroups import mode
from podshim.cgroups.oom import OomWatcherV1, OomWatcherV2, open_watcher, watch_oom

MEMORY = Path("/sys/fs/cgroup/memory")
DEADLINE = 10.0  # generous: a loaded 2-core machine
EVENTS = "low 0\nhigh 0\nmax {max}\noom {oom}\noom_kill {kill}\noom_group_kill 0\n"


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def readable(fd: int, timeout: float = DEADLINE) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


# --- v2, simulated with a plain memory.events file -------------------------------------


@pytest.fixture
def fake_v2(tmp_path: Path) -> Path:
    (tmp_path / "memory.events").write_text(EVENTS.format(max=3, oom=1, kill=1))
    return tmp_path


def bump(cgroup: Path, kills: int) -> None:
    (cgroup / "memory.events").write_text(EVENTS.format(max=9, oom=kills, kill=kills))


def test_v2_counts_new_oom_kills_only(fake_v2: Path) -> None:
    before = open_fds()
    with OomWatcherV2(str(fake_v2)) as watcher:
        assert not readable(watcher.fileno(), 0)
        bump(fake_v2, 3)  # 1 kill happened before we watched: 2 are new
        assert readable(watcher.fileno())
        assert watcher.read() == 2
        assert watcher.read() == 0
        assert not watcher.closed
    assert watcher.closed
    assert open_fds() == before


def test_v2_notices_removal(fake_v2: Path) -> None:
    with OomWatcherV2(str(fake_v2)) as watcher:
        (fake_v2 / "memory.events").unlink()
        assert readable(watcher.fileno())
        assert watcher.read() == 0
        assert watcher.closed


def test_open_watcher_picks_the_version(fake_v2: Path, tmp_path: Path) -> None:
    with open_watcher(str(fake_v2)) as watcher:
        assert isinstance(watcher, OomWatcherV2)
    empty = tmp_path / "empty"
    empty.mkdir()
    before = open_fds()
    with pytest.raises(errdefs.NotFound, match=r"memory\.oom_control"):
        open_watcher(str(empty))
    with pytest.raises(errdefs.NotFound, match=r"memory\.events"):
        OomWatcherV2(str(empty))
    assert open_fds() == before


def test_watch_oom_v2_calls_back_and_ends_with_the_cgroup(fake_v2: Path) -> None:
    async def scenario() -> int:
        calls: list[None] = []
        seen = asyncio.Event()

        def on_oom() -> None:
            calls.append(None)
            seen.set()

        task = asyncio.create_task(watch_oom(str(fake_v2), on_oom, recheck_interval=60))
        await asyncio.sleep(0.05)  # let it register
        bump(fake_v2, 2)
        await asyncio.wait_for(seen.wait(), DEADLINE)
        (fake_v2 / "memory.events").unlink()
        await asyncio.wait_for(task, DEADLINE)
        return len(calls)

    before = open_fds()
    assert asyncio.run(scenario()) == 1
    assert open_fds() == before


def test_watch_oom_survives_a_failing_callback(fake_v2: Path) -> None:
    async def scenario() -> int:
        calls = 0

        def on_oom() -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("publisher down")

        task = asyncio.create_task(watch_oom(str(fake_v2), on_oom, recheck_interval=60))
        for kills in (2, 3):
            await asyncio.sleep(0.05)
            bump(fake_v2, kills)
            deadline = time.monotonic() + DEADLINE
            while calls < kills - 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return calls

    before = open_fds()
    assert asyncio.run(scenario()) == 2
    assert open_fds() == before


def test_watch_oom_recheck_notices_a_vanished_directory(tmp_path: Path) -> None:
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "memory.events").write_text(EVENTS.format(max=0, oom=0, kill=0))

    async def scenario() -> None:
        task = asyncio.create_task(watch_oom(str(cgroup), lambda: None, recheck_interval=0.05))
        await asyncio.sleep(0.05)
        # rename away: the watched file still exists (no inotify event), the dir is gone
        cgroup.rename(tmp_path / "elsewhere")
        await asyncio.wait_for(task, DEADLINE)

    asyncio.run(scenario())


# --- v1, live ------------------------------------------------------------------------


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A fresh v1 memory cgroup, removed (and checked) after the test."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not MEMORY.is_dir() or mode() == "unified" or not (MEMORY / "cgroup.event_control").exists():
        pytest.skip("needs the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    path = MEMORY / f"podshim-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        deadline = time.monotonic() + 5
        while path.exists():
            try:
                path.rmdir()
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def limit_memory(cgroup: Path, limit: int) -> None:
    (cgroup / "memory.limit_in_bytes").write_text(str(limit))
    memsw = cgroup / "memory.memsw.limit_in_bytes"
    if memsw.exists():  # no escape into swap
        memsw.write_text(str(limit))


def start_hog(cgroup: Path) -> subprocess.Popen[bytes]:
    """A python that, once moved into ``cgroup``, touches 64 MiB."""
    code = "import sys; sys.stdin.readline(); hog = b'x' * (64 << 20); print('survived')"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    assert child.stdin is not None
    (cgroup / "cgroup.procs").write_text(str(child.pid))
    child.stdin.write(b"go\n")
    child.stdin.close()
    return child


@pytest.mark.integration
def test_v1_reports_an_oom_kill(memory_cgroup: Path) -> None:
    limit_memory(memory_cgroup, 16 << 20)
    before = open_fds()
    with OomWatcherV1(str(memory_cgroup)) as watcher:
        assert watcher.read() == 0
        child = start_hog(memory_cgroup)
        try:
            total = 0
            deadline = time.monotonic() + DEADLINE
            while total == 0 and time.monotonic() < deadline:
                if readable(watcher.fileno(), 0.1):
                    total += watcher.read()
            assert total >= 1
        finally:
            child.kill()
            assert child.wait() == -9  # the OOM killer's SIGKILL (or ours)
        assert not watcher.closed
    assert open_fds() == before


@pytest.mark.integration
def test_v1_watch_oom_calls_back_then_ends_on_rmdir(memory_cgroup: Path) -> None:
    limit_memory(memory_cgroup, 16 << 20)

    async def scenario() -> None:
        seen = asyncio.Event()
        # a long recheck: the end must come from the kernel's removal signal
        task = asyncio.create_task(watch_oom(str(memory_cgroup), seen.set, recheck_interval=60))
        await asyncio.sleep(0.05)
        child = start_hog(memory_cgroup)
        try:
            await asyncio.wait_for(seen.wait(), DEADLINE)
        finally:
            child.kill()
            await asyncio.to_thread(child.wait)
        assert not task.done()
        memory_cgroup.rmdir()
        await asyncio.wait_for(task, DEADLINE)

    before = open_fds()
    asyncio.run(scenario())
    assert open_fds() == before


@pytest.mark.integration
def test_v1_rmdir_ends_watch_oom_without_any_oom(memory_cgroup: Path) -> None:
    calls: list[None] = []

    async def scenario() -> None:
        task = asyncio.create_task(
            watch_oom(str(memory_cgroup), lambda: calls.append(None), recheck_interval=60)
        )
        await asyncio.sleep(0.05)
        assert not task.done()
        memory_cgroup.rmdir()
        await asyncio.wait_for(task, DEADLINE)

    asyncio.run(scenario())
    assert calls == []
