"""The Task contract (``podshim.task.contract.Task``), run against every kind of task: the
in-memory FakeTask, the pod SandboxTask, the Container with a fake OCI driver that
runs real processes (their exits come through the reaper), and the utility VM's
GuestContainer with the fake guest agent (real runc on the host; root only). The
Container with runc passes the same points through containerd in tests/integration
(test_shim_*), the GuestContainer in a real VM in test_uvm_cri."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from podshim import errors as errdefs
from podshim.linux.reaper import Reaper
from podshim.oci.runtime import RuntimeConfig
from podshim.pod.sandbox import SandboxTask
from podshim.task.container import Container
from podshim.task.contract import ShimContext
from podshim.task.states import Status
from tests.unit.fakes import RecordingPublisher

from .fakeoci import fake_oci_factory
from .fakes import FakeHost, FakeTask
from .uvmfakes import SKIP as GUEST_SKIP
from .uvmfakes import Bed


async def make(kind: str) -> Any:
    if kind == "fake":
        return FakeTask("t1")
    if kind == "container":
        return await make_container()
    if kind == "guest":
        return await make_guest()

    async def no_workloads(sig: int) -> None:
        return None

    host = FakeHost()
    await host.create()
    t = SandboxTask(
        ShimContext("ns", Reaper(), RecordingPublisher()), "t1", "/b/t1", host, 4242, no_workloads
    )
    t.begin()
    return t


_BEDS: list[Bed] = []


def run(fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            await asyncio.wait_for(fn(), 60)
        finally:
            while _BEDS:
                bed = _BEDS.pop()
                await bed.cleanup()
                shutil.rmtree(bed.tmp, ignore_errors=True)

    asyncio.run(main())


KINDS = ["fake", "sandbox", "container", "guest"]
_BUNDLES: list[str] = []


async def make_guest() -> Any:
    if GUEST_SKIP:
        pytest.skip(GUEST_SKIP)
    bed = Bed(tempfile.mkdtemp(prefix="podshim-contract-guest-"))
    _BEDS.append(bed)
    bed.start()
    return await bed.create(bed.request("t1", ["sleep", "1000"]))


@pytest.fixture(autouse=True)
def _remove_bundles() -> Iterator[None]:
    yield
    while _BUNDLES:
        shutil.rmtree(_BUNDLES.pop(), ignore_errors=True)


async def make_container() -> Container:
    reaper = Reaper()
    reaper.start()
    bundle = tempfile.mkdtemp(prefix="podshim-contract-")
    _BUNDLES.append(bundle)
    spec = {"process": {"args": ["sleep", "1000"]}, "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}]}}  # fmt: skip
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(spec, f)
    ctx = ShimContext("ns", reaper, RecordingPublisher(), oci=fake_oci_factory())
    c = Container(ctx, "t1", bundle, spec, [], ctx.oci(RuntimeConfig(), bundle),
                  terminal=False, stdin="", stdout="", stderr="")  # fmt: skip
    await c.create()
    return c


@pytest.mark.parametrize("kind", KINDS)
def test_start_wait_kill_delete(kind: str) -> None:
    async def main() -> None:
        t = await make(kind)
        assert t.state("").status is Status.CREATED  # State never blocks
        waiter = asyncio.create_task(t.wait(""))
        pid = await t.start("")
        assert pid == t.pid == t.state("").pid
        with pytest.raises(errdefs.FailedPrecondition):
            await t.start("")  # not Created
        with pytest.raises(errdefs.FailedPrecondition):
            await t.delete("")  # running
        await asyncio.sleep(0.01)
        assert not waiter.done()  # Wait blocks until exit (also before Start)
        await t.kill("", 9, False)
        first = await waiter
        assert first.status == 137
        assert (await t.wait("")) == first  # any number of times
        with pytest.raises(errdefs.NotFound):
            await t.kill("", 9, False)  # exited: NotFound
        got_pid, ex = await t.delete("")
        assert (got_pid, ex) == (pid, first)

    run(main)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_exec_is_not_found_and_kill_all_of_an_exec_is_refused(kind: str) -> None:
    async def main() -> None:
        t = await make(kind)
        await t.start("")
        with pytest.raises(errdefs.NotFound):
            t.state("nope")
        with pytest.raises(errdefs.NotFound):
            await t.start("nope")
        with pytest.raises(errdefs.NotFound):
            await t.wait("nope")
        with pytest.raises(errdefs.NotFound):
            await t.delete("nope")
        with pytest.raises(errdefs.NotFound):
            await t.kill("nope", 9, False)
        with pytest.raises(errdefs.FailedPrecondition):
            await t.kill("nope", 9, True)
        with pytest.raises(errdefs.FailedPrecondition):
            t.resize("", 80, 24)  # no tty
        await t.kill("", 9, False)

    run(main)


@pytest.mark.parametrize("kind", KINDS)
def test_delete_of_a_created_task_is_allowed(kind: str) -> None:
    async def main() -> None:
        t = await make(kind)
        pid, _ = await t.delete("")
        assert pid >= 0
        with pytest.raises(errdefs.NotFound):
            await t.delete("")

    run(main)
