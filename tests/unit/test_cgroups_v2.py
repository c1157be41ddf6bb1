"""cgroup v2 paths and metrics, against a recorded cgroup2 tree (data/cgroup2/)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim.api.cgroups.v2 import metrics_pb2 as pb
from podshim.cgroups import v2

DATA = Path(__file__).resolve().parent / "data" / "cgroup2"
PROC = str(DATA / "proc")
MAX_UINT64 = 2**64 - 1
MAX_UINT32 = 2**32 - 1


def kv(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


# --- paths -----------------------------------------------------------------------------


def test_path_for_pid_uses_the_0_line() -> None:
    assert v2.path_for_pid(4242, proc=PROC, root="/sys/fs/cgroup") == (
        "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/"
        "kubepods-besteffort-pod0f1e.slice/cri-containerd-abc.scope"
    )


def test_path_for_pid_without_cgroup2_membership_is_not_found() -> None:
    with pytest.raises(errdefs.NotFound, match="not in a cgroup v2"):
        v2.path_for_pid(4343, proc=PROC)


def test_path_for_pid_of_missing_process_is_not_found() -> None:
    with pytest.raises(errdefs.NotFound, match="no such process"):
        v2.path_for_pid(99999, proc=PROC)


@pytest.mark.parametrize(
    ("cgroups_path", "expected"),
    [
        ("/k8s.io/abc", "/r/k8s.io/abc"),
        ("k8s.io/abc", "/r/k8s.io/abc"),
        ("/", "/r"),
        (
            "kubepods-burstable-pod1.slice:cri-containerd:abc",
            "/r/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/"
            "cri-containerd-abc.scope",
        ),
    ],
)
def test_path_for_cgroups_path(cgroups_path: str, expected: str) -> None:
    assert v2.path_for_cgroups_path(cgroups_path, "/r") == expected


# --- metrics ---------------------------------------------------------------------------


def test_container_without_limits() -> None:
    m = v2.read_metrics(str(DATA / "ctr"))

    assert (m.pids.current, m.pids.limit) == (3, MAX_UINT64)
    assert m.cpu == pb.CPUStat(
        usage_usec=1843200,
        user_usec=1520320,
        system_usec=322880,
        nr_periods=120,
        nr_throttled=7,
        throttled_usec=48211,
    )
    mem = m.memory
    assert (mem.usage, mem.usage_limit) == (16130048, MAX_UINT64)
    assert (mem.swap_usage, mem.swap_limit) == (0, MAX_UINT64)
    assert (mem.anon, mem.file, mem.inactive_file) == (4546560, 10223616, 7417856)
    assert (mem.pgfault, mem.pgmajfault, mem.file_dirty) == (12051, 97, 4096)
    assert (mem.slab, mem.slab_reclaimable, mem.slab_unreclaimable) == (899624, 620088, 279536)
    # 6.x kernels split these counters into _anon and _file: the field is their sum
    assert (mem.workingset_refault, mem.workingset_activate) == (12, 4)

    assert m.HasField("memory_events")
    assert m.memory_events == pb.MemoryEvents()
    assert [(e.major, e.minor, e.rbytes, e.wbytes, e.rios, e.wios) for e in m.io.usage] == [
        (8, 0, 7401472, 20480, 236, 5),
        (253, 0, 7401472, 20480, 236, 5),
    ]
    # rsvd counters are not page sizes; small pages first
    assert [(h.pagesize, h.current, h.max) for h in m.hugetlb] == [
        ("2MB", 0, MAX_UINT64),
        ("1GB", 0, MAX_UINT64),
    ]
    assert not m.HasField("rdma")


@pytest.mark.parametrize("name", ["ctr", "limited"])
def test_every_memory_stat_key_with_a_field_is_copied(name: str) -> None:
    stat = kv(DATA / name / "memory.stat")
    memory = v2.read_metrics(str(DATA / name)).memory
    fields = {f.name for f in pb.MemoryStat.DESCRIPTOR.fields}
    copied = {k for k in stat if k in fields}
    assert len(copied) >= 25
    for key in copied:
        assert getattr(memory, key) == stat[key], key


def test_limited_cgroup_on_an_older_kernel() -> None:
    m = v2.read_metrics(str(DATA / "limited"))

    assert (m.pids.current, m.pids.limit) == (7, 100)
    assert (m.memory.usage, m.memory.usage_limit) == (52723712, 64 << 20)
    assert (m.memory.swap_usage, m.memory.swap_limit) == (1 << 20, 32 << 20)
    assert (m.memory.workingset_refault, m.memory.workingset_activate) == (41, 9)
    assert m.memory_events == pb.MemoryEvents(low=0, high=17, max=321, oom=2, oom_kill=2)
    assert m.cpu.throttled_usec == 7654321
    assert [(e.major, e.minor, e.wbytes) for e in m.io.usage] == [(8, 16, 1048576)]
    assert [(e.device, e.hca_handles, e.hca_objects) for e in m.rdma.current] == [("mlx5_0", 2, 23)]
    assert [(e.device, e.hca_handles, e.hca_objects) for e in m.rdma.limit] == [
        ("mlx5_0", MAX_UINT32, MAX_UINT32),
        ("mlx5_1", 10, 1000),
    ]
    assert len(m.hugetlb) == 0


def test_absent_controllers_stay_unset() -> None:
    m = v2.read_metrics(str(DATA / "cpu-only"))

    assert m.HasField("cpu") and m.cpu.usage_usec == 5
    for field in ("pids", "memory", "memory_events", "io", "rdma"):
        assert not m.HasField(field), field


def test_missing_cgroup_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(errdefs.NotFound, match="no such cgroup"):
        v2.read_metrics(str(tmp_path / "gone"))


def test_cgroup_removed_while_reading_is_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "ctr"
    shutil.copytree(DATA / "ctr", copy)
    real_read_io = v2._read_io

    def read_io_then_vanish(metrics: pb.Metrics, path: str) -> None:
        real_read_io(metrics, path)
        shutil.rmtree(path)

    monkeypatch.setattr(v2, "_read_io", read_io_then_vanish)
    with pytest.raises(errdefs.NotFound):
        v2.read_metrics(str(copy))


def test_malformed_lines_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "cpu.stat").write_text("usage_usec 10\ngarbage\nuser_usec -3\nsystem_usec x\n")
    (tmp_path / "io.stat").write_text("8:0 rbytes=5 wbytes=bad junk\nnot-a-device rbytes=1\n\n")
    (tmp_path / "memory.stat").write_text("anon 5\nbroken line here\nfile -1\n")
    m = v2.read_metrics(str(tmp_path))
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (10, 0, 0)
    assert [(e.major, e.minor, e.rbytes, e.wbytes) for e in m.io.usage] == [(8, 0, 5, 0)]
    assert (m.memory.anon, m.memory.file, m.memory.usage) == (5, 0, 0)
