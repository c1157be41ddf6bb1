"""A crashing shim daemon: where panic.log goes, and which ``delete`` relays it.

The whole path with a real daemon and containerd is tested in
``tests/integration/test_oom_stats.py``; here the pieces, in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from podshim.jobs import JobGroup
from podshim.linux.reaper import Reaper
from podshim.oci import bundle as files
from podshim.service.tasks import TaskService
from podshim.shim import daemon, panic
from podshim.task.contract import ShimContext
from podshim_lab.faults import CRASH_ENV as TEST_CRASH_ENV
from podshim_lab.faults import DeliberateCrash, crash_after_create
from tests.unit.fakes import RecordingPublisher

SHIM = str(Path(sys.executable).parent / "containerd-shim-podshim-v1")
T = "io.kubernetes.cri.container-type"
S = "io.kubernetes.cri.sandbox-id"


def failure(message: str = "boom") -> BaseException:
    """An exception with a real traceback."""
    try:
        raise RuntimeError(message)
    except RuntimeError as exc:
        return exc


def bundle(tmp: Path, name: str, annotations: dict[str, str] | None = None) -> Path:
    b = tmp / name
    b.mkdir()
    spec: dict[str, Any] = {"process": {"args": ["sh"]}, "root": {"path": "rootfs"}}
    if annotations is not None:
        spec["annotations"] = annotations
    (b / "config.json").write_text(json.dumps(spec))
    return b


def run_delete(b: Path, tid: str) -> subprocess.CompletedProcess[bytes]:
    """The real ``delete`` action, as containerd runs it."""
    argv = [SHIM, "-namespace", "ns1", "-address", "/nonexistent", "-id", tid, "-bundle", str(b)]
    return subprocess.run([*argv, "delete"], cwd=b, capture_output=True, timeout=60, check=False)


# -- writing ----------------------------------------------------------------------------------


def test_write_panic_appends_the_traceback(tmp_path: Path) -> None:
    path = panic.write_panic(str(tmp_path), failure("first"))
    assert path == str(tmp_path / files.PANIC)
    panic.write_panic(str(tmp_path), failure("second"))
    text = Path(path).read_text()
    assert text.count("Traceback (most recent call last):") == 2
    assert f"(pid {os.getpid()}) crashed at " in text
    assert "RuntimeError: first" in text and "RuntimeError: second" in text
    assert "in failure" in text  # the frames are there


def test_write_panic_never_raises(tmp_path: Path) -> None:
    assert panic.write_panic(str(tmp_path / "no" / "such" / "dir"), failure()) is None


def test_crash_goes_to_the_sandbox_bundle_else_the_first_task(tmp_path: Path) -> None:
    crash = daemon._Crash(str(tmp_path / "first"))
    crash.unwind_limit = None  # no SIGALRM in the test process
    assert crash.panic_bundle() == str(tmp_path / "first")  # no service yet
    crash.service = SimpleNamespace(pod=None)  # type: ignore[assignment]
    assert crash.panic_bundle() == str(tmp_path / "first")  # a shim without a pod
    sandbox = SimpleNamespace(bundle=str(tmp_path / "sandbox"))
    crash.service = SimpleNamespace(pod=SimpleNamespace(sandbox=sandbox))  # type: ignore[assignment]
    assert crash.panic_bundle() == str(tmp_path / "sandbox")
    (tmp_path / "sandbox").mkdir()
    crash.record(failure("once"))
    crash.record(failure("twice"))  # recorded once
    text = (tmp_path / "sandbox" / files.PANIC).read_text()
    assert "RuntimeError: once" in text and "twice" not in text


def test_only_a_non_zero_exit_is_a_crash() -> None:
    assert daemon._is_crash(failure())
    assert daemon._is_crash(SystemExit(3)) and daemon._is_crash(KeyboardInterrupt())
    assert not daemon._is_crash(SystemExit(0)) and not daemon._is_crash(SystemExit(None))


# -- the test hook -------------------------------------------------------------------------------


@pytest.fixture
def crash_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(TEST_CRASH_ENV, "victim")
    yield


def hook_fires(tid: str, spec: dict[str, Any]) -> BaseException | None:
    """Run the hook for a Create of ``tid``; what reached ``on_fatal`` (None when the
    hook started nothing)."""

    async def main() -> BaseException | None:
        got: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        jobs = JobGroup("daemon", on_failure=lambda exc, _job: got.set_result(exc))
        ctx = ShimContext("k8s.io", Reaper(), RecordingPublisher(), jobs=jobs)
        service = TaskService(ctx, lambda: None)
        crash_after_create(service, tid, spec)
        if not len(jobs):
            return None
        return await asyncio.wait_for(got, 30)

    return asyncio.run(main())


def test_hook_crashes_for_the_named_task_or_container(crash_env: None) -> None:
    exc = hook_fires("victim", {})
    assert isinstance(exc, DeliberateCrash) and "victim" in str(exc)
    assert exc.__traceback__ is not None
    by_name = hook_fires("c0ffee", {"annotations": {"io.kubernetes.cri.container-name": "victim"}})
    assert isinstance(by_name, DeliberateCrash) and "c0ffee" in str(by_name)


def test_hook_is_inert_otherwise(crash_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        hook_fires("bystander", {"annotations": {"io.kubernetes.cri.container-name": "x"}}) is None
    )
    monkeypatch.delenv(TEST_CRASH_ENV)
    assert hook_fires("victim", {}) is None


# -- relaying ----------------------------------------------------------------------------------


def test_relay_is_limited_to_one_mib(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    big = b"".join(b"%06d\n" % i for i in range(3 * (1 << 20) // 7))  # ~3 MiB, cut mid-line
    (tmp_path / files.PANIC).write_bytes(big)
    assert panic.relay_panic(str(tmp_path), "sb1") == panic.PANIC_RELAY_LIMIT
    err = capfd.readouterr().err
    head, _, body = err.partition(":\n")
    assert "podshim delete sb1: the shim serving this task crashed" in head
    assert f"(first {panic.PANIC_RELAY_LIMIT} bytes)" in head
    assert body.encode() == big[: panic.PANIC_RELAY_LIMIT] + b"\n"
    assert (tmp_path / files.PANIC).read_bytes() == big  # left in place


def test_relay_without_panic_log_says_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert panic.relay_panic(str(tmp_path), "sb1") == 0
    (tmp_path / files.PANIC).write_bytes(b"")
    assert panic.relay_panic(str(tmp_path), "sb1") == 0
    assert capfd.readouterr().err == ""


def test_sandbox_delete_relays_a_workload_delete_does_not(tmp_path: Path) -> None:
    sb = bundle(tmp_path, "sb1", {T: "sandbox", S: "sb1"})
    wl = bundle(tmp_path, "wl1", {T: "container", S: "sb1"})
    solo = bundle(tmp_path, "solo")  # a task of a shim without a pod
    report = "podshim shim daemon (pid 1) crashed:\nTraceback (most recent call last):\nX: y\n"
    for b in (sb, wl, solo):
        (b / files.PANIC).write_text(report)

    for b, tid in ((sb, "sb1"), (solo, "solo")):
        res = run_delete(b, tid)
        assert res.returncode == 0, res.stderr
        err = res.stderr.decode()
        assert f"podshim delete {tid}: the shim serving this task crashed; {b}/panic.log:\n" in err
        assert report in err
        assert res.stdout  # the DeleteResponse still comes
    res = run_delete(wl, "wl1")
    assert res.returncode == 0 and res.stdout
    assert b"panic" not in res.stderr and b"Traceback" not in res.stderr, res.stderr
    for b in (sb, wl, solo):
        assert (b / files.PANIC).read_text() == report  # nobody removes it
