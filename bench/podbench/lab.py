"""The runtimes compared (*columns*), their private CRI containerd, and which processes
belong to which runtime.

Every column is a CRI handler of the same private containerd:

=========  =====================  =====================================================
column     handler                what
=========  =====================  =====================================================
runc       ``runc``               containerd's ``io.containerd.runc.v2`` (the reference)
pod        ``podshim``            podshim, pod scope (one shim process per pod)
node       ``podshim-node``       podshim with ``shim_scope = "node"`` in its config
null       ``null``               the do-nothing shim, node scope (containerd's floor)
null-pod   ``null-pod``           the do-nothing shim, one daemon per pod
=========  =====================  =====================================================

podshim keeps its host state in a private run directory (``PODSHIM_RUN_DIR``), so a
benchmark never meets another podshim user's sockets or pins.

A column's *runtime processes* are found below the lab's subreaper: each direct child
of the subreaper but containerd (a shim daemon, a zygote, a node daemon) is attributed
to a column by its command line, and its descendants with it (pause, podshim-init,
runc's short-lived helpers), minus the containers' own processes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nullshim

from podshim_lab import Containerd, RuntimeHandler
from podshim_lab.cleanup import unmount_under
from podshim_lab.procfs import process_table

COLUMNS = ("runc", "pod", "node", "null", "null-pod")
DEFAULT_COLUMNS = ("runc", "pod", "node", "null")
HANDLERS = {
    "runc": "runc",
    "pod": "podshim",
    "node": "podshim-node",
    "null": "null",
    "null-pod": "null-pod",
}
PODSHIM_RUNTIME = "io.containerd.podshim.v1"
PODSHIM_BINARY = "containerd-shim-podshim-v1"


@dataclass
class Bench:
    """The running lab: containerd, the busybox image, podshim's run dir."""

    lab: Containerd
    image: str
    run_dir: Path
    columns: tuple[str, ...]

    def handler(self, column: str) -> str:
        return HANDLERS[column]


def _toml(table: Mapping[str, str | int | bool]) -> str:
    def value(v: str | int | bool) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v) if isinstance(v, int) else '"' + v.replace('"', '\\"') + '"'

    return "".join(f"{k} = {value(v)}\n" for k, v in table.items())


def parse_setting(text: str) -> tuple[str, str | int | bool]:
    """``key=value`` of ``--podshim-set``: true/false and integers typed, else a string."""
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise ValueError(f"not key=value: {text!r}")
    value: str | int | bool = raw.strip()
    if raw.strip() in ("true", "false"):
        value = raw.strip() == "true"
    elif raw.strip().lstrip("-").isdigit():
        value = int(raw.strip())
    return key.strip(), value


@contextlib.contextmanager
def open_bench(
    columns: Sequence[str],
    podshim_settings: Mapping[str, str | int | bool] = {},
    log_level: str = "warn",
) -> Iterator[Bench]:
    """Start the private containerd with a handler per column; tear everything down."""
    run_dir = Path(tempfile.mkdtemp(prefix="psb-", dir="/run"))
    bin_dir = run_dir / "bin"
    nullshim.install(str(bin_dir))
    runtimes: dict[str, RuntimeHandler] = {}
    for column, scope in (("pod", "pod"), ("node", "node")):
        config = run_dir / f"podshim-{scope}.toml"
        table: dict[str, str | int | bool] = dict(podshim_settings)
        if scope == "node":
            table["shim_scope"] = "node"
        config.write_text(f"# podshim, {scope} scope (bench)\n" + _toml(table))
        runtimes[HANDLERS[column]] = RuntimeHandler(PODSHIM_RUNTIME, {"ConfigPath": str(config)})
    runtimes[HANDLERS["null"]] = RuntimeHandler(nullshim.RUNTIME_TYPES["node"])
    runtimes[HANDLERS["null-pod"]] = RuntimeHandler(nullshim.RUNTIME_TYPES["pod"])
    lab = Containerd(
        cri=True,
        runtimes=runtimes,
        extra_path=[str(bin_dir), str(Path(sys.executable).parent)],
        extra_env={"PODSHIM_RUN_DIR": str(run_dir)},
        log_level=log_level,
    )
    try:
        with lab:
            lab.ensure_pause()
            image = lab.ensure_busybox(namespace="k8s.io")
            yield Bench(lab, image, run_dir, tuple(columns))
    finally:
        unmount_under([run_dir])
        shutil.rmtree(run_dir, ignore_errors=True)


# -- which process is whose -----------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def column_of(argv: Sequence[str]) -> str:
    """The column a shim-like process belongs to, by its command line ("" if none).

    Scripts run by an interpreter show it first, so the first two words are looked at."""
    names = [os.path.basename(a) for a in argv[:2]]
    if "containerd-shim-runc-v2" in names:
        return "runc"
    if nullshim.BINARIES["node"] in names:
        return "null"
    if nullshim.BINARIES["pod"] in names:
        return "null-pod"
    podshim = PODSHIM_BINARY in names or "podshim.shim.main" in argv[:3]
    if podshim:
        return "node" if "-node" in argv or "--node" in argv else "pod"
    return ""


def pss_kib(pid: int) -> int:
    """Proportional set size (``smaps_rollup``), 0 once gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclass(frozen=True)
class Footprint:
    """The runtime processes of one column at one moment."""

    pss_kib: int
    processes: int
    #: comm -> count, for the report
    kinds: Mapping[str, int]


def footprint(lab: Containerd, column: str, workloads: set[int]) -> Footprint:
    """Sum the PSS of ``column``'s runtime processes (zombies and ``workloads`` left out;
    a workload pid that is itself a direct child of the subreaper is the do-nothing
    shim's daemon, which reports its own pid for every task, so it stays in)."""
    table = process_table()
    root = lab.subreaper_pid
    children: dict[int, list[int]] = {}
    for st in table.values():
        children.setdefault(st.ppid, []).append(st.pid)
    total = 0
    count = 0
    kinds: dict[str, int] = {}
    for top in children.get(root or -1, []):
        if top == lab.pid or column_of(_cmdline(top)) != column:
            continue
        todo = [top]
        while todo:
            pid = todo.pop()
            if pid in workloads and pid != top:
                continue  # a container's process (and its children)
            todo.extend(children.get(pid, []))
            st = table[pid]
            if st.state == "Z":
                continue
            total += pss_kib(pid)
            count += 1
            kinds[st.comm] = kinds.get(st.comm, 0) + 1
    return Footprint(total, count, kinds)
