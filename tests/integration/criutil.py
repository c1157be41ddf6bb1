"""Helpers and fixtures for the CRI integration tests (``test_cri_*.py``).

One private containerd with the CRI plugin serves a whole test module; it has two
runtime handlers on the same instance:

* ``runc``: containerd's own ``io.containerd.runc.v2`` (the reference behaviour);
* ``podshim``: ``io.containerd.podshim.v1`` with ``ConfigPath`` naming a podshim TOML
  file that keeps runc's state below the lab's state dir.

The pause and busybox images are imported into ``k8s.io``. :class:`CriLab` creates pods
and containers through the CRI client of ``podshim_lab.cri`` and remembers everything that
belongs to them (processes with their start times, ids); the per-test fixture stops and
removes every pod the test made and asserts nothing of them is left (process, live or
zombie; mount or pin under ``/run/podshim/pods``; cgroup; shim socket; bundle; runtime
state), and that nothing but containerd is left below the lab's subreaper. The module
fixture finally closes the lab and asserts the lab left nothing either (CNI bridge
included).

Every wait is a poll with a generous deadline, never a fixed sleep, so the tests stay
deterministic on a loaded 2-core machine.

The /proc and cgroup helpers are in ``criprocs``, the ``ctr events`` subscription in
``crievents``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from podshim import rundir
from podshim.host.namespaces import cgroup
from podshim.shim import paths as shim_paths
from podshim_lab import Containerd, RuntimeHandler, wait_for
from podshim_lab.cleanup import cgroup_dirs, mounts_under, unmount_under
from podshim_lab.cri.client import (
    ContainerInfo,
    CriClient,
    CriError,
    ExecResult,
    PidMode,
    PodInfo,
    api,
    resources,
)
from podshim_lab.procfs import (
    ZYGOTE_COMM,
    ProcStat,
    descendants,
    process_table,
    read_stat,
    without_zygotes,
)

if TYPE_CHECKING:
    from tests.integration.criprocs import alive, describe
    from tests.integration.matrix import matrix_version
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    from criprocs import alive, describe
    from matrix import matrix_version

#: the two handlers every test can pick from
PODSHIM = "podshim"
RUNC = "runc"
PODSHIM_RUNTIME = "io.containerd.podshim.v1"
CRI_NAMESPACE = "k8s.io"
#: where the venv's console scripts (the shim binary) live
BIN_DIR = str(Path(sys.executable).parent)
TASK_DIR = "io.containerd.runtime.v2.task"
#: comm of the pod's PID-namespace init (exists only in shared-PID pods)
INIT_COMM = "podshim-init"
#: generous deadline for anything that should happen "soon" on a loaded 2-core box
DEADLINE = 60.0
#: ExecSync timeout (s) for the tests' tiny busybox commands
EXEC_TIMEOUT = 20
GIB = 1 << 30
MIB = 1 << 20


# -- the lab -----------------------------------------------------------------------------


@dataclass
class PodRecord:
    """Everything a test made for one pod, for the leftover checks."""

    id: str
    handler: str
    config: api.PodSandboxConfig
    containers: list[str] = field(default_factory=list)
    #: processes seen belonging to the pod (shim, anchor, init, containers), by pid
    procs: dict[int, ProcStat] = field(default_factory=dict)
    removed: bool = False

    @property
    def cgroup_parent(self) -> str:
        """Where CRI puts the pod's cgroups (containerd's default: ``/k8s.io``)."""
        return self.config.linux.cgroup_parent or f"/{CRI_NAMESPACE}"


class CriLab:
    """A CRI containerd with the ``runc`` and ``podshim`` handlers (see module doc)."""

    def __init__(self, lab: Containerd, podshim_runc_root: Path, busybox: str) -> None:
        self.lab = lab
        self.cri = CriClient(lab.address)
        self.busybox = busybox
        self.podshim_runc_root = podshim_runc_root
        self.pods: dict[str, PodRecord] = {}
        self._touches = 0

    # -- creating things -----------------------------------------------------------------
    def pod_config(self, name: str, **kwargs: Any) -> api.PodSandboxConfig:
        """A pod config with a unique name and uid (kwargs as CriClient.pod_config)."""
        token = secrets.token_hex(3)
        return self.cri.pod_config(f"{name}-{token}", "cri-tests", f"uid-{name}-{token}", **kwargs)

    def run_pod(self, config: api.PodSandboxConfig, handler: str) -> str:
        """RunPodSandbox, remembered for teardown; waits until READY."""
        pod_id = self.cri.run_pod_config(config, handler)
        rec = PodRecord(pod_id, handler, config)
        self.pods[pod_id] = rec
        self.remember(pod_id)
        info = self.cri.pod_status(pod_id)
        assert info.ready, f"pod {pod_id} is {info.state} right after RunPodSandbox"
        assert info.handler == handler
        return pod_id

    def pod(self, name: str, handler: str, **kwargs: Any) -> tuple[str, api.PodSandboxConfig]:
        """:meth:`pod_config` + :meth:`run_pod`."""
        config = self.pod_config(name, **kwargs)
        return self.run_pod(config, handler), config

    def create(
        self,
        pod_id: str,
        name: str,
        command: Sequence[str],
        attempt: int = 0,
        **kwargs: Any,
    ) -> str:
        """CreateContainer (busybox) in ``pod_id``; remembered for teardown."""
        rec = self.pods[pod_id]
        cid = self.cri.create_container(
            pod_id, rec.config, name, self.busybox, command, (), attempt, **kwargs
        )
        rec.containers.append(cid)
        return cid

    def container_config(
        self, pod_id: str, name: str, command: Sequence[str] = (), **kwargs: Any
    ) -> api.ContainerConfig:
        """A busybox ContainerConfig (kwargs as CriClient.container_config) whose namespace
        options are the pod's, as kubelet sends them; callers set any further field."""
        config = CriClient.container_config(name, self.busybox, command, **kwargs)
        ns = self.pods[pod_id].config.linux.security_context.namespace_options
        config.linux.security_context.namespace_options.CopyFrom(ns)
        return config

    def create_config(self, pod_id: str, config: api.ContainerConfig) -> str:
        """CreateContainer with a whole ContainerConfig; remembered for teardown."""
        rec = self.pods[pod_id]
        cid = self.cri.create_container_config(pod_id, rec.config, config)
        rec.containers.append(cid)
        return cid

    def start(self, pod_id: str, cid: str) -> ContainerInfo:
        """StartContainer and wait until CRI reports it RUNNING with a pid."""
        self.cri.start_container(cid)
        info = self.wait_container(cid, "RUNNING")
        assert info.pid > 0, f"container {cid}: no pid in verbose status"
        self.remember(pod_id)
        return info

    def container(
        self, pod_id: str, name: str, command: Sequence[str], attempt: int = 0, **kwargs: Any
    ) -> ContainerInfo:
        """:meth:`create` + :meth:`start`."""
        return self.start(pod_id, self.create(pod_id, name, command, attempt, **kwargs))

    def restart_containerd(self) -> None:
        """Restart containerd alone (shims keep running) and reconnect the CRI client."""
        self.lab.restart()
        self.cri.close()
        self.cri = CriClient(self.lab.address)

        def answers() -> bool:
            try:
                self.cri.version()
            except CriError:
                return False
            return True

        wait_for(answers, timeout=DEADLINE, interval=0.2, message="CRI after the restart")

    # -- observing -----------------------------------------------------------------------
    def wait_container(self, cid: str, state: str, timeout: float = DEADLINE) -> ContainerInfo:
        def check() -> ContainerInfo | None:
            info = self.cri.container_status(cid)
            return info if info.state == state else None

        return wait_for(
            check,
            timeout=timeout,
            interval=0.1,
            message=lambda: (
                f"container {cid} to be {state} "
                f"(is {self.cri.container_status(cid).state})\n{self.lab.log_tail(30)}"
            ),
        )

    def wait_pod(self, pod_id: str, state: str, timeout: float = DEADLINE) -> PodInfo:
        def check() -> PodInfo | None:
            info = self.cri.pod_status(pod_id)
            return info if info.state == state else None

        return wait_for(
            check,
            timeout=timeout,
            interval=0.1,
            message=lambda: (
                f"pod {pod_id} to be {state} "
                f"(is {self.cri.pod_status(pod_id).state})\n{self.lab.log_tail(30)}"
            ),
        )

    def touch_namespace(self) -> None:
        """Make containerd publish an event (/namespaces/update) without touching any
        task: relabel the ``k8s.io`` namespace."""
        self._touches += 1
        self.lab.ctr("namespaces", "label", CRI_NAMESPACE, f"podshim.test/touch={self._touches}")

    def exec(self, cid: str, *cmd: str, timeout: int = EXEC_TIMEOUT) -> ExecResult:
        """ExecSync; a failed call fails the test with containerd's log tail (CRI logs
        "Exec process ... exits" and then "Stream pipe ... done" once the exec's output
        FIFOs reached EOF)."""
        try:
            return self.cri.exec_sync(cid, cmd, timeout)
        except CriError as exc:
            raise AssertionError(
                f"exec {list(cmd)} in {cid}: {exc}\ncontainerd log:\n{self.lab.log_tail(25)}"
            ) from None

    def exec_ok(self, cid: str, *cmd: str, timeout: int = EXEC_TIMEOUT) -> str:
        """ExecSync that must exit 0; returns its stdout."""
        res = self.exec(cid, *cmd, timeout=timeout)
        assert res.exit_code == 0, f"exec {list(cmd)} in {cid}: {res}"
        return res.stdout

    def processes(self) -> list[ProcStat]:
        """Every process below the lab's subreaper except containerd and podshim's zygote
        (zombies too; the shims the zygote forked are in: see :meth:`zygotes`)."""
        pid = self.lab.subreaper_pid
        assert pid is not None
        me = self.lab.pid
        return [s for s in without_zygotes(descendants(pid)) if s.pid != me]

    def zygotes(self) -> list[ProcStat]:
        """podshim's zygote below the lab (one per containerd at most): not a pod's."""
        pid = self.lab.subreaper_pid
        assert pid is not None
        return [s for s in descendants(pid) if s.comm == ZYGOTE_COMM]

    def sandbox_pid(self, pod_id: str) -> int:
        pid = self.cri.pod_status(pod_id).pid
        assert pid > 0, f"pod {pod_id}: no sandbox pid in verbose status"
        return pid

    def shim_pid(self, pod_id: str) -> int:
        """The pod's shim: the parent of the sandbox pid (anchor zombie or pause)."""
        stat = read_stat(self.sandbox_pid(pod_id))
        assert stat is not None, f"pod {pod_id}: sandbox pid is gone"
        shim = read_stat(stat.ppid)
        assert shim is not None and shim.comm.startswith("containerd-shim"), (
            f"pod {pod_id}: parent of sandbox pid {stat.pid} is not a shim:\n"
            + describe([s for s in (stat, shim) if s is not None])
        )
        return shim.pid

    def inits(self) -> list[ProcStat]:
        """``podshim-init`` processes below the lab (live or zombie)."""
        return [s for s in self.processes() if s.comm == INIT_COMM]

    def remember(self, pod_id: str) -> None:
        """Record the pod's shim and every process below it (for the leftover checks)."""
        rec = self.pods[pod_id]
        with contextlib.suppress(CriError, AssertionError):
            shim = self.shim_pid(pod_id)
            table = process_table()
            for stat in [table[shim], *descendants(shim, table)] if shim in table else []:
                rec.procs.setdefault(stat.pid, stat)
        for cid in rec.containers:
            with contextlib.suppress(CriError):
                pid = self.cri.container_status(cid).pid
                cstat = read_stat(pid) if pid else None
                if cstat is not None:
                    rec.procs.setdefault(pid, cstat)

    # -- tearing down ----------------------------------------------------------------------
    def pins(self, pod_id: str) -> Path:
        """podshim's state of the pod (namespace pins): per containerd instance."""
        return Path(rundir.pods_dir(self.lab.address)) / CRI_NAMESPACE / pod_id

    def shim_socket(self, pod_id: str) -> str:
        return shim_paths.socket_path(self.lab.address, CRI_NAMESPACE, pod_id)

    def bundle(self, task_id: str) -> Path:
        return self.lab.state / TASK_DIR / CRI_NAMESPACE / task_id

    def runtime_state(self, rec: PodRecord, task_id: str) -> Path:
        root = self.podshim_runc_root if rec.handler == PODSHIM else self.lab.runc_root
        return root / CRI_NAMESPACE / task_id

    def leftovers(self, pod_id: str) -> list[str]:
        """What of the pod still exists (``[]`` once it is completely gone)."""
        rec = self.pods[pod_id]
        found: list[str] = []
        for stat in rec.procs.values():
            now = alive(stat)
            if now is not None:
                found.append(f"process {now.pid} ({now.comm}) state {now.state}")
        pins = self.pins(pod_id)
        found += [f"mount {m}" for m in mounts_under([pins])]
        if os.path.lexists(pins):
            found.append(f"pin dir {pins}: {sorted(os.listdir(pins)) if pins.is_dir() else ''}")
        if rec.handler == PODSHIM and os.path.lexists(self.shim_socket(pod_id)):
            found.append(f"shim socket {self.shim_socket(pod_id)}")
        for task_id in (pod_id, *rec.containers):
            found += [
                f"cgroup {d}" for d in self.task_cgroup_dirs(rec, task_id) if os.path.isdir(d)
            ]
            for path in (self.bundle(task_id), self.runtime_state(rec, task_id)):
                if os.path.lexists(path):
                    found.append(f"left {path}")
        return found

    def task_cgroup_dirs(self, rec: PodRecord, task_id: str) -> list[str]:
        """Where a task of the pod has its cgroup in each hierarchy, by the rule of
        runc's cgroupfs driver: CRI turns a ``.slice`` parent into the relative
        ``<last element>:cri-containerd:<id>``, below the cgroup of the runtime's caller
        (the shim, in containerd's cgroup); any other parent is ``<parent>/<id>``."""
        parent = rec.cgroup_parent
        last = parent.rstrip("/").rsplit("/", 1)[-1]
        if not last.endswith(".slice"):
            return [str(d) for d in cgroup_dirs(f"{parent}/{task_id}")]
        rel = f"{last}:cri-containerd:{task_id}"
        assert self.lab.pid is not None
        return [
            os.path.join(mount, own.lstrip("/"), rel)
            for mount, own in own_cgroup_dirs(self.lab.pid).items()
        ]

    def wait_gone(self, pod_id: str, timeout: float = DEADLINE) -> None:
        """Poll until :meth:`leftovers` is empty; fail listing what is left."""
        wait_for(
            lambda: not self.leftovers(pod_id),
            timeout=timeout,
            interval=0.2,
            message=lambda: (
                f"pod {pod_id} to be gone; left: {self.leftovers(pod_id)}\n{self.lab.log_tail(40)}"
            ),
        )

    def stop_and_remove(self, pod_id: str) -> list[str]:
        """StopPodSandbox + RemovePodSandbox (tolerating a pod CRI no longer knows);
        returns the errors."""
        rec = self.pods[pod_id]
        errors: list[str] = []
        if rec.removed:
            return errors
        self.remember(pod_id)
        for step in (self.cri.stop_pod, self.cri.remove_pod):
            try:
                step(pod_id)
            except CriError as exc:
                if exc.code != "NOT_FOUND":
                    errors.append(f"pod {pod_id}: {exc}")
        rec.removed = not errors
        return errors

    def force_cleanup(self, pod_id: str) -> None:
        """Last resort after a failed check: kill, unmount and rmdir what the pod left,
        so one failure does not cascade into the next test."""
        rec = self.pods[pod_id]
        for stat in rec.procs.values():
            if alive(stat) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stat.pid, signal.SIGKILL)
        pins = self.pins(pod_id)
        unmount_under([pins])
        with contextlib.suppress(OSError):
            for entry in pins.iterdir():
                entry.unlink()
        with contextlib.suppress(OSError):
            pins.rmdir()
        with contextlib.suppress(OSError):
            os.unlink(self.shim_socket(pod_id))

    def cleanup(self, pod_ids: Iterable[str] | None = None) -> list[str]:
        """Stop and remove the pods, wait until nothing of them is left; return errors.

        Also checks that no process but containerd is left below the lab's subreaper.
        """
        ids = list(self.pods) if pod_ids is None else list(pod_ids)
        errors: list[str] = []
        for pod_id in ids:
            errors += self.stop_and_remove(pod_id)
        for pod_id in ids:
            try:
                self.wait_gone(pod_id)
            except AssertionError as exc:
                errors.append(str(exc))
                self.force_cleanup(pod_id)
        if self.lab.running:
            try:
                wait_for(
                    lambda: not self.strays(),
                    timeout=DEADLINE,
                    interval=0.2,
                    message=lambda: (
                        "no process but containerd below the lab:\n" + describe(self.strays())
                    ),
                )
            except AssertionError as exc:
                errors.append(str(exc))
                for stat in self.strays():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(stat.pid, signal.SIGKILL)
        return errors

    def strays(self) -> list[ProcStat]:
        """Processes that must be gone once every pod is: all but containerd."""
        return self.processes()


def own_cgroup_dirs(pid: int) -> dict[str, str]:
    """The cgroup of ``pid`` per mounted hierarchy: {mount point: path in it}."""
    own = cgroup.own_cgroups(f"/proc/{pid}/cgroup")
    out = {}
    for h in cgroup.hierarchies():
        key = cgroup.hierarchy_key(h)
        if key in own:
            out[h.mountpoint] = own[key]
    return out


def podshim_config(path: Path, runtime_root: Path) -> Path:
    """Write the podshim TOML config the ``podshim`` handler's ConfigPath names."""
    path.write_text(f'runtime_root = "{runtime_root}"\nlog_level = "debug"\n')
    return path


def open_cri_lab(
    config_dir: Path, bin_dir: str = BIN_DIR, shim_pythonpath: bool = True, **lab_kwargs: Any
) -> tuple[Containerd, CriLab]:
    """Start the two-handler CRI containerd with pause + busybox in ``k8s.io``; podshim's
    shim binary is found in ``bin_dir`` (this venv's by default); ``lab_kwargs`` go to
    :class:`Containerd` (e.g. ``cni_portmap=True``)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    config = config_dir / "podshim.toml"
    lab_kwargs.setdefault("version", matrix_version())
    lab = Containerd(
        cri=True,
        runtimes={PODSHIM: RuntimeHandler(PODSHIM_RUNTIME, {"ConfigPath": str(config)})},
        extra_path=[bin_dir],
        shim_pythonpath=shim_pythonpath,
        **lab_kwargs,
    )
    runtime_root = lab.state / "podshim-runc"
    podshim_config(config, runtime_root)
    try:
        lab.start()
        lab.ensure_pause()
        busybox = lab.ensure_busybox(namespace=CRI_NAMESPACE)
    except BaseException:
        with contextlib.suppress(Exception):
            lab.close()
        raise
    return lab, CriLab(lab, runtime_root, busybox)


def close_cri_lab(lab: Containerd, crilab: CriLab | None) -> list[str]:
    """Remove every pod, close the lab; return what was left behind."""
    errors: list[str] = []
    if crilab is not None:
        try:
            errors += crilab.cleanup()
        finally:
            crilab.cri.close()
    try:
        lab.close()
    except Exception as exc:
        errors.append(f"close() failed: {exc}")
    errors += [f"{lab.paths.token}: {what}" for what in lab.leftovers()]
    if crilab is not None:
        for pod_id in crilab.pods:
            pins = crilab.pins(pod_id)
            errors += [f"mount {m}" for m in mounts_under([pins])]
            if os.path.lexists(pins):
                errors.append(f"pin dir {pins}")
    # podshim's per-instance state directory of this containerd: empty dirs only left
    instance = Path(rundir.pods_dir(lab.address))
    for d in (instance / CRI_NAMESPACE, instance):
        with contextlib.suppress(FileNotFoundError):
            try:
                d.rmdir()
            except OSError as exc:
                errors.append(f"podshim state {d}: {exc.strerror}: {sorted(os.listdir(d))}")
    return errors


def _need_busybox() -> None:
    if not any(Path(p).is_file() for p in ("/bin/busybox", "/usr/bin/busybox")):
        pytest.skip("busybox not installed (apt-get install busybox-static)")


@pytest.fixture(scope="module")
def cri_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriLab]:
    """The module's CRI containerd (runc + podshim handlers); torn down and checked
    after the module's last test."""
    _need_busybox()
    lab, crilab = open_cri_lab(tmp_path_factory.mktemp("podshim-cri"))
    try:
        yield crilab
    finally:
        errors = close_cri_lab(lab, crilab)
        assert not errors, "CRI lab teardown left things behind:\n" + "\n".join(errors)


@pytest.fixture
def cri(cri_lab: CriLab) -> Iterator[CriLab]:
    """The module's :class:`CriLab`; every pod the test made is stopped, removed and
    checked to be completely gone afterwards."""
    before = set(cri_lab.pods)
    try:
        yield cri_lab
    finally:
        mine = [p for p in cri_lab.pods if p not in before]
        errors = cri_lab.cleanup(mine) if cri_lab.lab.running else ["containerd is not running"]
        assert not errors, "test left things behind:\n" + "\n".join(errors)


__all__ = [
    "CRI_NAMESPACE",
    "DEADLINE",
    "GIB",
    "INIT_COMM",
    "MIB",
    "PODSHIM",
    "RUNC",
    "ContainerInfo",
    "CriError",
    "CriLab",
    "PidMode",
    "PodRecord",
    "cri",
    "cri_lab",
    "resources",
]
