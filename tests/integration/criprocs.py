"""/proc and cgroup helpers for the CRI integration tests (``criutil``, ``test_cri_*.py``).

Namespaces, cgroups and processes of a pod as the host sees them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from podshim_lab.procfs import ProcStat, process_table, read_stat


def ns_of(pid: int, kind: str) -> str:
    """``readlink /proc/<pid>/ns/<kind>`` (e.g. ``net:[4026531840]``)."""
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def host_ns(kind: str) -> str:
    """The host's namespace of ``kind``.

    This is the test process's own: containerd runs in it, and on this machine
    ``/proc/1/ns/*`` is unreadable even for root (PID 1 holds capabilities the test's
    root lacks, so the ptrace access check fails).
    """
    try:
        return ns_of(1, kind)
    except PermissionError:
        return ns_of(os.getpid(), kind)


def alive(stat: ProcStat) -> ProcStat | None:
    """That very process (same start time), live or zombie, or None once it is gone."""
    now = read_stat(stat.pid)
    return now if now is not None and now.starttime == stat.starttime else None


def children(pid: int, table: dict[int, ProcStat] | None = None) -> list[ProcStat]:
    """Direct children of ``pid``."""
    table = process_table() if table is None else table
    return sorted(s for s in table.values() if s.ppid == pid)


def describe(stats: Iterable[ProcStat]) -> str:
    """``pid comm state ppid`` lines plus the command line, for assertion messages."""
    lines = []
    for s in stats:
        try:
            argv = Path(f"/proc/{s.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            argv = ""
        lines.append(f"  {s.pid} ({s.comm}) state {s.state} ppid {s.ppid}: {argv.strip()}")
    return "\n".join(lines) or "  (none)"


def cgroup_of(pid: int, controller: str) -> str:
    """The cgroup path of ``pid`` in the v1 hierarchy holding ``controller``."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise LookupError(f"pid {pid}: no {controller} cgroup")


def read_cgroup(controller: str, path: str, name: str) -> str:
    """``/sys/fs/cgroup/<controller>/<path>/<name>``, stripped."""
    return Path("/sys/fs/cgroup", controller, path.lstrip("/"), name).read_text().strip()
