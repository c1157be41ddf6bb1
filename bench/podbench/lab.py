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
sb         ``podshim-sb``         podshim, ``sandboxer = "shim"``: CRI drives the pod
                                  through the shim's ttrpc Sandbox service (2.x only)
proxy      ``podshim-proxy``      podshim, ``sandboxer`` = the proxy plugin served by the
                                  resident ``podshim daemon`` (Task v3, no process per
                                  pod; 2.x only; :mod:`podbench.proxy`)
vm         ``podshim-vm``         podshim, ``default_host = "uvm"``: one QEMU utility VM
                                  per pod, containers in the guest (needs ``podshim uvm
                                  prepare``); its footprint is the shim's plus QEMU's
=========  =====================  =====================================================

``containerd`` chooses the containerd build (``1.6``, the system package, by default;
``1.7`` or ``2.1`` unpacked by ``scripts/fetch_containerd.sh``, see
:mod:`podshim_lab.versions`): every column runs on that one. The ``sb`` handler has no
options table (containerd 2.1 copies a shim-sandboxed handler's options into runc's
Options and fails StartContainer for podshim's ``ConfigPath``): podshim's defaults apply
to it, ``--podshim-set`` does not reach it.

podshim keeps its host state in a private run directory (``PODSHIM_RUN_DIR``), so a
benchmark never meets another podshim user's sockets or pins.

A column's *runtime processes* are found below the lab's subreaper: each direct child
of the subreaper but containerd (a shim daemon, a zygote, a node daemon) is attributed
to a column by its command line, and its descendants with it (pause, podshim-init,
runc's short-lived helpers), minus the containers' own processes. ``pod`` and ``sb`` run
the same shim binary and share one zygote, so a pod-scope podshim process counts for
whichever of the two is measured (the memory ramp brings up one column's pods at a time).
The ``proxy`` column's daemon is not below the subreaper: it is found by its pid, with its
descendants (the pods' anchors and inits).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nullshim

from podbench.proxy import PLUGIN, ProxyDaemon
from podshim_lab import Containerd, RuntimeHandler
from podshim_lab.cleanup import unmount_under
from podshim_lab.procfs import process_table

COLUMNS = ("runc", "pod", "node", "null", "null-pod", "sb", "proxy", "vm")
DEFAULT_COLUMNS = ("runc", "pod", "node", "null")
#: the columns of containerd 2.x's Sandbox API (a ``sandboxer`` other than podsandbox)
V2_COLUMNS = ("sb", "proxy")
CONTAINERDS = ("1.6", "1.7", "2.1")
HANDLERS = {
    "runc": "runc",
    "pod": "podshim",
    "node": "podshim-node",
    "null": "null",
    "null-pod": "null-pod",
    "sb": "podshim-sb",
    "proxy": "podshim-proxy",
    "vm": "podshim-vm",
}
#: the column whose processes a column's own are counted as (same binary and zygote)
_SAME_PROCESSES = {"sb": "pod", "vm": "pod"}
#: columns whose containers run in a VM: their pids are the guest's, not this machine's
GUEST_PIDS = frozenset({"vm"})
PODSHIM_RUNTIME = "io.containerd.podshim.v1"
PODSHIM_BINARY = "containerd-shim-podshim-v1"


@dataclass
class Bench:
    """The running lab: containerd, the busybox image, podshim's run dir."""

    lab: Containerd
    image: str
    run_dir: Path
    columns: tuple[str, ...]
    #: the ``proxy`` column's daemon (``None`` without that column)
    daemon: ProxyDaemon | None = None

    def handler(self, column: str) -> str:
        return HANDLERS[column]

    def lab_version(self) -> str:
        """containerd's own version (``containerd --version``: ``2.1.9~ds1``, ...)."""
        try:
            res = subprocess.run([self.lab.containerd_bin, "--version"], capture_output=True,
                                 text=True, timeout=30, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return self.lab.build.version
        words = res.stdout.split()
        if len(words) < 3:
            return self.lab.build.version
        return words[2].lstrip("v").split("~")[0].split("+")[0]


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
    containerd: str = "1.6",
) -> Iterator[Bench]:
    """Start the private containerd with a handler per column; tear everything down.
    With the ``proxy`` column, ``podshim daemon`` runs from before containerd starts until
    after it stopped."""
    v2 = containerd.startswith("2.")
    if not v2 and any(c in V2_COLUMNS for c in columns):
        raise ValueError(f"columns {', '.join(V2_COLUMNS)} need containerd 2.x")
    run_dir = Path(tempfile.mkdtemp(prefix="psb-", dir="/run"))
    bin_dir = run_dir / "bin"
    nullshim.install(str(bin_dir))
    runtimes: dict[str, RuntimeHandler] = {}
    configs: dict[str, Path] = {}
    for column, scope in (("pod", "pod"), ("node", "node"), ("vm", "vm")):
        config = run_dir / f"podshim-{scope}.toml"
        table: dict[str, str | int | bool] = dict(podshim_settings)
        if scope == "node":
            table["shim_scope"] = "node"
        if scope == "vm":
            table["default_host"] = "uvm"
        config.write_text(f"# podshim, {scope} scope (bench)\n" + _toml(table))
        configs[column] = config
        runtimes[HANDLERS[column]] = RuntimeHandler(PODSHIM_RUNTIME, {"ConfigPath": str(config)})
    runtimes[HANDLERS["null"]] = RuntimeHandler(nullshim.RUNTIME_TYPES["node"])
    runtimes[HANDLERS["null-pod"]] = RuntimeHandler(nullshim.RUNTIME_TYPES["pod"])
    if v2:
        runtimes[HANDLERS["sb"]] = RuntimeHandler(PODSHIM_RUNTIME, sandboxer="shim")
    env = {"PODSHIM_RUN_DIR": str(run_dir)}
    daemon: ProxyDaemon | None = None
    socket_path = run_dir / "sandbox.sock"
    if "proxy" in columns:
        runtimes[HANDLERS["proxy"]] = RuntimeHandler(
            PODSHIM_RUNTIME, sandboxer=PLUGIN, proxy_address=str(socket_path)
        )
    lab = Containerd(
        cri=True,
        runtimes=runtimes,
        extra_path=[str(bin_dir), str(Path(sys.executable).parent)],
        extra_env=env,
        log_level=log_level,
        version=containerd,
    )
    if "proxy" in columns:  # the pod scope's config: the daemon's pods are pod-like
        daemon = ProxyDaemon(lab.address, socket_path, configs["pod"], run_dir / "daemon.log", env)
    try:
        if daemon is not None:
            daemon.start()
        with lab:
            lab.ensure_pause()
            image = lab.ensure_busybox(namespace="k8s.io")
            yield Bench(lab, image, run_dir, tuple(columns), daemon)
    finally:
        try:
            if daemon is not None:
                daemon.stop()
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
    #: comm -> PSS (KiB): where a column's memory goes (a VM pod's QEMU, its shim)
    pss_by_kind: Mapping[str, int] = field(default_factory=dict)


def footprint(bench: Bench, column: str, workloads: set[int]) -> Footprint:
    """Sum the PSS of ``column``'s runtime processes (zombies and ``workloads`` left out;
    a workload pid that is itself a direct child of the subreaper is the do-nothing
    shim's daemon, which reports its own pid for every task, so it stays in; a VM
    column's workload pids are the guest's: none is left out, QEMU counts)."""
    lab = bench.lab
    if column in GUEST_PIDS:
        workloads = set()
    table = process_table()
    root = lab.subreaper_pid
    children: dict[int, list[int]] = {}
    for st in table.values():
        children.setdefault(st.ppid, []).append(st.pid)
    same = _SAME_PROCESSES.get(column, column)
    tops = [
        top
        for top in children.get(root or -1, [])
        if top != lab.pid and column_of(_cmdline(top)) == same
    ]
    daemon = bench.daemon.pid if bench.daemon is not None else None
    if column == "proxy" and daemon is not None and daemon in table:
        tops.append(daemon)
    total = 0
    count = 0
    kinds: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for top in tops:
        todo = [top]
        while todo:
            pid = todo.pop()
            if pid in workloads and pid != top:
                continue  # a container's process (and its children)
            todo.extend(children.get(pid, []))
            st = table[pid]
            if st.state == "Z":
                continue
            kib = pss_kib(pid)
            total += kib
            count += 1
            kinds[st.comm] = kinds.get(st.comm, 0) + 1
            by_kind[st.comm] = by_kind.get(st.comm, 0) + kib
    return Footprint(total, count, kinds, by_kind)
