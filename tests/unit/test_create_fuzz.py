"""Create requests and spec shapes fuzzed (hypothesis) through the real Task service with
the fake OCI driver: every input ends in a clean answer or a clean error, and a task
that was created can always be killed, waited for and deleted. (``"linux": null``, which
runc accepts, once made the exit monitor raise and left the task RUNNING for ever.)"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from podshim import errors as errdefs
from podshim.api.task.v2 import shim_pb2 as pb
from podshim.linux.reaper import Reaper
from podshim.service.tasks import TaskService
from podshim.task.contract import ShimContext
from podshim.ttrpc.services import CallContext
from tests.unit.fakes import RecordingPublisher

from .fakeoci import fake_oci_factory

CTX = CallContext("containerd.task.v2.Task", "x", {})
STEP = 10.0  # no call may take longer than this (a stuck task is a failure)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
# the fake driver runs process.args for real: only harmless commands, plus bad shapes
ARGS = st.sampled_from([["true"], ["sh", "-c", "exit 3"], ["sleep", "30"], [], [1], "true", None])
NAMESPACE = st.fixed_dictionaries(
    {"type": st.sampled_from(["pid", "ipc", "uts", "mount", "network", "bogus"]) | JSON},
    optional={"path": st.none() | st.sampled_from(["", "/proc/1/ns/net"]) | JSON},
)
LINUX = (
    st.none()
    | JSON
    | st.fixed_dictionaries(
        {},
        optional={
            "namespaces": st.none() | JSON | st.lists(NAMESPACE | JSON, max_size=4),
            "cgroupsPath": st.none() | JSON,
            "resources": st.none() | JSON,
        },
    )
)
PROCESS = JSON | st.fixed_dictionaries(
    {"args": ARGS}, optional={"terminal": st.booleans() | JSON, "cwd": JSON, "env": JSON}
)
ANNOTATIONS = (
    st.none()
    | JSON
    | st.dictionaries(
        st.sampled_from(["io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id", "x"]),
        st.sampled_from(["container", "sandbox", "c1"]) | JSON,
        max_size=2,
    )
)
SPEC = st.fixed_dictionaries(
    {"process": PROCESS},
    optional={
        "root": st.none() | JSON | st.just({"path": "rootfs"}),
        "linux": LINUX,
        "annotations": ANNOTATIONS,
        "hostname": JSON,
    },
)
# nearly right specs, where the odd shapes sit deeper
GOOD_ARGS = st.sampled_from([["true"], ["sh", "-c", "exit 3"], ["sleep", "30"]])
NEAR = st.fixed_dictionaries(
    {
        "process": st.fixed_dictionaries(
            {"args": GOOD_ARGS}, optional={"terminal": st.just(False)}
        ),
        "root": st.just({"path": "rootfs"}),
    },
    optional={"linux": LINUX, "annotations": ANNOTATIONS},
)
REQUEST = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["c1", "c1", "c-2", "", "../x", "a" * 80]),
        "terminal": st.sampled_from([False, False, True]),
        "stdout": st.sampled_from(["", "", "/nonexistent/fifo"]),
    }
)


def outcome(what: str) -> None:
    """Counted in ``pytest --hypothesis-show-statistics`` (created vs refused, by kind)."""
    try:
        event(what)
    except InvalidArgument:
        pass  # outside a hypothesis test (the explicit cases below)


async def one(tmp: Path, spec: Any, req: dict[str, Any]) -> None:
    reaper = Reaper()
    reaper.start()
    ctx = ShimContext("ns", reaper, RecordingPublisher(strict=False), oci=fake_oci_factory())
    svc = TaskService(ctx, lambda: None)
    (tmp / "config.json").write_text(json.dumps(spec))
    create = pb.CreateTaskRequest(bundle=str(tmp), **req)
    tid = req["id"]
    try:
        try:
            await asyncio.wait_for(svc.Create(create, CTX), STEP)
        except errdefs.ShimError as exc:
            assert tid not in svc.tasks
            outcome(f"refused: {type(exc).__name__}")
            return
        outcome("created")
        try:
            await asyncio.wait_for(svc.Start(pb.StartRequest(id=tid), CTX), STEP)
        except errdefs.ShimError:
            pass
        try:
            await asyncio.wait_for(svc.Kill(pb.KillRequest(id=tid, signal=9, all=True), CTX), STEP)
        except (errdefs.NotFound, errdefs.FailedPrecondition):
            pass  # already exited / never started
        await asyncio.wait_for(svc.Wait(pb.WaitRequest(id=tid), CTX), STEP)
        await asyncio.wait_for(svc.Delete(pb.DeleteRequest(id=tid), CTX), STEP)
        assert tid not in svc.tasks
    finally:
        for t in list(svc.tasks.values()):  # a failed assertion above: leave no process
            try:
                await asyncio.wait_for(t.kill("", 9, True), STEP)
            except Exception:
                pass
        await ctx.jobs.aclose()
        reaper.stop()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec=st.one_of(NEAR, NEAR, SPEC, JSON), req=REQUEST)
def test_any_create_ends_cleanly(spec: Any, req: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(asyncio.wait_for(one(Path(d), spec, req), 60))


def test_linux_null_is_read_as_absent() -> None:
    """The shape runc accepts and that once wedged the exit monitor, explicitly."""
    spec = {"process": {"args": ["sh", "-c", "exit 3"]}, "root": {"path": "rootfs"}, "linux": None}
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(asyncio.wait_for(one(Path(d), spec, {"id": "c1", "terminal": False,
                                                          "stdout": ""}), 60))  # fmt: skip
