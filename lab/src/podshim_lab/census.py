"""What a private containerd with podshim pods holds right now, for leak checks.

A :class:`PodshimLab` is a CRI containerd (:class:`~podshim_lab.containerd.Containerd`)
whose ``podshim`` handler keeps *all* of podshim's host state in a private run directory
(``PODSHIM_RUN_DIR`` in containerd's environment, so in every shim's): shim sockets, the
diag registry, the pods' namespace pins and the OCI runtime's root. Nothing else on the
machine writes there, so after every pod is gone each of those directories must be empty;
the census says what is not (:func:`snapshot`).

:func:`snapshot` lists, for pods the caller tracked (ids and network namespace paths):
processes below the lab's subreaper other than containerd (zombies included), files in
the private run directory (sockets, registry entries, pins, runtime state), mounts below
it and the lab's own directories, network namespace mounts of the pods, task bundles in
containerd's state, and the pods' and containers' cgroups.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podshim import mountinfo
from podshim.rundir import instance_key
from podshim.shim.zygote import zygote_name
from podshim_lab.cleanup import cgroup_dirs, is_under, unmount_under
from podshim_lab.config import RuntimeHandler
from podshim_lab.containerd import Containerd
from podshim_lab.procfs import ZYGOTE_COMM, ProcStat, descendants, read_stat, without_zygotes

__all__ = [
    "PODSHIM",
    "PodshimLab",
    "fd_count",
    "netns_paths",
    "pss_kib",
    "shim_of",
    "snapshot",
]

PODSHIM = "podshim"
PODSHIM_RUNTIME = "io.containerd.podshim.v1"
CRI_NAMESPACE = "k8s.io"
TASK_DIR = "io.containerd.runtime.v2.task"


def fd_count(pid: int) -> int:
    """Open fds of ``pid`` (-1 once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (``smaps_rollup``; -1 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def uss_kib(pid: int) -> int:
    """Private memory of ``pid`` in KiB (Private_Clean + Private_Dirty of ``smaps_rollup``;
    -1 once it is gone). Unlike PSS it does not move when other processes that share
    pages with ``pid`` come or go, so it shows a process's own growth."""
    try:
        fields = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            if line.startswith("Private_")
        )
        return sum(int(v.split()[0]) for v in fields.values())
    except (OSError, ValueError):
        return -1


def shim_of(sandbox_pid: int) -> ProcStat | None:
    """The shim serving a pod: the parent of its sandbox pid (the anchor)."""
    stat = read_stat(sandbox_pid)
    parent = read_stat(stat.ppid) if stat is not None else None
    if parent is None or not parent.comm.startswith("containerd-shim"):
        return None
    return parent


@dataclass
class PodshimLab:
    """A CRI containerd whose ``podshim`` handler keeps its state in a private run dir.

    ``config`` adds keys to podshim's TOML config (e.g. ``runtime`` naming a gate);
    ``extra_env`` and ``extra_path`` go to containerd (and so to the shims). With
    ``run_dir_size`` (e.g. ``"16m"``) the run dir is a tmpfs of that size, so a test can
    fill it (:meth:`fill_run_dir`).
    """

    config: Mapping[str, str | bool] = field(default_factory=dict)
    extra_env: Mapping[str, str] = field(default_factory=dict)
    extra_path: list[str] = field(default_factory=list)
    log_level: str = "info"
    containerd_bin: str = "containerd"
    bin_dir: str = ""
    run_dir_size: str = ""
    lab: Containerd = field(init=False)
    run_dir: Path = field(init=False)
    busybox: str = field(init=False, default="")

    def __post_init__(self) -> None:
        import sys

        self.run_dir = Path("/run") / f"psl-run-{secrets.token_hex(4)}"
        env = {"PODSHIM_RUN_DIR": str(self.run_dir), **self.extra_env}
        bin_dir = self.bin_dir or str(Path(sys.executable).parent)
        self.lab = Containerd(
            cri=True,
            runtimes={
                PODSHIM: RuntimeHandler(PODSHIM_RUNTIME, {"ConfigPath": str(self.config_path)})
            },
            extra_path=[*self.extra_path, bin_dir],
            extra_env=env,
            log_level=self.log_level,
            containerd_bin=self.containerd_bin,
        )

    @property
    def config_path(self) -> Path:
        return self.run_dir / "podshim.toml"

    @property
    def runtime_root(self) -> Path:
        return self.run_dir / "runc"

    @property
    def pods_dir(self) -> Path:
        return self.run_dir / "pods" / instance_key(self.lab.address)

    def write_config(self, **changes: str | bool) -> None:
        """(Re)write podshim's TOML config: ``runtime_root`` in the run dir, plus
        :attr:`config` and ``changes``."""
        table: dict[str, str | bool] = {"runtime_root": str(self.runtime_root)}
        table.update(self.config)
        table.update(changes)
        lines = []
        for key, value in table.items():
            text = ("true" if value else "false") if isinstance(value, bool) else f'"{value}"'
            lines.append(f"{key} = {text}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> PodshimLab:
        self.run_dir.mkdir(mode=0o711)
        try:
            if self.run_dir_size:
                subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", f"size={self.run_dir_size},mode=0711",
                     "psl-run", str(self.run_dir)],
                    check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                )  # fmt: skip
            self.write_config()
            self.lab.start()
            self.lab.ensure_pause()
            self.busybox = self.lab.ensure_busybox(namespace=CRI_NAMESPACE)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> list[str]:
        """Close the lab, then remove the run dir; returns what was left behind (of the
        lab and in the run dir: the run dir is force-cleaned afterwards either way)."""
        errors: list[str] = []
        try:
            self.lab.close()
        except Exception as exc:
            errors.append(f"close() failed: {exc}")
        errors += [f"{self.lab.paths.token}: {what}" for what in self.lab.leftovers()]
        errors += [f"run dir: {what}" for what in run_dir_leftovers(self.run_dir)]
        if self.run_dir.exists():
            unmount_under([self.run_dir])
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return errors

    @property
    def filler(self) -> Path:
        return self.run_dir / "filler"

    def fill_run_dir(self) -> int:
        """Write :attr:`filler` until the run dir's file system is full; its size."""
        chunk = b"\0" * (64 << 10)
        written = 0
        with open(self.filler, "wb", buffering=0) as f:
            while True:
                try:
                    written += f.write(chunk) or 0
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        return written

    def free_run_dir(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def processes(self) -> list[ProcStat]:
        """Every process below the lab's subreaper except containerd and podshim's zygote
        (zombies too; the shims the zygote forked are in)."""
        sub = self.lab.subreaper_pid
        if sub is None:
            return []
        me = self.lab.pid
        return [s for s in without_zygotes(descendants(sub)) if s.pid != me]

    def zygote_files(self) -> list[str]:
        """The socket of this containerd's zygote while one runs (it is no pod's)."""
        sub = self.lab.subreaper_pid
        if sub is None or not any(s.comm == ZYGOTE_COMM for s in descendants(sub)):
            return []
        return [str(self.run_dir / "z" / zygote_name(self.lab.address))]


def run_dir_leftovers(run_dir: Path) -> list[str]:
    """Files (not directories) and mounts below ``run_dir``, but the config file (and
    the filler and the tmpfs of :meth:`PodshimLab.fill_run_dir`)."""
    found: list[str] = []
    if run_dir.is_dir():
        for root, _dirs, files in os.walk(run_dir):
            for name in files:
                path = os.path.join(root, name)
                if path not in (str(run_dir / "podshim.toml"), str(run_dir / "filler")):
                    found.append(f"file {path}")
    found += [
        f"mount {m.mountpoint}"
        for m in mountinfo.read()
        if is_under(m.mountpoint, [run_dir]) and m.mountpoint != str(run_dir)  # its tmpfs
    ]
    return found


def netns_paths(info: Mapping[str, Any]) -> list[str]:
    """The network namespace path(s) in a pod's verbose status ``info``."""
    spec = info.get("runtimeSpec") or {}
    linux = spec.get("linux") or {} if isinstance(spec, dict) else {}
    nss = linux.get("namespaces") or [] if isinstance(linux, dict) else []
    return [
        str(n["path"])
        for n in nss
        if isinstance(n, dict) and n.get("type") == "network" and n.get("path")
    ]


def snapshot(plab: PodshimLab, ids: Iterable[str] = (), netns: Iterable[str] = ()) -> set[str]:
    """Everything of the lab's pods that exists now (see the module docstring), one
    string per thing: compare two snapshots, or expect an empty one once every pod is
    gone. ``ids`` (pods and containers) and ``netns`` (their network namespace paths)
    name what the caller made."""
    lab = plab.lab
    found: set[str] = set()
    for stat in plab.processes():
        zombie = " zombie" if stat.state == "Z" else ""
        found.add(f"process {stat.pid} ({stat.comm}){zombie} started {stat.starttime}")
    found |= set(run_dir_leftovers(plab.run_dir)) - {f"file {f}" for f in plab.zygote_files()}
    owned = [str(d) for d in lab.paths.owned_dirs()]
    mounts = mountinfo.read()
    found |= {f"mount {m.mountpoint}" for m in mounts if is_under(m.mountpoint, owned)}
    mounted = {m.mountpoint for m in mounts}
    found |= {f"netns mount {p}" for p in netns if p in mounted}
    found |= {f"netns file {p}" for p in netns if os.path.lexists(p)}
    with contextlib.suppress(FileNotFoundError):
        found |= {f"bundle {e.path}" for e in os.scandir(lab.state / TASK_DIR / CRI_NAMESPACE)}
    for i in ids:
        found |= {f"cgroup {d}" for d in cgroup_dirs(f"{CRI_NAMESPACE}/{i}")}
    return found
