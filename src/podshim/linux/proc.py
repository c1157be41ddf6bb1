"""Facts about processes read from ``/proc`` (standard library only)."""

from __future__ import annotations


def start_time(pid: int, proc: str = "/proc") -> int | None:
    """Start time (clock ticks after boot, ``stat`` field 22) of a live, non-zombie
    ``pid``, else None. With the pid it names one process for good: a reused pid
    starts later."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20 or fields[0] in ("Z", "X") or not fields[19].isdigit():
        return None
    return int(fields[19])


def parent(pid: int, proc: str = "/proc") -> int | None:
    """The parent pid (``stat`` field 4) of ``pid``, or None when it is gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
