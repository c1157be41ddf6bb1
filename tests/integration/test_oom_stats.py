"""OOM events, task and pod metrics, and the crash report (panic.log) of a pod shim.

Through CRI (``criutil``: one private containerd with the ``podshim`` and ``runc``
handlers), like kubelet:

* a container exceeding its memory limit is OOM-killed: ``/tasks/oom`` is published for
  it and CRI reports reason ``OOMKilled`` (runc is the reference);
* ContainerStats of a busy container; PodSandboxStats of a pod with a cgroup parent
  (memory at least the busy container's working set, the exact process count, which
  CRI takes from each container's Pids); ``ctr task metrics <sandbox>`` is the sum over
  the pod's cgroups;
* a pod shim crashed on purpose (the ``PODSHIM_TEST_CRASH`` test hook, set in this
  module's containerd environment for containers named :data:`CRASH_NAME`) leaves
  panic.log in the sandbox's bundle, which the sandbox's ``delete`` relays to
  containerd's log as a cleanup warning, while a workload's ``delete`` does not.

containerd removes the sandbox's bundle as soon as CRI handles the crash, so panic.log
itself is checked on a shim daemon run directly (no containerd), whose bundles stay.

Every wait is a poll with a generous deadline, never a fixed sleep; every test cleans up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.api.runtimeoptions.v1 import api_pb2 as ro_pb2
from podshim.api.task.v2 import shim_pb2 as pb
from podshim.cgroups import mode
from podshim.cgroups.stats import Metrics, metrics_for_cgroups_path, unpack
from podshim.lab import wait_for
from podshim.lab.cleanup import remove_cgroup
from podshim.pod.host import NoneHost
from podshim.pod.sandbox import SandboxTask
from podshim.shim.delete import PANIC_FILE
from podshim.shim.events import RecordingPublisher
from podshim.shim.reaper import Reaper
from podshim.shim.service import TEST_CRASH_ENV
from podshim.shim.task import ShimContext
from podshim.ttrpc.client import Client

if TYPE_CHECKING:
    from tests.integration import criutil as cu
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criutil as cu

# the per-test fixture (stop, remove, check nothing is left) with this module's lab
cri = cu.cri

#: CRI containers with this name crash their pod's shim (the test hook)
CRASH_NAME = "podshim-crash-hook"
SHIM = str(Path(sys.executable).parent / "containerd-shim-podshim-v1")
#: allocates 64 MiB in the shell itself (busybox keeps a command substitution in memory)
HOG = 'x=$(head -c 67108864 /dev/zero | tr "\\0" x); sleep 1'
BUSY = "while :; do :; done"
#: 3 processes: the shell and two sleeps
THREE = "sleep 3600 & sleep 3600 & wait"
T = "io.kubernetes.cri.container-type"
S = "io.kubernetes.cri.sandbox-id"


@pytest.fixture(scope="module")
def cri_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cu.CriLab]:
    """``criutil.cri_lab`` whose containerd (and so every shim) has the crash test hook
    armed for containers named :data:`CRASH_NAME`."""
    if not any(Path(p).is_file() for p in ("/bin/busybox", "/usr/bin/busybox")):
        pytest.skip("busybox not installed (apt-get install busybox-static)")
    old = os.environ.get(TEST_CRASH_ENV)
    os.environ[TEST_CRASH_ENV] = CRASH_NAME  # containerd's environment is taken at start
    try:
        lab, crilab = cu.open_cri_lab(tmp_path_factory.mktemp("podshim-oom-stats"))
    finally:
        if old is None:
            os.environ.pop(TEST_CRASH_ENV, None)
        else:
            os.environ[TEST_CRASH_ENV] = old
    try:
        yield crilab
    finally:
        errors = cu.close_cri_lab(lab, crilab)
        assert not errors, "CRI lab teardown left things behind:\n" + "\n".join(errors)


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
    with cu.CtrEvents(cri.lab) as events:
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
    with cu.CtrEvents(cri.lab) as events:
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
            message=lambda: f"PodSandboxStats: 4 processes, memory >= busy's:\n{cri.cri.pod_stats(pod)}",
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


# -- a crashing pod shim ------------------------------------------------------------------------


def log_lines_since(cri: cu.CriLab, offset: int) -> list[str]:
    data = cri.lab.log_path.read_bytes()[offset:]
    return data.decode(errors="replace").splitlines()


def test_crash_is_relayed_by_the_sandbox_delete_only(cri: cu.CriLab) -> None:
    pod, _ = cri.pod("crash", cu.PODSHIM, hostname=_unique("cr"))
    bystander = cri.container(pod, "bystander", ["sleep", "3600"])
    sandbox_bundle = cri.bundle(pod)
    offset = cri.lab.log_path.stat().st_size
    crasher = cri.create(pod, CRASH_NAME, ["sleep", "3600"])
    with contextlib.suppress(cu.CriError):  # the shim may die before it answers Start
        cri.cri.start_container(crasher)
    cri.wait_pod(pod, "NOTREADY")
    for cid in (bystander.id, crasher):
        cri.wait_container(cid, "EXITED")

    def relays() -> list[str]:
        return [
            line
            for line in log_lines_since(cri, offset)
            if "cleanup warnings" in line and "panic.log" in line
        ]

    (relay,) = wait_for(
        relays,
        timeout=cu.DEADLINE,
        interval=0.2,
        message=lambda: "the sandbox's relayed panic.log in containerd's log:\n"
        + cri.lab.log_tail(40),
    )
    assert "level=warning" in relay, relay
    assert f"podshim delete {pod}: the shim serving this task crashed" in relay, relay
    assert f"{sandbox_bundle}/{PANIC_FILE}" in relay, relay  # written in the sandbox's bundle
    assert "Traceback (most recent call last):" in relay and "DeliberateCrash" in relay, relay
    assert f"after Create of task {crasher}" in relay, relay  # the workload's Create did it

    # every delete action has run (containerd's children are gone) once the pod is gone
    errors = cri.cleanup([pod])
    assert not errors, "\n".join(errors)
    lines = log_lines_since(cri, offset)
    for cid in (bystander.id, crasher):
        cleaned = [x for x in lines if "cleaning up after shim disconnected" in x and cid in x]
        assert cleaned, f"containerd ran no delete for workload {cid}"
    assert relays() == [relay], relays()  # no workload's delete relayed anything
    warnings = [x for x in lines if "cleanup warnings" in x]
    assert not [x for x in warnings if bystander.id in x.split("crashed;")[0]], warnings
    # the shim logged its crash too (logrus fatal, with the traceback)
    fatal = [x for x in lines if "level=fatal" in x and "shim daemon crashed" in x]
    assert len(fatal) == 1 and "DeliberateCrash" in fatal[0], fatal


class _FifoReader:
    """Collects what is written to a FIFO (the bundle's ``log``), as containerd does."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.data = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-fifo", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:  # no writer (yet, or any more)
                return
            self.data += chunk

    def _run(self) -> None:
        while not self._stop.is_set():
            select.select([self.fd], [], [], 0.1)
            self._read()
            time.sleep(0.01)

    def close(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=30)
        self._read()
        os.close(self.fd)
        return self.data.decode(errors="replace").splitlines()


def _spawn_daemon(argv: list[str], env: dict[str, str], listener: socket.socket,
                  stderr: int) -> int:  # fmt: skip
    """Spawn like ``start`` does: own session, listening socket on fd 3, stdio /dev/null."""
    os.set_inheritable(listener.fileno(), True)
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        return os.posix_spawn(
            argv[0],
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, devnull, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
                (os.POSIX_SPAWN_DUP2, listener.fileno(), 3),
            ],
            setsid=True,
        )
    finally:
        os.close(devnull)


def _wait_exit(pid: int, timeout: float) -> int:
    """Wait for child ``pid`` (polling); its exit code. Kills it after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"process {pid} did not exit within {timeout}s")
        time.sleep(0.05)


def _create(address: str, req: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
    async def go() -> pb.CreateTaskResponse:
        client = Client(address, timeout=60)
        try:
            return await client.call(
                "containerd.task.v2.Task", "Create", req, pb.CreateTaskResponse
            )
        finally:
            await client.close()

    return asyncio.run(go())


def _bundle(root: Path, name: str, annotations: dict[str, str]) -> Path:
    b = root / name
    b.mkdir()
    spec = {"process": {"args": ["sh"]}, "root": {"path": "rootfs"}, "annotations": annotations}
    (b / "config.json").write_text(json.dumps(spec))
    return b


def _delete_action(ns: str, tid: str, b: Path) -> subprocess.CompletedProcess[bytes]:
    argv = [SHIM, "-namespace", ns, "-address", "/nonexistent", "-id", tid, "-bundle", str(b)]
    return subprocess.run(
        [*argv, "delete"], cwd=b, capture_output=True, stdin=subprocess.DEVNULL,
        timeout=60, check=False,
    )  # fmt: skip


def test_crashed_pod_shim_leaves_panic_log_in_the_sandbox_bundle() -> None:
    """A real shim daemon, without containerd (so the bundles stay): the test hook
    crashes it after the sandbox's Create; panic.log is in the sandbox's bundle; the
    sandbox's ``delete`` relays it, a workload's neither relays nor removes it. The log
    FIFO shows the config's format (json) from the first Create on."""
    token = secrets.token_hex(3)
    ns, sid, wid = f"psh{token}", f"sb{token}", f"wl{token}"
    work = Path(tempfile.mkdtemp(prefix="psh-", dir="/tmp"))  # short: a socket lives here
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fifo: _FifoReader | None = None
    pid = 0
    try:
        sb = _bundle(work, sid, {T: "sandbox", S: sid})
        wl = _bundle(work, wid, {T: "container", S: sid})
        fifo = _FifoReader(sb / "log")
        config = work / "podshim.toml"
        config.write_text(
            f'default_host = "none"\nlog_format = "json"\nruntime_root = "{work}/runc"\n'
        )
        sock_path = str(work / "shim.sock")
        listener.bind(sock_path)
        listener.listen(16)
        env = {k: v for k, v in os.environ.items() if k != "TTRPC_ADDRESS"}
        env[TEST_CRASH_ENV] = sid
        # below a child subreaper, which reaps the shim's orphans (its anchor) when it dies
        argv = [sys.executable, "-m", "podshim.lab.subreaper", "--",
                SHIM, "-namespace", ns, "-id", sid, "-bundle", str(sb), "-socket", sock_path]  # fmt: skip
        with open(work / "stderr", "wb") as err:
            pid = _spawn_daemon(argv, env, listener, err.fileno())
        listener.close()
        options = any_pb2.Any(
            type_url="runtimeoptions.v1.Options",
            value=ro_pb2.Options(config_path=str(config)).SerializeToString(),
        )
        resp = _create(sock_path, pb.CreateTaskRequest(id=sid, bundle=str(sb), options=options))
        assert resp.pid > 0
        status = _wait_exit(pid, cu.DEADLINE)
        pid = 0
        assert status == 2, (work / "stderr").read_text()  # a crash, as the daemon reports it

        panic = (sb / PANIC_FILE).read_text()
        assert "crashed at " in panic and "Traceback (most recent call last):" in panic, panic
        assert f"DeliberateCrash: deliberate crash after Create of task {sid}" in panic, panic
        assert not (wl / PANIC_FILE).exists()

        lines = fifo.close()
        fifo = None
        text = [x for x in lines if x.startswith("time=")]
        json_lines = [json.loads(x) for x in lines if x.startswith("{")]
        assert any("serving on" in x for x in text), lines  # before the first Create: text
        assert not any("created task" in x for x in text), lines  # after it: json
        created = [d for d in json_lines if str(d.get("msg", "")).startswith("created task")]
        assert created and created[0]["tid"] == sid and created[0]["pod-id"] == sid, lines
        assert created[0]["level"] == "info" and created[0]["runtime"] == "io.containerd.podshim.v1"
        fatal = [d for d in json_lines if d.get("level") == "fatal"]
        assert len(fatal) == 1 and "DeliberateCrash" in fatal[0]["msg"], lines

        # the sandbox's delete relays it (containerd logs stderr as "cleanup warnings")
        res = _delete_action(ns, sid, sb)
        assert res.returncode == 0 and res.stdout, res.stderr
        relayed = res.stderr.decode()
        assert relayed.startswith(f"podshim delete {sid}: the shim serving this task crashed; "
                                  f"{sb}/{PANIC_FILE}:\n"), relayed  # fmt: skip
        assert panic in relayed
        # a workload's delete neither relays nor removes it, even with one in its bundle
        shutil.copy(sb / PANIC_FILE, wl / PANIC_FILE)
        res = _delete_action(ns, wid, wl)
        assert res.returncode == 0 and res.stdout, res.stderr
        assert b"panic" not in res.stderr and b"Traceback" not in res.stderr, res.stderr
        assert (sb / PANIC_FILE).read_text() == panic == (wl / PANIC_FILE).read_text()
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(AssertionError, ChildProcessError):
                _wait_exit(pid, cu.DEADLINE)
        if fifo is not None:
            fifo.close()
        listener.close()
        shutil.rmtree(work, ignore_errors=True)
