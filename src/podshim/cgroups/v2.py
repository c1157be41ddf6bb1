"""cgroup v2 (unified hierarchy): where a cgroup is, and its statistics.

:func:`read_metrics` fills :class:`io.containerd.cgroups.v2.Metrics` the way
containerd/cgroups v2 does: ``max`` limits become 2**64-1 (Go's ``math.MaxUint64``),
absent controllers leave their part of the message unset.
"""

from __future__ import annotations

import os

from podshim import errors as errdefs
from podshim.api.cgroups.v2 import metrics_pb2 as pb
from podshim.cgroups import DEFAULT_ROOT, expand_cgroups_path
from podshim.cgroups._fs import (
    MAX_UINT32,
    MAX_UINT64,
    page_sizes,
    parse_major_minor,
    parse_nested_keyed,
    read_flat_keyed,
    read_text,
    read_uint,
)

__all__ = ["path_for_cgroups_path", "path_for_pid", "read_metrics"]


def path_for_pid(pid: int, proc: str = "/proc", root: str = DEFAULT_ROOT) -> str:
    """The cgroup2 directory of process ``pid``: ``root`` + the ``0::<path>`` line of
    ``<proc>/<pid>/cgroup``.

    Raises :class:`~podshim.errors.NotFound` if the process does not exist or belongs to
    no cgroup2 group (a v1-only host).
    """
    text = read_text(os.path.join(proc, str(pid), "cgroup"))
    if text is None:
        raise errdefs.NotFound(f"cgroup of process {pid}: no such process")
    for line in text.splitlines():
        if line.startswith("0::"):
            return _join(root, line[3:])
    raise errdefs.NotFound(f"cgroup of process {pid}: not in a cgroup v2 hierarchy")


def path_for_cgroups_path(cgroups_path: str, root: str = DEFAULT_ROOT) -> str:
    """The cgroup2 directory for an OCI ``linux.cgroupsPath`` (plain or systemd form)."""
    return _join(root, expand_cgroups_path(cgroups_path))


def _join(root: str, relative: str) -> str:
    relative = relative.strip("/")
    return os.path.join(root, relative) if relative else root


_CPU_STAT_FIELDS = (
    "usage_usec",
    "user_usec",
    "system_usec",
    "nr_periods",
    "nr_throttled",
    "throttled_usec",
)
_MEMORY_FILE_FIELDS = frozenset({"usage", "usage_limit", "swap_usage", "swap_limit"})
_MEMORY_STAT_FIELDS = frozenset(
    f.name for f in pb.MemoryStat.DESCRIPTOR.fields if f.name not in _MEMORY_FILE_FIELDS
)
_SPLIT_COUNTERS = ("workingset_refault", "workingset_activate")
_MEMORY_EVENTS = ("low", "high", "max", "oom", "oom_kill")


def read_metrics(path: str) -> pb.Metrics:
    """Statistics of the cgroup2 directory ``path``.

    Reads ``pids.{current,max}``, ``cpu.stat``, ``memory.{current,max,stat}``,
    ``memory.swap.{current,max}``, ``memory.events``, ``io.stat``, ``rdma.{current,max}``
    and ``hugetlb.<size>.{current,max}``; a missing file is skipped. Raises
    :class:`~podshim.errors.NotFound` if ``path`` is not a directory before or after
    reading (the cgroup was removed; a half-read result is never returned).
    """
    _ensure_present(path)
    metrics = pb.Metrics()
    _read_pids(metrics, path)
    cpu = read_flat_keyed(os.path.join(path, "cpu.stat"))
    if cpu is not None:
        metrics.cpu.SetInParent()
        for name in _CPU_STAT_FIELDS:
            setattr(metrics.cpu, name, cpu.get(name, 0))
    _read_memory(metrics, path)
    events = read_flat_keyed(os.path.join(path, "memory.events"))
    if events is not None:
        metrics.memory_events.SetInParent()
        for name in _MEMORY_EVENTS:
            setattr(metrics.memory_events, name, events.get(name, 0))
    _read_io(metrics, path)
    _read_rdma(metrics, path)
    for size in page_sizes(path, "hugetlb.", ".current"):
        metrics.hugetlb.add(
            pagesize=size,
            current=read_uint(os.path.join(path, f"hugetlb.{size}.current")) or 0,
            max=read_uint(os.path.join(path, f"hugetlb.{size}.max"), max_as=MAX_UINT64) or 0,
        )
    _ensure_present(path)
    return metrics


def _ensure_present(path: str) -> None:
    if not os.path.isdir(path):
        raise errdefs.NotFound(f"cgroup {path}: no such cgroup")


def _read_pids(metrics: pb.Metrics, path: str) -> None:
    current = read_uint(os.path.join(path, "pids.current"))
    if current is None:
        return
    metrics.pids.current = current
    metrics.pids.limit = read_uint(os.path.join(path, "pids.max"), max_as=MAX_UINT64) or 0


def _read_memory(metrics: pb.Metrics, path: str) -> None:
    """memory.stat keys onto the ``MemoryStat`` fields of the same name, plus the files.

    Kernels since 5.9 split ``workingset_refault``/``workingset_activate`` into
    ``_anon`` and ``_file``; when the plain key is absent the field is their sum.
    """
    usage = read_uint(os.path.join(path, "memory.current"))
    stat = read_flat_keyed(os.path.join(path, "memory.stat"))
    if usage is None and stat is None:
        return
    memory = metrics.memory
    memory.SetInParent()
    stat = stat or {}
    for key, value in stat.items():
        if key in _MEMORY_STAT_FIELDS:
            setattr(memory, key, value)
    for key in _SPLIT_COUNTERS:
        if key not in stat:
            total = stat.get(f"{key}_anon", 0) + stat.get(f"{key}_file", 0)
            setattr(memory, key, min(total, MAX_UINT64))
    memory.usage = usage or 0
    memory.usage_limit = read_uint(os.path.join(path, "memory.max"), max_as=MAX_UINT64) or 0
    memory.swap_usage = read_uint(os.path.join(path, "memory.swap.current")) or 0
    memory.swap_limit = read_uint(os.path.join(path, "memory.swap.max"), max_as=MAX_UINT64) or 0


def _read_io(metrics: pb.Metrics, path: str) -> None:
    """io.stat: ``MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. [dbytes=.. dios=..]`` lines."""
    text = read_text(os.path.join(path, "io.stat"))
    if text is None:
        return
    metrics.io.SetInParent()
    for device, values in parse_nested_keyed(text):
        numbers = parse_major_minor(device)
        if numbers is None:
            continue
        metrics.io.usage.add(
            major=numbers[0],
            minor=numbers[1],
            rbytes=values.get("rbytes", 0),
            wbytes=values.get("wbytes", 0),
            rios=values.get("rios", 0),
            wios=values.get("wios", 0),
        )


def _read_rdma(metrics: pb.Metrics, path: str) -> None:
    """rdma.current and rdma.max (``max`` → 2**32-1), one entry per device."""
    rdma = metrics.rdma
    for file_name, out in (("rdma.current", rdma.current), ("rdma.max", rdma.limit)):
        text = read_text(os.path.join(path, file_name))
        if text is None:
            continue
        rdma.SetInParent()
        for device, values in parse_nested_keyed(text, max_as=MAX_UINT32, limit=MAX_UINT32):
            out.add(
                device=device,
                hca_handles=values.get("hca_handle", 0),
                hca_objects=values.get("hca_object", 0),
            )
