"""``/proc/<pid>/mountinfo``: the one parser of it in podshim (cgroup hierarchies, the
sandbox cgroup's mounts, mount points to unmount). Pure, standard library only."""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` for a space, ...) of a path field."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of mountinfo (the fields podshim uses)."""

    #: ``major:minor`` of the filesystem: lines with the same one show the same hierarchy
    dev: str
    #: the directory of the filesystem shown at :attr:`mountpoint` ("/" for all of it)
    root: str
    mountpoint: str
    fstype: str
    super_options: tuple[str, ...]


def parse(text: str) -> list[Mount]:
    """Every well-formed line of a mountinfo text; malformed lines are skipped."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, super_fields = left.split(), right.split()
        if not sep or len(fields) < 5 or len(super_fields) < 3:
            continue
        mounts.append(Mount(fields[2], unescape(fields[3]), unescape(fields[4]),
                            super_fields[0], tuple(super_fields[2].split(","))))  # fmt: skip
    return mounts


def read(path: str = "/proc/self/mountinfo") -> list[Mount]:
    """:func:`parse` of the file at ``path`` (OSError when unreadable)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse(f.read())
