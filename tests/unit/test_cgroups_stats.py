"""Version choice, Any packing and summing of cgroup metrics; cgroups path expansion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.api.cgroups.v1 import metrics_pb2 as pb1
from podshim.api.cgroups.v2 import metrics_pb2 as pb2
from podshim.cgroups import expand_cgroups_path, mode, stats, v1, v2

DATA = Path(__file__).resolve().parent / "data"
MAX_UINT64 = 2**64 - 1
NO_SUCH_PID = 4194305  # above the largest possible pid_max (2**22)


def mounted_fstype(mount_point: str) -> str | None:
    fstype = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == mount_point:
            fstype = right.split()[0]  # the last mount on a point is the visible one
    return fstype


# --- mode ------------------------------------------------------------------------------


def test_mode_of_this_host_agrees_with_mountinfo() -> None:
    if not os.path.isdir("/sys/fs/cgroup"):
        pytest.skip("no /sys/fs/cgroup")
    if mounted_fstype("/sys/fs/cgroup") == "cgroup2":
        expected = "unified"
    elif mounted_fstype("/sys/fs/cgroup/unified") == "cgroup2":
        expected = "hybrid"
    else:
        expected = "legacy"
    assert mode() == expected


def test_mode_of_a_plain_directory_is_legacy(tmp_path: Path) -> None:
    assert mode(str(tmp_path)) == "legacy"
    (tmp_path / "unified").mkdir()  # a directory, not a cgroup2 mount
    assert mode(str(tmp_path)) == "legacy"


def test_mode_of_a_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        mode(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("cgroups_path", "expected"),
    [
        ("/k8s.io/abc", "/k8s.io/abc"),
        ("k8s.io/abc", "/k8s.io/abc"),
        ("", "/"),
        ("system.slice:docker:abc", "/system.slice/docker-abc.scope"),
        (":cri-containerd:abc", "/system.slice/cri-containerd-abc.scope"),
        ("-.slice:p:abc", "/p-abc.scope"),
        ("kubepods.slice::pod.slice", "/kubepods.slice/pod.slice"),
        (
            "kubepods-besteffort-pod1.slice:cri-containerd:abc",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/"
            "cri-containerd-abc.scope",
        ),
    ],
)
def test_expand_cgroups_path(cgroups_path: str, expected: str) -> None:
    assert expand_cgroups_path(cgroups_path) == expected


@pytest.mark.parametrize("bad", ["a--b.slice:p:x", "-a.slice:p:x", "nota-slice:p:x"])
def test_expand_cgroups_path_rejects_bad_slices(bad: str) -> None:
    with pytest.raises(ValueError, match="slice"):
        expand_cgroups_path(bad)


# --- live entry points -----------------------------------------------------------------


def test_metrics_for_this_process_follow_the_host_mode() -> None:
    if not os.path.isdir("/sys/fs/cgroup") or not os.path.exists("/proc/self/cgroup"):
        pytest.skip("no cgroups here")
    metrics = stats.metrics_for_pid(os.getpid())
    expected = pb2.Metrics if mode() == "unified" else pb1.Metrics
    assert isinstance(metrics, expected)
    packed = stats.metrics_any_for_pid(os.getpid())
    assert packed.type_url == expected.DESCRIPTOR.full_name


def test_metrics_for_a_missing_process_is_not_found() -> None:
    with pytest.raises(errdefs.NotFound):
        stats.metrics_any_for_pid(NO_SUCH_PID)


# --- pack ------------------------------------------------------------------------------


def test_pack_uses_the_bare_type_urls() -> None:
    m1 = v1.read_metrics(v1.paths_for_cgroups_path("k8s.io/ctr1", str(DATA / "cgroup1" / "root")))
    m2 = v2.read_metrics(str(DATA / "cgroup2" / "ctr"))
    a1, a2 = stats.pack(m1), stats.pack(m2)
    assert a1.type_url == stats.TYPE_URL_V1 == "io.containerd.cgroups.v1.Metrics"
    assert a2.type_url == stats.TYPE_URL_V2 == "io.containerd.cgroups.v2.Metrics"
    assert stats.unpack(a1) == m1 and stats.unpack(a2) == m2
    assert pb1.Metrics.FromString(a1.value) == m1
    # what a client gets after a round trip through StatsResponse bytes
    assert any_pb2.Any.FromString(a2.SerializeToString()) == a2


def test_unpack_accepts_a_prefixed_url_and_rejects_others() -> None:
    m = pb2.Metrics(pids=pb2.PidsStat(current=2))
    prefixed = any_pb2.Any(
        type_url="type.googleapis.com/io.containerd.cgroups.v2.Metrics", value=m.SerializeToString()
    )
    assert stats.unpack(prefixed) == m
    with pytest.raises(errdefs.InvalidArgument, match="unexpected metrics type"):
        stats.unpack(any_pb2.Any(type_url="io.containerd.cgroups.v3.Metrics"))


# --- sum_metrics -----------------------------------------------------------------------


def test_sum_v2_container_metrics() -> None:
    a = v2.read_metrics(str(DATA / "cgroup2" / "ctr"))
    b = v2.read_metrics(str(DATA / "cgroup2" / "limited"))
    c = v2.read_metrics(str(DATA / "cgroup2" / "cpu-only"))
    frozen = [x.SerializeToString() for x in (a, b, c)]

    total = stats.sum_metrics([a, b, c])

    assert [x.SerializeToString() for x in (a, b, c)] == frozen  # inputs untouched
    assert total.cpu.usage_usec == 1843200 + 98765432 + 5
    assert total.cpu.nr_throttled == 7 + 1234
    assert total.pids == pb2.PidsStat(current=3 + 7, limit=MAX_UINT64)  # limits: max
    assert total.memory.usage == 16130048 + 52723712
    assert total.memory.anon == 4546560 + 52461568
    assert total.memory.inactive_file == 7417856 + 540672
    assert (total.memory.usage_limit, total.memory.swap_limit) == (MAX_UINT64, MAX_UINT64)
    assert total.memory.swap_usage == 1 << 20
    assert total.memory_events == pb2.MemoryEvents(high=17, max=321, oom=2, oom_kill=2)
    # io entries are matched by device: 8:0 and 253:0 from a, 8:16 from b
    assert [(e.major, e.minor) for e in total.io.usage] == [(8, 0), (253, 0), (8, 16)]
    assert [(h.pagesize, h.max) for h in total.hugetlb] == [
        ("2MB", MAX_UINT64),
        ("1GB", MAX_UINT64),
    ]
    assert [(e.device, e.hca_handles) for e in total.rdma.limit] == [
        ("mlx5_0", 2**32 - 1),
        ("mlx5_1", 10),
    ]


def test_sum_v2_merges_matching_entries_and_saturates() -> None:
    a = pb2.Metrics(
        cpu=pb2.CPUStat(usage_usec=MAX_UINT64 - 1),
        io=pb2.IOStat(usage=[pb2.IOEntry(major=8, minor=0, rbytes=1, wios=2)]),
        rdma=pb2.RdmaStat(limit=[pb2.RdmaEntry(device="m", hca_handles=5, hca_objects=9)]),
        hugetlb=[pb2.HugeTlbStat(pagesize="2MB", current=4, max=10)],
    )
    b = pb2.Metrics(
        cpu=pb2.CPUStat(usage_usec=5),
        io=pb2.IOStat(usage=[pb2.IOEntry(major=8, minor=0, rbytes=10, wios=20)]),
        rdma=pb2.RdmaStat(limit=[pb2.RdmaEntry(device="m", hca_handles=7, hca_objects=3)]),
        hugetlb=[pb2.HugeTlbStat(pagesize="2MB", current=6, max=8)],
    )
    total = stats.sum_metrics([a, b])
    assert total.cpu.usage_usec == MAX_UINT64
    assert list(total.io.usage) == [pb2.IOEntry(major=8, minor=0, rbytes=11, wios=22)]
    assert list(total.rdma.limit) == [pb2.RdmaEntry(device="m", hca_handles=7, hca_objects=9)]
    assert list(total.hugetlb) == [pb2.HugeTlbStat(pagesize="2MB", current=10, max=10)]


def test_sum_v1_container_metrics() -> None:
    root = DATA / "cgroup1" / "root"
    proc = str(DATA / "cgroup1" / "proc")
    a = v1.read_metrics(v1.paths_for_cgroups_path("k8s.io/ctr1", str(root)), proc=proc)
    ctr2 = {c: str(root / c / "k8s.io" / "ctr2") for c in ("memory", "pids", "blkio")}
    b = v1.read_metrics(ctr2, proc=proc)

    total = stats.sum_metrics([a, b])

    assert total.cpu == a.cpu  # present in one input only
    assert total.pids == pb1.PidsStat(current=4, limit=100)
    assert total.memory.usage == pb1.MemoryEntry(
        usage=21585920 + 1052672,
        max=44261376 + 2105344,  # high-water marks add up (an upper bound)
        failcnt=17,
        limit=9223372036854771712,  # limits: max
    )
    assert total.memory.total_rss == 15269888 + 1052672
    assert total.memory.hierarchical_memory_limit == 9223372036854771712
    assert total.memory_oom_control == pb1.MemoryOomControl(
        oom_kill_disable=1, under_oom=1, oom_kill=1
    )
    # 12 throttle entries (sda, dm-0) + 5 CFQ entries; "Read" on 8:0 matched and added
    entries = {(e.device, e.op): e.value for e in total.blkio.io_service_bytes_recursive}
    assert len(total.blkio.io_service_bytes_recursive) == 12
    assert entries[("/dev/sda", "Read")] == 7401472 + 4096
    assert [(h.pagesize, h.usage) for h in total.hugetlb] == [("2MB", 4 << 20), ("1GB", 0)]


def test_sum_v1_per_cpu_is_added_per_cpu() -> None:
    a = pb1.Metrics(cpu=pb1.CPUStat(usage=pb1.CPUUsage(total=3, per_cpu=[1, 2])))
    b = pb1.Metrics(cpu=pb1.CPUStat(usage=pb1.CPUUsage(total=10, per_cpu=[4, 5, 1])))
    usage = stats.sum_metrics([a, b]).cpu.usage
    assert (usage.total, list(usage.per_cpu)) == (13, [5, 7, 1])


def test_sum_keeps_present_but_empty_parts() -> None:
    a = pb1.Metrics()
    a.memory.usage.SetInParent()
    total = stats.sum_metrics([a, pb1.Metrics()])
    assert total.HasField("memory") and total.memory.HasField("usage")
    assert not total.HasField("pids")


def test_sum_one_is_a_copy() -> None:
    a = v2.read_metrics(str(DATA / "cgroup2" / "ctr"))
    total = stats.sum_metrics([a])
    assert total == a and total is not a


def test_sum_rejects_nothing_and_mixed_versions() -> None:
    with pytest.raises(ValueError):
        stats.sum_metrics([])
    mixed: list[pb1.Metrics] = [pb1.Metrics(), pb2.Metrics()]  # type: ignore[list-item]
    with pytest.raises(TypeError, match="cannot add"):
        stats.sum_metrics(mixed)
