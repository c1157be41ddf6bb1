"""Small ``/proc`` and cgroup helpers shared by the subreaper and the lab."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "ZYGOTE_COMM",
    "ProcStat",
    "descendants",
    "process_table",
    "read_stat",
    "thaw_cgroups",
    "without_zygotes",
]

#: comm of podshim's zygote: one per containerd, it outlives the pods (until it has had
#: no child for a while, or its containerd exits), so the lab's leak checks account for it
#: apart: it is no pod's leftover, and nothing of a pod may be left below it
ZYGOTE_COMM = "podshim-zygote"


class ProcStat(NamedTuple):
    """The few fields of ``/proc/<pid>/stat`` the lab needs."""

    pid: int
    comm: str
    state: str
    ppid: int
    starttime: int


def read_stat(pid: int) -> ProcStat | None:
    """Parse ``/proc/<pid>/stat``; ``None`` if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    lpar, rpar = raw.find("("), raw.rfind(")")
    if lpar < 0 or rpar < 0:
        return None
    fields = raw[rpar + 2 :].split()
    # fields[0] is field 3 (state); starttime is field 22.
    return ProcStat(pid, raw[lpar + 1 : rpar], fields[0], int(fields[1]), int(fields[19]))


def without_zygotes(stats: list[ProcStat]) -> list[ProcStat]:
    """``stats`` but the zygotes themselves (their children stay in)."""
    return [s for s in stats if s.comm != ZYGOTE_COMM]


def process_table() -> dict[int, ProcStat]:
    """Snapshot every process currently visible in ``/proc``."""
    table: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat is not None:
                table[stat.pid] = stat
    return table


def descendants(root: int, table: dict[int, ProcStat] | None = None) -> list[ProcStat]:
    """Every process (live or zombie) whose parent chain leads to ``root``."""
    if table is None:
        table = process_table()
    children: dict[int, list[int]] = {}
    for stat in table.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found: list[ProcStat] = []
    todo = list(children.get(root, []))
    seen = {root}
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        found.append(table[pid])
        todo.extend(children.get(pid, []))
    return sorted(found)


def thaw_cgroups(pid: int) -> None:
    """Thaw the freezer cgroup(s) of ``pid`` so a pending SIGKILL can land."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if "freezer" in controllers.split(","):
            target = Path("/sys/fs/cgroup/freezer", rel, "freezer.state")
            payload = "THAWED"
        elif controllers == "":
            base = Path("/sys/fs/cgroup/unified")
            if not base.is_dir():
                base = Path("/sys/fs/cgroup")
            target = base / rel / "cgroup.freeze"
            payload = "0"
        else:
            continue
        try:
            if target.exists() and target.read_text().strip() not in ("THAWED", "0"):
                target.write_text(payload)
        except OSError:
            pass
