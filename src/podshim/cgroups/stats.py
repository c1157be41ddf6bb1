"""Task.Stats payloads: read the right cgroup version, pack it in an ``Any``, sum many.

containerd decodes ``StatsResponse.stats`` by its type URL, which must be the bare
message name (no ``type.googleapis.com/`` prefix): :data:`TYPE_URL_V1` or
:data:`TYPE_URL_V2`. The version follows the host (:func:`podshim.cgroups.mode`):
``unified`` hosts get v2 metrics, ``hybrid`` and ``legacy`` hosts get v1 metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias, TypeVar

from google.protobuf import any_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from podshim import errors as errdefs
from podshim.api.cgroups.v1 import metrics_pb2 as v1pb
from podshim.api.cgroups.v2 import metrics_pb2 as v2pb
from podshim.cgroups import DEFAULT_ROOT, mode, v1, v2
from podshim.cgroups._fs import MAX_UINT32, MAX_UINT64

__all__ = [
    "TYPE_URL_V1",
    "TYPE_URL_V2",
    "Metrics",
    "metrics_any_for_cgroups_path",
    "metrics_any_for_pid",
    "metrics_for_cgroups_path",
    "metrics_for_pid",
    "pack",
    "sum_metrics",
    "unpack",
]

Metrics: TypeAlias = v1pb.Metrics | v2pb.Metrics
M = TypeVar("M", v1pb.Metrics, v2pb.Metrics)

TYPE_URL_V1 = v1pb.Metrics.DESCRIPTOR.full_name  # "io.containerd.cgroups.v1.Metrics"
TYPE_URL_V2 = v2pb.Metrics.DESCRIPTOR.full_name  # "io.containerd.cgroups.v2.Metrics"


def metrics_for_pid(pid: int, *, root: str = DEFAULT_ROOT, proc: str = "/proc") -> Metrics:
    """Metrics of the cgroup(s) process ``pid`` is in, v2 on unified hosts, else v1.

    Raises :class:`~podshim.errors.NotFound` if the process or its cgroup is gone.
    """
    if mode(root) == "unified":
        return v2.read_metrics(v2.path_for_pid(pid, proc=proc, root=root))
    return v1.read_metrics(v1.paths_for_pid(pid, proc=proc), proc=proc)


def metrics_for_cgroups_path(cgroups_path: str, *, root: str = DEFAULT_ROOT) -> Metrics:
    """Metrics of the cgroup named by an OCI ``linux.cgroupsPath`` (e.g. ``/k8s.io/<id>``).

    Raises :class:`~podshim.errors.NotFound` if the cgroup does not exist.
    """
    if mode(root) == "unified":
        return v2.read_metrics(v2.path_for_cgroups_path(cgroups_path, root))
    return v1.read_metrics(v1.paths_for_cgroups_path(cgroups_path, root))


def metrics_any_for_pid(pid: int) -> any_pb2.Any:
    """:func:`metrics_for_pid` packed for ``StatsResponse.stats``."""
    return pack(metrics_for_pid(pid))


def metrics_any_for_cgroups_path(cgroups_path: str) -> any_pb2.Any:
    """:func:`metrics_for_cgroups_path` packed for ``StatsResponse.stats``."""
    return pack(metrics_for_cgroups_path(cgroups_path))


def pack(metrics: Metrics) -> any_pb2.Any:
    """An ``Any`` whose ``type_url`` is the bare full name containerd expects.

    (``Any.Pack`` would prefix ``type.googleapis.com/``, which containerd's typeurl
    registry does not know for these messages.)
    """
    return any_pb2.Any(
        type_url=metrics.DESCRIPTOR.full_name,
        value=metrics.SerializeToString(deterministic=True),
    )


def unpack(payload: any_pb2.Any) -> Metrics:
    """The metrics message inside ``payload``; :class:`~podshim.errors.InvalidArgument`
    for any other type URL (with or without a ``type.googleapis.com/`` prefix)."""
    name = payload.type_url.rpartition("/")[2]
    message: Metrics
    if name == TYPE_URL_V1:
        message = v1pb.Metrics()
    elif name == TYPE_URL_V2:
        message = v2pb.Metrics()
    else:
        raise errdefs.InvalidArgument(f"unexpected metrics type {payload.type_url!r}")
    message.ParseFromString(payload.value)
    return message


# --- summing ---------------------------------------------------------------------------

_V1 = "io.containerd.cgroups.v1."
_V2 = "io.containerd.cgroups.v2."

_MAX_FIELDS: dict[str, frozenset[str]] = {
    _V1 + "PidsStat": frozenset({"limit"}),
    _V1 + "MemoryStat": frozenset({"hierarchical_memory_limit", "hierarchical_swap_limit"}),
    _V1 + "MemoryEntry": frozenset({"limit"}),
    _V1 + "MemoryOomControl": frozenset({"oom_kill_disable", "under_oom"}),
    _V2 + "PidsStat": frozenset({"limit"}),
    _V2 + "MemoryStat": frozenset({"usage_limit", "swap_limit"}),
    _V2 + "HugeTlbStat": frozenset({"max"}),
}
"""Per message: the fields that are limits or 0/1 flags, combined by ``max``."""

_MAX_LISTS = frozenset({(_V1 + "RdmaStat", "limit"), (_V2 + "RdmaStat", "limit")})
"""Repeated fields whose entries are limits throughout, combined by ``max``."""

_KEYS: dict[str, tuple[str, ...]] = {
    _V1 + "HugetlbStat": ("pagesize",),
    _V1 + "BlkIOEntry": ("op", "device", "major", "minor"),
    _V1 + "RdmaEntry": ("device",),
    _V1 + "NetworkStat": ("name",),
    _V2 + "IOEntry": ("major", "minor"),
    _V2 + "RdmaEntry": ("device",),
    _V2 + "HugeTlbStat": ("pagesize",),
}
"""Per element type of a repeated field: the fields identifying an entry across inputs."""


def sum_metrics(items: Sequence[M]) -> M:
    """One metrics message adding up ``items`` (all of one version), e.g. for a pod.

    Field by field: counters, usages and high-water marks (v1 ``MemoryEntry.max`` and
    ``HugetlbStat.max``, so an upper bound) are summed, saturating at the field's
    maximum; limits (``limit``, ``usage_limit``, ``swap_limit``, ``hierarchical_*_limit``,
    v2 hugetlb ``max``, rdma ``limit``) and the v1 ``oom_kill_disable``/``under_oom``
    flags take the largest value. ``per_cpu`` is summed per CPU. Repeated entries are
    matched by their identity (page size, device, op) and combined; unmatched ones are
    copied. A sub-message is present in the result if it is in any input. The inputs
    are not modified. Raises :class:`ValueError` for an empty sequence and
    :class:`TypeError` for mixed versions.
    """
    if not items:
        raise ValueError("sum_metrics: nothing to sum")
    kind = type(items[0])
    result = kind()
    for item in items:
        if type(item) is not kind:
            raise TypeError(f"sum_metrics: cannot add {type(item).__name__} to {kind.__name__}")
        _add(result, item, take_max=False)
    return result


def _add(dst: Message, src: Message, *, take_max: bool) -> None:
    """Combine ``src`` into ``dst`` (same message type) in place; identity fields are kept."""
    type_name = dst.DESCRIPTOR.full_name
    max_fields = _MAX_FIELDS.get(type_name, frozenset())
    keys = _KEYS.get(type_name, ())
    for field, value in src.ListFields():
        if field.name in keys:
            continue  # equal in both (that is how entries were matched), or set by append
        if field.is_repeated:
            target = getattr(dst, field.name)
            if field.message_type is None:
                _add_scalars(target, value, _bound(field))
            else:
                list_max = take_max or (type_name, field.name) in _MAX_LISTS
                _merge_entries(target, value, field.message_type.full_name, list_max)
        elif field.message_type is not None:
            child = getattr(dst, field.name)
            child.SetInParent()
            _add(child, value, take_max=take_max)
        elif field.type == FieldDescriptor.TYPE_STRING:
            if not getattr(dst, field.name):
                setattr(dst, field.name, value)
        else:
            current = getattr(dst, field.name)
            if take_max or field.name in max_fields:
                setattr(dst, field.name, max(current, value))
            else:
                setattr(dst, field.name, min(current + value, _bound(field)))


def _bound(field: FieldDescriptor) -> int:
    return MAX_UINT32 if field.type == FieldDescriptor.TYPE_UINT32 else MAX_UINT64


def _add_scalars(target: list[int], values: Sequence[int], bound: int) -> None:
    for index, value in enumerate(values):
        if index < len(target):
            target[index] = min(target[index] + value, bound)
        else:
            target.append(value)


def _merge_entries(
    target: list[Message], entries: Sequence[Message], element: str, take_max: bool
) -> None:
    keys = _KEYS.get(element)
    if keys is None:  # no identity: keep every entry
        for entry in entries:
            target.append(entry)
        return
    index = {tuple(getattr(e, k) for k in keys): e for e in target}
    for entry in entries:
        key = tuple(getattr(entry, k) for k in keys)
        if key in index:
            _add(index[key], entry, take_max=take_max)
        else:
            target.append(entry)
            index[key] = target[-1]
