"""OOM events and task and pod metrics of a pod shim.

Through CRI (``criutil``: one private containerd with the ``podshim`` and ``runc``
handlers), like kubelet:

* a container exceeding its memory limit is OOM-killed: ``/tasks/oom`` is published for
  it and CRI reports reason ``OOMKilled`` (runc is the reference);
* ContainerStats of a busy container; PodSandboxStats of a pod with a cgroup parent
  (memory at least the busy container's working set, the exact process count, which
  CRI takes from each container's Pids); ``ctr task metrics <sandbox>`` is the sum over
  the pod's cgroups.

The crash report (panic.log) of a pod shim is tested in ``test_panic_crash.py``.

Every wait is a poll with a generous deadline, never a fixed sleep; every test cleans up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from podshim import errors as errdefs
from podshim.cgroups import mode
from podshim.cgroups.stats import Metrics, metrics_for_cgroups_path, unpack
from podshim.host.none import NoneHost
from podshim.linux.reaper import Reaper
from podshim.pod.sandbox import SandboxTask
from podshim.task.contract import ShimContext
from podshim_lab import wait_for
from podshim_lab.cleanup import remove_cgroup
from tests.unit.fakes import RecordingPublisher

if TYPE_CHECKING:
    from tests.integration import crievents as ce
    from tests.integration import criutil as cu
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import crievents as ce
    import criutil as cu

# the fixtures: one CRI containerd per module, per-test cleanup checks
cri_lab = cu.cri_lab
cri = cu.cri

#: allocates 64 MiB in the shell itself (busybox keeps a command substitution in memory)
HOG = 'x=$(head -c 67108864 /dev/zero | tr "\\0" x); sleep 1'
BUSY = "while :; do :; done"
#: 3 processes: the shell and two sleeps
THREE = "sleep 3600 & sleep 3600 & wait"


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def cgroup_parent(cri: cu.CriLab) -> Iterator[str]:
    """A pod cgroup parent (what kubelet makes; PodSandboxStats reads it), removed with
    every pod the test made once the test is done."""
    parent = f"/podshim-oomstats-{secrets.token_hex(3)}"
    before = set(cri.pods)
    errors: list[str] = []
    try:
        yield parent
    finally:  # the pods first: the parent cgroup can only go once it is empty
        errors += cri.cleanup([p for p in cri.pods if p not in before])
        errors += [f"cgroup parent {d}" for d in remove_cgroup(parent)]
    assert not errors, "\n".join(errors)


# -- OOM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("handler", [cu.PODSHIM, cu.RUNC])
def test_oom_kill_is_reported(cri: cu.CriLab, handler: str) -> None:
    pod, _ = cri.pod("oom", handler, hostname=_unique("oom"))
    with ce.CtrEvents(cri.lab) as events:
        events.prime(cri.touch_namespace, "/namespaces/update")
        cid = cri.create(
            pod, "hog", ["sh", "-c", HOG], resources=cu.resources(memory_limit=32 * cu.MIB)
        )
        spec = cri.cri.container_status(cid).spec
        assert spec["linux"]["resources"]["memory"]["limit"] == 32 * cu.MIB, spec["linux"]
        cri.cri.start_container(cid)
        done = cri.wait_container(cid, "EXITED")
        oom = events.wait(
            lambda e: e.topic == "/tasks/oom" and e.body.get("container_id") == cid,
            what=f"/tasks/oom of {cid}",
        )
        exits = [
            e
            for e in events.snapshot()
            if e.topic == "/tasks/exit" and e.body.get("container_id") == cid
        ]
    assert done.exit_code == 137, done  # SIGKILL from the kernel's OOM killer
    assert oom.namespace == cu.CRI_NAMESPACE
    assert len(exits) <= 1, exits

    def reason() -> str | None:
        got = cri.cri.container_status(cid).reason
        return got if got == "OOMKilled" else None

    wait_for(
        reason,
        timeout=cu.DEADLINE,
        interval=0.2,
        message=lambda: f"reason OOMKilled, is {cri.cri.container_status(cid).reason!r}",
    )
    # a container that stays within its limit is not OOM-killed
    with ce.CtrEvents(cri.lab) as events:
        events.prime(cri.touch_namespace, "/namespaces/update")
        calm = cri.create(
            pod, "calm", ["sh", "-c", "x=$(head -c 1048576 /dev/zero | tr '\\0' x)"], attempt=0,
            resources=cu.resources(memory_limit=32 * cu.MIB),
        )  # fmt: skip
        cri.cri.start_container(calm)
        finished = cri.wait_container(calm, "EXITED")
        events.wait(
            lambda e: e.topic == "/tasks/exit" and e.body.get("container_id") == calm,
            what=f"/tasks/exit of {calm}",
        )
        assert not [e for e in events.snapshot() if e.topic == "/tasks/oom"], events.snapshot()
    assert (finished.exit_code, finished.reason) == (0, "Completed"), finished


# -- container and pod metrics ---------------------------------------------------------------


@pytest.mark.parametrize("handler", [cu.PODSHIM, cu.RUNC])
def test_container_stats_of_a_busy_container(cri: cu.CriLab, handler: str) -> None:
    pod, _ = cri.pod("busy", handler, hostname=_unique("busy"))
    # a fifth of a CPU: busy, without loading the machine
    limits = cu.resources(cpu_quota=20000, cpu_period=100000, memory_limit=64 * cu.MIB)
    busy = cri.container(pod, "busy", ["sh", "-c", BUSY], resources=limits)

    def busy_enough() -> Any:
        st = cri.cri.container_stats(busy.id)
        if st.cpu.usage_core_nano_seconds.value > 0 and st.memory.working_set_bytes.value > 0:
            return st
        return None

    stats = wait_for(busy_enough, timeout=cu.DEADLINE, interval=0.2, message="CPU and memory > 0")
    assert stats.attributes.id == busy.id
    assert stats.memory.usage_bytes.value >= stats.memory.working_set_bytes.value > 0
    assert stats.memory.available_bytes.value > 0  # below its 64 MiB limit
    first = stats.cpu.usage_core_nano_seconds.value

    def grows() -> bool:
        return bool(cri.cri.container_stats(busy.id).cpu.usage_core_nano_seconds.value > first)

    wait_for(grows, timeout=cu.DEADLINE, interval=0.2, message="CPU usage to grow")


def ctr_metrics(cri: cu.CriLab, task_id: str) -> dict[str, Any]:
    """``ctr task metrics --format json <task>``: the Metrics message as Go's JSON."""
    res = cri.lab.ctr("task", "metrics", "--format", "json", task_id, namespace=cu.CRI_NAMESPACE)
    data = json.loads(res.stdout)
    assert isinstance(data, dict), res.stdout
    return data


#: fields compared between the pod's metrics and the sum over its cgroups:
#: (path in the JSON / message, how it combines)
FIELDS_V1 = [
    (("pids", "current"), "gauge"),
    (("cpu", "usage", "total"), "counter"),
    (("cpu", "usage", "user"), "counter"),
    (("memory", "usage", "usage"), "gauge"),
    (("memory", "total_rss"), "gauge"),
    (("memory", "total_pg_fault"), "counter"),
    (("memory", "usage", "limit"), "limit"),
    (("memory", "hierarchical_memory_limit"), "limit"),
]
FIELDS_V2 = [
    (("pids", "current"), "gauge"),
    (("cpu", "usage_usec"), "counter"),
    (("memory", "usage"), "gauge"),
    (("memory", "anon"), "gauge"),
    (("memory", "pgfault"), "counter"),
    (("memory", "usage_limit"), "limit"),
]
#: how far a memory gauge may move while the parts are read
MEMORY_SLACK = 2 * cu.MIB


def field(data: dict[str, Any] | Metrics, path: Sequence[str]) -> int:
    """A field of ``ctr``'s JSON (absent = 0, Go's omitempty) or of a Metrics message."""
    cur: Any = data
    for key in path:
        cur = cur.get(key, {}) if isinstance(cur, dict) else getattr(cur, key)
    return int(cur) if not isinstance(cur, dict) else 0


def test_pod_stats_and_sandbox_metrics_sum(cri: cu.CriLab) -> None:
    with cgroup_parent(cri) as parent:
        config = cri.pod_config("podstats", hostname=_unique("ps"), cgroup_parent=parent)
        pod = cri.run_pod(config, cu.PODSHIM)
        limits = cu.resources(cpu_quota=20000, cpu_period=100000, memory_limit=64 * cu.MIB)
        busy = cri.container(pod, "busy", ["sh", "-c", BUSY], resources=limits)
        three = cri.container(
            pod, "three", ["sh", "-c", THREE], resources=cu.resources(memory_limit=96 * cu.MIB)
        )
        assert busy.cgroups_path == f"{parent}/{busy.id}", busy.cgroups_path

        # CRI's process count is the sum of every running container's Pids: exact
        def pids_of(cid: str) -> int:
            out = cri.lab.ctr("task", "ps", cid, namespace=cu.CRI_NAMESPACE).stdout
            return len(out.strip().splitlines()) - 1  # a header line, then one per process

        wait_for(lambda: pids_of(three.id) == 3, timeout=cu.DEADLINE, message="3 processes")
        assert pids_of(busy.id) == 1
        wait_for(
            lambda: cri.cri.container_stats(busy.id).cpu.usage_core_nano_seconds.value > 0,
            timeout=cu.DEADLINE,
            message="CPU of the busy container",
        )

        def pod_stats_ok() -> Any:
            working_set = cri.cri.container_stats(busy.id).memory.working_set_bytes.value
            st = cri.cri.pod_stats(pod)
            linux = st.linux
            if linux.process.process_count.value != 4:
                return None
            if linux.memory.working_set_bytes.value < working_set or working_set == 0:
                return None
            return st

        stats = wait_for(
            pod_stats_ok,
            timeout=cu.DEADLINE,
            interval=0.5,
            message=lambda: (
                f"PodSandboxStats: 4 processes, memory >= busy's:\n{cri.cri.pod_stats(pod)}"
            ),
        )
        assert stats.attributes.id == pod
        assert {c.attributes.id for c in stats.linux.containers} == {busy.id, three.id}
        assert stats.linux.cpu.usage_core_nano_seconds.value > 0

        # ctr task metrics <sandbox> is the sum over the pod's cgroups: the sandbox's own
        # (empty here: no shared PID namespace) and each container's
        fields = FIELDS_V2 if mode() == "unified" else FIELDS_V1

        def parts() -> list[dict[str, Any] | Metrics]:
            got: list[dict[str, Any] | Metrics] = [ctr_metrics(cri, c) for c in (busy.id, three.id)]
            got.append(metrics_for_cgroups_path(f"{parent}/{pod}"))
            return got

        def compare() -> list[str]:
            before = parts()
            total = ctr_metrics(cri, pod)
            after = parts()
            problems = []
            for path, kind in fields:
                got = field(total, path)
                lo = sum(field(p, path) for p in before)
                hi = sum(field(p, path) for p in after)
                name = ".".join(path)
                if kind == "counter" and not lo <= got <= hi:
                    problems.append(f"{name}: {got} not in [{lo}, {hi}]")
                if kind == "gauge":
                    slack = MEMORY_SLACK if path[0] == "memory" else 0
                    if not min(lo, hi) - slack <= got <= max(lo, hi) + slack:
                        problems.append(f"{name}: {got} not within {slack} of [{lo}, {hi}]")
                if kind == "limit":
                    want = max(field(p, path) for p in before)
                    if got != want:
                        problems.append(f"{name}: {got} != max {want}")
            return problems

        # (a process may come or go between the reads: retry until one round is quiet)
        wait_for(
            lambda: not compare(),
            timeout=cu.DEADLINE,
            interval=0.5,
            message=lambda: f"sandbox metrics = sum over the pod: {compare()}",
        )
        total = ctr_metrics(cri, pod)
        assert field(total, ("pids", "current")) == 4, total
        assert field(total, fields[1][0]) > 0, total  # some CPU


def test_sandbox_stats_sum_and_gone_tasks() -> None:
    """In-process: the sandbox sums its workloads, skips one that is gone, and is
    NotFound itself once it has exited."""
    kind: type[Metrics]
    if mode() == "unified":
        from podshim.api.cgroups.v2 import metrics_pb2 as v2

        kind = v2.Metrics
    else:
        from podshim.api.cgroups.v1 import metrics_pb2 as v1

        kind = v1.Metrics

    class Workload:
        def __init__(self, tid: str, current: int, limit: int, gone: bool = False) -> None:
            self.id, self.memory_cgroup, self.gone = tid, "", gone
            self.m = kind()
            self.m.pids.current, self.m.pids.limit = current, limit

        def metrics(self) -> Metrics:
            if self.gone:
                raise errdefs.NotFound(f"task {self.id}: gone")
            return self.m

    workloads = [Workload("a", 2, 10), Workload("b", 3, 50), Workload("c", 7, 99, gone=True)]

    async def kill_workloads(signal: int) -> None:
        return None

    async def main() -> None:
        ctx = ShimContext("k8s.io", Reaper(), RecordingPublisher())
        host = NoneHost()
        t = SandboxTask(ctx, "pod1", "/b/pod1", host, 4242, kill_workloads,
                        workloads=lambda: workloads)  # fmt: skip
        await host.create()
        t.begin()
        await t.start("")
        got = unpack(await t.stats())
        assert isinstance(got, kind)
        assert (got.pids.current, got.pids.limit) == (5, 50)  # c is skipped
        workloads[:] = []
        assert unpack(await t.stats()) == kind()  # nothing to measure: empty, no error
        await t.kill("", 9, False)
        await t.wait("")
        with pytest.raises(errdefs.NotFound):
            await t.stats()
        await t.delete("")

    asyncio.run(asyncio.wait_for(main(), 30))
