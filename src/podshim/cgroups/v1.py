"""cgroup v1: where a process's or container's cgroups are, and their statistics.

Paths are a ``dict`` from controller to absolute directory, e.g.
``{"memory": "/sys/fs/cgroup/memory/k8s.io/abc", "cpu": ..., "name=systemd": ...}``.
Controllers mounted together (``cpu,cpuacct``) appear once per controller, both
pointing at the shared directory; named hierarchies are keyed ``name=<name>``.

:func:`read_metrics` fills :class:`io.containerd.cgroups.v1.Metrics` the way
containerd/cgroups v1 does, from the controllers it knows (``cpu``, ``cpuacct``,
``memory``, ``pids``, ``blkio``, ``hugetlb``, ``rdma``) and ignores the others.
"""

from __future__ import annotations

import os

from podshim import errors as errdefs
from podshim import mountinfo
from podshim.api.cgroups.v1 import metrics_pb2 as pb
from podshim.cgroups import DEFAULT_ROOT, expand_cgroups_path
from podshim.cgroups._fs import (
    MAX_UINT32,
    missing_dirs,
    page_sizes,
    parse_major_minor,
    parse_nested_keyed,
    parse_uint,
    read_flat_keyed,
    read_text,
    read_uint,
)

__all__ = ["CONTROLLERS", "paths_for_cgroups_path", "paths_for_pid", "read_metrics"]

CONTROLLERS = frozenset(
    {
        "blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "hugetlb", "memory",
        "misc", "net_cls", "net_prio", "perf_event", "pids", "rdma",
    }
)  # fmt: skip
"""Kernel cgroup v1 controller names; any other hierarchy is a named one (``name=...``)."""

READ = frozenset({"blkio", "cpu", "cpuacct", "hugetlb", "memory", "pids", "rdma"})
"""The controllers :func:`read_metrics` reads."""

NANOS_PER_SECOND = 1_000_000_000


# --- paths -----------------------------------------------------------------------------


def paths_for_pid(pid: int, proc: str = "/proc") -> dict[str, str]:
    """The v1 cgroup directory of process ``pid`` for each hierarchy it belongs to.

    Membership comes from ``<proc>/<pid>/cgroup``; where each hierarchy is mounted comes
    from *our own* ``<proc>/self/mountinfo`` (the process may live in another mount
    namespace). A hierarchy that is not mounted here is left out; the cgroup2 line
    (``0::/...``) is ignored. Raises :class:`~podshim.errors.NotFound` if the process
    does not exist.
    """
    text = read_text(os.path.join(proc, str(pid), "cgroup"))
    if text is None:
        raise errdefs.NotFound(f"cgroups of process {pid}: no such process")
    mounts = _cgroup_mounts(read_text(os.path.join(proc, "self", "mountinfo")) or "")
    paths: dict[str, str] = {}
    for line in text.splitlines():
        _hid, sep, rest = line.partition(":")
        controllers, sep2, cgroup = rest.partition(":")
        if not sep or not sep2 or not controllers:
            continue
        keys = frozenset(controllers.split(","))
        directory = _locate(mounts, keys, cgroup)
        if directory is not None:
            for key in keys:
                paths[key] = directory
    return paths


def paths_for_cgroups_path(cgroups_path: str, root: str = DEFAULT_ROOT) -> dict[str, str]:
    """The v1 directories for an OCI ``linux.cgroupsPath`` (``/k8s.io/<id>`` or systemd form).

    Every v1 hierarchy mounted as a directory of ``root`` is included, keyed by its
    directory name split at commas (``cpu,cpuacct`` gives ``cpu`` and ``cpuacct``); a
    name that is no kernel controller is a named hierarchy (``systemd`` →
    ``name=systemd``). A symlink such as ``cpu -> cpu,cpuacct`` is followed, and the
    path through the symlink (the one runc uses) wins. The cgroup2 mount of a hybrid
    host (any directory holding ``cgroup.controllers``) is skipped. The directories
    are computed, not checked: they need not exist yet. Raises
    :class:`~podshim.errors.NotFound` if ``root`` does not exist.
    """
    relative = expand_cgroups_path(cgroups_path)
    try:
        # single-controller names (runc's view, often symlinks) before "cpu,cpuacct"
        entries = sorted(os.listdir(root), key=lambda e: ("," in e, e))
    except FileNotFoundError:
        raise errdefs.NotFound(f"cgroup v1 root {root}: not mounted") from None
    paths: dict[str, str] = {}
    for entry in entries:
        mount = os.path.join(root, entry)
        if not os.path.isdir(mount) or os.path.exists(os.path.join(mount, "cgroup.controllers")):
            continue
        directory = _join(mount, relative)
        for name in entry.split(","):
            paths.setdefault(name if name in CONTROLLERS else f"name={name}", directory)
    return paths


_Mount = tuple[frozenset[str], str, str]  # (hierarchy keys, mount point, root within hierarchy)


def _cgroup_mounts(text: str) -> list[_Mount]:
    """The cgroup v1 mounts in a mountinfo text, with the hierarchy each one shows."""
    mounts: list[_Mount] = []
    for m in mountinfo.parse(text):
        if m.fstype != "cgroup":
            continue
        keys = frozenset(o for o in m.super_options if o in CONTROLLERS or o.startswith("name="))
        mounts.append((keys, m.mountpoint, m.root))
    return mounts


def _locate(mounts: list[_Mount], keys: frozenset[str], cgroup: str) -> str | None:
    """Directory of ``cgroup`` in the hierarchy ``keys``, through a mount that shows it."""
    for mount_keys, mount_point, mount_root in mounts:
        if mount_keys != keys:
            continue
        if mount_root == "/":
            return _join(mount_point, cgroup)
        if cgroup == mount_root or cgroup.startswith(mount_root.rstrip("/") + "/"):
            return _join(mount_point, cgroup[len(mount_root) :])
    return None


def _join(directory: str, relative: str) -> str:
    """``directory/relative`` without a trailing slash when ``relative`` is the root."""
    relative = relative.strip("/")
    return os.path.join(directory, relative) if relative else directory


# --- metrics ---------------------------------------------------------------------------


def read_metrics(paths: dict[str, str], proc: str = "/proc") -> pb.Metrics:
    """Statistics of the cgroup at ``paths`` (controller → directory).

    A controller not in ``paths`` and a file missing from a present directory are
    skipped: its part of the message stays unset (or zero). Raises
    :class:`~podshim.errors.NotFound` if ``paths`` names none of the controllers read
    here, or if a directory of one of them does not exist, before or after reading
    (the cgroup was removed; a half-read result is never returned). ``proc`` is only
    used for block device names (``<proc>/partitions``).
    """
    dirs = {c: p for c, p in paths.items() if c in READ}
    if not dirs:
        raise errdefs.NotFound(f"cgroup v1: none of {sorted(READ)} in {sorted(paths)}")
    _ensure_present(dirs)
    metrics = pb.Metrics()
    if "cpu" in dirs or "cpuacct" in dirs:
        _read_cpu(metrics.cpu, dirs.get("cpuacct"), dirs.get("cpu"))
    if "memory" in dirs:
        _read_memory(metrics, dirs["memory"])
    if "pids" in dirs:
        _read_pids(metrics, dirs["pids"])
    if "blkio" in dirs:
        _read_blkio(metrics.blkio, dirs["blkio"], proc)
    if "hugetlb" in dirs:
        _read_hugetlb(metrics, dirs["hugetlb"])
    if "rdma" in dirs:
        _read_rdma(metrics.rdma, dirs["rdma"])
    _ensure_present(dirs)
    return metrics


def _ensure_present(dirs: dict[str, str]) -> None:
    gone = missing_dirs(sorted(set(dirs.values())))
    if gone:
        raise errdefs.NotFound(f"cgroup {', '.join(gone)}: no such cgroup")


def _read_cpu(cpu: pb.CPUStat, cpuacct_dir: str | None, cpu_dir: str | None) -> None:
    """cpuacct.usage (ns), cpuacct.usage_percpu (ns), cpuacct.stat (USER_HZ ticks), cpu.stat."""
    cpu.SetInParent()
    if cpuacct_dir is not None:
        usage = cpu.usage
        usage.SetInParent()
        total = read_uint(os.path.join(cpuacct_dir, "cpuacct.usage"))
        if total is not None:
            usage.total = total
        percpu = read_text(os.path.join(cpuacct_dir, "cpuacct.usage_percpu"))
        if percpu is not None:
            usage.per_cpu.extend(parse_uint(t) or 0 for t in percpu.split())
        ticks = read_flat_keyed(os.path.join(cpuacct_dir, "cpuacct.stat"))
        if ticks is not None:
            hz = os.sysconf("SC_CLK_TCK")
            usage.user = ticks.get("user", 0) * NANOS_PER_SECOND // hz
            usage.kernel = ticks.get("system", 0) * NANOS_PER_SECOND // hz
    if cpu_dir is not None:
        stat = read_flat_keyed(os.path.join(cpu_dir, "cpu.stat"))
        if stat is not None:
            throttling = cpu.throttling
            throttling.SetInParent()
            throttling.periods = stat.get("nr_periods", 0)
            throttling.throttled_periods = stat.get("nr_throttled", 0)
            throttling.throttled_time = stat.get("throttled_time", 0)


_MEMORY_STAT_RENAMES = {
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
}
_MEMORY_STAT_SCALARS = frozenset(
    f.name for f in pb.MemoryStat.DESCRIPTOR.fields if f.message_type is None
)
_MEMORY_ENTRIES = (
    ("usage", ""),
    ("swap", "memsw."),
    ("kernel", "kmem."),
    ("kernel_tcp", "kmem.tcp."),
)
_MEMORY_ENTRY_FILES = (
    ("usage", "usage_in_bytes"),
    ("max", "max_usage_in_bytes"),
    ("failcnt", "failcnt"),
    ("limit", "limit_in_bytes"),
)


def memory_stat_field(key: str) -> str | None:
    """The ``MemoryStat`` field of a ``memory.stat`` key (``total_pgfault`` → ``total_pg_fault``).

    ``None`` for keys the message has no field for (``shmem``, ``swap``, ...).
    """
    prefix = "total_" if key.startswith("total_") else ""
    base = key[len(prefix) :]
    field = prefix + _MEMORY_STAT_RENAMES.get(base, base)
    return field if field in _MEMORY_STAT_SCALARS else None


def _read_memory(metrics: pb.Metrics, directory: str) -> None:
    """memory.stat, the four MemoryEntry file groups and memory.oom_control."""
    memory = metrics.memory
    memory.SetInParent()
    for key, value in (read_flat_keyed(os.path.join(directory, "memory.stat")) or {}).items():
        field = memory_stat_field(key)
        if field is not None:
            setattr(memory, field, value)
    for entry_name, module in _MEMORY_ENTRIES:
        entry: pb.MemoryEntry = getattr(memory, entry_name)
        entry.SetInParent()  # containerd always sends all four entries
        for attr, suffix in _MEMORY_ENTRY_FILES:
            number = read_uint(os.path.join(directory, f"memory.{module}{suffix}"))
            if number is not None:
                setattr(entry, attr, number)
    oom = read_flat_keyed(os.path.join(directory, "memory.oom_control"))
    if oom is not None:
        control = metrics.memory_oom_control
        control.SetInParent()
        control.oom_kill_disable = oom.get("oom_kill_disable", 0)
        control.under_oom = oom.get("under_oom", 0)
        control.oom_kill = oom.get("oom_kill", 0)


def _read_pids(metrics: pb.Metrics, directory: str) -> None:
    """pids.current and pids.max (``max``, i.e. unlimited, is sent as 0 like containerd)."""
    current = read_uint(os.path.join(directory, "pids.current"))
    if current is None:
        return
    metrics.pids.current = current
    metrics.pids.limit = read_uint(os.path.join(directory, "pids.max"), max_as=0) or 0


_BLKIO_RECURSIVE = (
    ("sectors_recursive", "sectors_recursive"),
    ("io_service_bytes_recursive", "io_service_bytes_recursive"),
    ("io_serviced_recursive", "io_serviced_recursive"),
    ("io_queued_recursive", "io_queued_recursive"),
    ("io_service_time_recursive", "io_service_time_recursive"),
    ("io_wait_time_recursive", "io_wait_time_recursive"),
    ("io_merged_recursive", "io_merged_recursive"),
    ("time_recursive", "io_time_recursive"),
)
_BLKIO_THROTTLE = (
    ("throttle.io_serviced", "io_serviced_recursive"),
    ("throttle.io_service_bytes", "io_service_bytes_recursive"),
)


def _read_blkio(blkio: pb.BlkIOStat, directory: str, proc: str) -> None:
    """The CFQ ``*_recursive`` files; if they say nothing, the throttle counters instead.

    Throttle files are read in their ``_recursive`` form when the kernel has it (the
    non-recursive ones miss I/O of child cgroups). Device names come from
    ``<proc>/partitions`` (``/dev/<name>``, empty when unknown).
    """
    blkio.SetInParent()
    devices = _block_devices(proc)
    for file_name, field in _BLKIO_RECURSIVE:
        path = os.path.join(directory, f"blkio.{file_name}")
        _read_blkio_file(getattr(blkio, field), path, devices)
    if any(len(getattr(blkio, field)) for _, field in _BLKIO_RECURSIVE):
        return
    for file_name, field in _BLKIO_THROTTLE:
        path = os.path.join(directory, f"blkio.{file_name}")
        if os.path.exists(path + "_recursive"):
            path += "_recursive"
        _read_blkio_file(getattr(blkio, field), path, devices)


def _read_blkio_file(
    out: list[pb.BlkIOEntry], path: str, devices: dict[tuple[int, int], str]
) -> None:
    """Lines ``MAJ:MIN [Op] value``; the closing ``Total value`` line is dropped."""
    for line in (read_text(path) or "").splitlines():
        fields = line.split()
        device = parse_major_minor(fields[0]) if len(fields) in (2, 3) else None
        value = parse_uint(fields[-1]) if device is not None else None
        if device is None or value is None:
            continue
        op = fields[1] if len(fields) == 3 else ""
        out.append(
            pb.BlkIOEntry(
                op=op,
                device=devices.get(device, ""),
                major=device[0],
                minor=device[1],
                value=value,
            )
        )


def _block_devices(proc: str) -> dict[tuple[int, int], str]:
    """``(major, minor)`` → ``/dev/<name>`` from ``/proc/partitions`` (first name wins)."""
    devices: dict[tuple[int, int], str] = {}
    for line in (read_text(os.path.join(proc, "partitions")) or "").splitlines()[2:]:
        fields = line.split()
        if len(fields) == 4 and fields[0].isdigit() and fields[1].isdigit():
            devices.setdefault((int(fields[0]), int(fields[1])), f"/dev/{fields[3]}")
    return devices


def _read_hugetlb(metrics: pb.Metrics, directory: str) -> None:
    """``hugetlb.<size>.{usage_in_bytes,max_usage_in_bytes,failcnt}`` per page size."""
    for size in page_sizes(directory, "hugetlb.", ".usage_in_bytes"):
        base = os.path.join(directory, f"hugetlb.{size}.")
        metrics.hugetlb.add(
            pagesize=size,
            usage=read_uint(base + "usage_in_bytes") or 0,
            max=read_uint(base + "max_usage_in_bytes") or 0,
            failcnt=read_uint(base + "failcnt") or 0,
        )


def _read_rdma(rdma: pb.RdmaStat, directory: str) -> None:
    """rdma.current and rdma.max (``max`` → 2**32-1), one entry per device."""
    for file_name, out in (("rdma.current", rdma.current), ("rdma.max", rdma.limit)):
        text = read_text(os.path.join(directory, file_name))
        for device, values in parse_nested_keyed(text or "", max_as=MAX_UINT32, limit=MAX_UINT32):
            out.add(
                device=device,
                hca_handles=values.get("hca_handle", 0),
                hca_objects=values.get("hca_object", 0),
            )
