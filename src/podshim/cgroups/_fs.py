"""Reading cgroup interface files: absent means ``None``, never an exception.

A cgroup file can be missing because the controller is not enabled, the kernel is too
old or too new for it, or the cgroup is being removed (reads then fail with ``ENODEV``).
All of these are "no value" to the metrics readers, which decide separately (by
checking the directory) whether the cgroup itself is gone. Permission and other I/O
errors still raise.
"""

from __future__ import annotations

import errno
import os
import re

MAX_UINT64 = (1 << 64) - 1
MAX_UINT32 = (1 << 32) - 1

_ABSENT = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.ESRCH, errno.EOPNOTSUPP, errno.ENOTSUP}
)


def read_text(path: str) -> str | None:
    """The whole file as text, or ``None`` if it does not exist (or its cgroup is going)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        raise


def parse_uint(token: str, *, limit: int = MAX_UINT64) -> int | None:
    """A decimal token as an unsigned integer: negative → 0, too big → ``limit``, junk → None.

    Negative values do appear (``memory.stat`` counters can briefly underflow); containerd
    reads them as 0 too.
    """
    try:
        value = int(token)
    except ValueError:
        return None
    return min(max(value, 0), limit)


def read_uint(path: str, *, max_as: int | None = None, limit: int = MAX_UINT64) -> int | None:
    """A single-value file: its integer, ``max_as`` for the word ``max``, else ``None``."""
    text = read_text(path)
    if text is None:
        return None
    token = text.strip()
    if token == "max":
        return max_as
    return parse_uint(token, limit=limit)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (``memory.stat``, ``cpu.stat``, ...) as a dict; bad lines are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 2:
            continue
        value = parse_uint(fields[1])
        if value is not None:
            out[fields[0]] = value
    return out


def read_flat_keyed(path: str) -> dict[str, int] | None:
    """:func:`parse_flat_keyed` of a file, or ``None`` if the file is absent."""
    text = read_text(path)
    return None if text is None else parse_flat_keyed(text)


def parse_nested_keyed(
    text: str, *, max_as: int = MAX_UINT64, limit: int = MAX_UINT64
) -> list[tuple[str, dict[str, int]]]:
    """``name k=v k=v`` lines (``io.stat``, ``rdma.current``) in file order.

    ``max`` values become ``max_as``; unparsable pairs are dropped; values are capped
    at ``limit``.
    """
    out: list[tuple[str, dict[str, int]]] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        pairs: dict[str, int] = {}
        for item in fields[1:]:
            key, sep, raw = item.partition("=")
            if not sep:
                continue
            value = min(max_as, limit) if raw == "max" else parse_uint(raw, limit=limit)
            if value is not None:
                pairs[key] = value
        out.append((fields[0], pairs))
    return out


def parse_major_minor(token: str) -> tuple[int, int] | None:
    """``"8:16"`` → ``(8, 16)``; anything else → ``None``."""
    major, sep, minor = token.partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        return None
    return int(major), int(minor)


def missing_dirs(paths: list[str]) -> list[str]:
    """Those of ``paths`` that are not (or no longer) directories."""
    return [p for p in paths if not os.path.isdir(p)]


def page_sizes(directory: str, prefix: str, suffix: str) -> list[str]:
    """Huge page sizes (``2MB``, ``1GB``) named by ``<prefix><size><suffix>`` files, small first.

    Listing the cgroup directory (rather than ``/sys/kernel/mm/hugepages``) keeps the
    readers self-contained and lets recorded trees be read in tests.
    """
    try:
        names = os.listdir(directory)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return []
        raise
    sizes = {
        n[len(prefix) : -len(suffix)]
        for n in names
        if n.startswith(prefix) and n.endswith(suffix) and len(n) > len(prefix) + len(suffix)
    }
    # hugetlb.2MB.rsvd.current and the like are other counters, not page sizes
    return sorted((s for s in sizes if _PAGE_SIZE.fullmatch(s)), key=_size_bytes)


_PAGE_SIZE = re.compile(r"([0-9]+)([KMGT]B)")
_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def _size_bytes(size: str) -> int:
    number, unit = size[:-2], size[-2:]
    return int(number) * _UNITS[unit]
