"""cgroup v1 paths and metrics: a recorded tree (data/cgroup1/) and, as root on a v1
host, a live cgroup with a process in it."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim.api.cgroups.v1 import metrics_pb2 as pb
from podshim.cgroups import mode, stats, v1

DATA = Path(__file__).resolve().parent / "data" / "cgroup1"
ROOT = DATA / "root"
PROC = str(DATA / "proc")
CTR1 = "k8s.io/ctr1"
SYS_CGROUP = Path("/sys/fs/cgroup")


def kv(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


# --- paths -----------------------------------------------------------------------------


def test_paths_for_pid_from_proc_cgroup_and_mountinfo() -> None:
    paths = v1.paths_for_pid(4242, proc=PROC)
    c = "/sys/fs/cgroup"
    assert paths == {
        "hugetlb": f"{c}/hugetlb/{CTR1}",
        "cpuset": f"{c}/cpuset/{CTR1}",
        "pids": f"{c}/pids/{CTR1}",
        "memory": f"{c}/memory/{CTR1}",
        "blkio": f"{c}/blkio/{CTR1}",
        "cpu": f"{c}/cpu,cpuacct/{CTR1}",
        "cpuacct": f"{c}/cpu,cpuacct/{CTR1}",
        "net_cls": f"{c}/net_cls,net_prio/{CTR1}",
        "net_prio": f"{c}/net_cls,net_prio/{CTR1}",
        "devices": f"{c}/devices/{CTR1}",
        "freezer": f"{c}/freezer/{CTR1}",
        # mounted with root /k8s.io at an escaped mount point
        "perf_event": "/mnt/perf events/ctr1",
        "name=systemd": f"{c}/systemd/{CTR1}",
        # rdma is not mounted here; the cgroup2 line is not a v1 hierarchy
    }


def test_paths_for_pid_of_missing_process_is_not_found() -> None:
    with pytest.raises(errdefs.NotFound, match="no such process"):
        v1.paths_for_pid(99999, proc=PROC)


def test_paths_for_cgroups_path_lists_the_hierarchies_under_root() -> None:
    r = str(ROOT)
    assert v1.paths_for_cgroups_path("/k8s.io/ctr1", r) == {
        "blkio": f"{r}/blkio/{CTR1}",
        "cpu": f"{r}/cpu/{CTR1}",  # through the symlink, as runc writes it
        "cpuacct": f"{r}/cpuacct/{CTR1}",
        "cpuset": f"{r}/cpuset/{CTR1}",
        "hugetlb": f"{r}/hugetlb/{CTR1}",
        "memory": f"{r}/memory/{CTR1}",
        "pids": f"{r}/pids/{CTR1}",
        "name=systemd": f"{r}/systemd/{CTR1}",
        # unified/ (cgroup2) is skipped
    }


def test_paths_for_cgroups_path_systemd_form() -> None:
    paths = v1.paths_for_cgroups_path("kubepods-pod1.slice:cri-containerd:abc", str(ROOT))
    assert paths["memory"] == f"{ROOT}/memory/kubepods.slice/kubepods-pod1.slice/" + (
        "cri-containerd-abc.scope"
    )


def test_paths_for_cgroups_path_without_root_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(errdefs.NotFound):
        v1.paths_for_cgroups_path("/x", str(tmp_path / "nothing"))


# --- metrics from the recorded tree ----------------------------------------------------


def read_ctr1() -> pb.Metrics:
    return v1.read_metrics(v1.paths_for_cgroups_path(CTR1, str(ROOT)), proc=PROC)


def test_cpu() -> None:
    cpu = read_ctr1().cpu
    hz = os.sysconf("SC_CLK_TCK")
    assert cpu.usage.total == 3512345678901
    assert list(cpu.usage.per_cpu) == [1756172839450, 1756172839451]
    assert cpu.usage.user == 300000 * 1_000_000_000 // hz
    assert cpu.usage.kernel == 51234 * 1_000_000_000 // hz
    assert cpu.throttling == pb.Throttle(periods=5, throttled_periods=2, throttled_time=123456789)


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("cache", "cache"),
        ("pgpgin", "pg_pg_in"),
        ("pgmajfault", "pg_maj_fault"),
        ("hierarchical_memsw_limit", "hierarchical_swap_limit"),
        ("total_pgfault", "total_pg_fault"),
        ("total_inactive_file", "total_inactive_file"),
        ("shmem", None),
        ("total_swap", None),
        ("usage", None),  # a MemoryEntry, not a memory.stat key
    ],
)
def test_memory_stat_field(key: str, field: str | None) -> None:
    assert v1.memory_stat_field(key) == field


def test_memory() -> None:
    m = read_ctr1()
    stat = kv(ROOT / "memory" / CTR1 / "memory.stat")
    mapped = {v1.memory_stat_field(k): v for k, v in stat.items()}
    mapped.pop(None)
    assert len(mapped) == 32  # every scalar field of MemoryStat
    for field, value in mapped.items():
        assert getattr(m.memory, str(field)) == value, field
    # the fields CRI reads
    assert (m.memory.total_rss, m.memory.total_inactive_file) == (15269888, 3153920)
    assert (m.memory.total_pg_fault, m.memory.total_pg_maj_fault) == (45243, 33)
    assert m.memory.usage == pb.MemoryEntry(
        usage=21585920, limit=256 << 20, max=44261376, failcnt=17
    )
    assert m.memory.swap == pb.MemoryEntry(usage=21585920, limit=256 << 20, max=44261376)
    assert m.memory.kernel == pb.MemoryEntry(usage=1150976, limit=9223372036854771712, max=3092480)
    assert m.memory.kernel_tcp == pb.MemoryEntry(usage=8192, limit=9223372036854771712, max=12288)
    assert m.memory_oom_control == pb.MemoryOomControl(oom_kill=1)


def test_pids_unlimited_is_zero() -> None:
    assert read_ctr1().pids == pb.PidsStat(current=3, limit=0)


def test_blkio_throttle_counters_with_device_names() -> None:
    blkio = read_ctr1().blkio
    entries = [
        (e.device, e.major, e.minor, e.op, e.value) for e in blkio.io_service_bytes_recursive
    ]
    assert len(entries) == 12  # the closing "Total" line is not an entry
    assert entries[0] == ("/dev/sda", 8, 0, "Read", 7401472)
    assert entries[-1] == ("/dev/dm-0", 253, 0, "Total", 7421952)
    assert [e.value for e in blkio.io_serviced_recursive][:2] == [236, 5]
    assert len(blkio.sectors_recursive) == 0


def test_hugetlb() -> None:
    assert [(h.pagesize, h.usage, h.max, h.failcnt) for h in read_ctr1().hugetlb] == [
        ("2MB", 4 << 20, 6 << 20, 1),
        ("1GB", 0, 0, 0),
    ]


def test_partial_cgroup_skips_missing_files() -> None:
    r = ROOT
    paths = {c: str(r / c / "k8s.io" / "ctr2") for c in ("memory", "pids", "blkio")}
    paths["devices"] = "/nonexistent"  # not read: not checked
    m = v1.read_metrics(paths, proc=PROC)

    assert not m.HasField("cpu") and len(m.hugetlb) == 0
    assert m.memory.usage.usage == 1052672
    # no swap accounting, no kmem files: the entries are there (as containerd sends them) but 0
    for entry in (m.memory.swap, m.memory.kernel, m.memory.kernel_tcp):
        assert entry == pb.MemoryEntry()
    assert m.memory.HasField("swap")
    assert m.memory.hierarchical_swap_limit == 0
    assert m.memory_oom_control == pb.MemoryOomControl(oom_kill_disable=1, under_oom=1)
    assert m.pids == pb.PidsStat(current=1, limit=100)
    # CFQ counters present: the throttle ones are not used
    b = m.blkio
    assert [(e.op, e.value) for e in b.io_service_bytes_recursive][:2] == [
        ("Read", 4096),
        ("Write", 8192),
    ]
    assert [(e.device, e.value) for e in b.sectors_recursive] == [("/dev/sda", 24)]
    assert [e.value for e in b.io_time_recursive] == [1500000]
    assert len(b.io_queued_recursive) == 5


def test_no_readable_controller_is_not_found() -> None:
    with pytest.raises(errdefs.NotFound):
        v1.read_metrics({"devices": str(ROOT / "cpuset" / CTR1)})


def test_removed_cgroup_is_not_found(tmp_path: Path) -> None:
    paths = v1.paths_for_cgroups_path(CTR1, str(ROOT))
    paths["memory"] = str(tmp_path / "gone")
    with pytest.raises(errdefs.NotFound, match="gone"):
        v1.read_metrics(paths)


# --- live ------------------------------------------------------------------------------

LIVE_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio")


def live_v1_reason() -> str | None:
    """Why a live v1 cgroup cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not SYS_CGROUP.is_dir() or mode(str(SYS_CGROUP)) == "unified":
        return "needs cgroup v1 controllers mounted under /sys/fs/cgroup"
    missing = [c for c in LIVE_CONTROLLERS[:4] if not (SYS_CGROUP / c / "cgroup.procs").exists()]
    return f"cgroup v1 controllers not mounted: {missing}" if missing else None


def remove_cgroup(path: Path) -> None:
    """rmdir, retrying briefly while the kernel still counts an exited task."""
    deadline = time.monotonic() + 5
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.fixture
def live_cgroup() -> Iterator[dict[str, Path]]:
    """``podshim-test-<random>`` in each live controller; removed (and checked) after."""
    reason = live_v1_reason()
    if reason is not None:
        pytest.skip(reason)
    name = f"podshim-test-{secrets.token_hex(4)}"
    dirs: dict[str, Path] = {}
    try:
        for controller in LIVE_CONTROLLERS:
            if (SYS_CGROUP / controller / "cgroup.procs").exists():
                dirs[controller] = SYS_CGROUP / controller / name
                dirs[controller].mkdir()
        yield dirs
    finally:
        for path in dirs.values():
            remove_cgroup(path)
        assert not [p for p in dirs.values() if p.exists()]


def wait_until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.mark.integration
def test_live_cgroup_metrics(live_cgroup: dict[str, Path]) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    # The child waits until it has been moved, then execs: the exec is charged here.
    child = subprocess.Popen(["/bin/sh", "-c", f"read go; exec {sleep} 30"], stdin=subprocess.PIPE)
    try:
        assert child.stdin is not None
        for path in live_cgroup.values():
            (path / "cgroup.procs").write_text(str(child.pid))
        child.stdin.write(b"go\n")
        child.stdin.close()
        wait_until(lambda: Path(f"/proc/{child.pid}/comm").read_text().strip() == "sleep")

        paths = v1.paths_for_pid(child.pid)
        for controller, path in live_cgroup.items():
            assert paths[controller] == str(path)
        m = v1.read_metrics(paths)
        assert m.pids.current == 1
        assert m.memory.usage.usage > 0
        assert m.cpu.usage.total > 0

        by_path = stats.metrics_for_cgroups_path("/" + live_cgroup["memory"].name)
        assert isinstance(by_path, pb.Metrics) and by_path.pids.current == 1
        packed = stats.metrics_any_for_pid(child.pid)
        assert packed.type_url == "io.containerd.cgroups.v1.Metrics"
    finally:
        child.kill()
        child.wait()
    # the cgroup outlives the process: still readable, now empty
    wait_until(lambda: v1.read_metrics(paths).pids.current == 0)
