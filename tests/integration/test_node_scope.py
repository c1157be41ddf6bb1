"""Node scope (``shim_scope = "node"``): one resident podshim daemon serves every pod of
a containerd, through CRI (handler ``podshim-node``) and ``ctr`` in another namespace.

Checked: all pods and namespaces land in one daemon; one pod's failure leaves the others
alone; the daemon outlives its pods and leaves with containerd; SIGKILL of the daemon
with 10 pods up reports every task exited, leaks nothing, and the next pod gets a fresh
daemon (containerd runs ``delete`` for every task the daemon served).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim import rundir
from podshim.shim import paths as shim_paths
from podshim_lab import Containerd, RuntimeHandler, wait_for
from podshim_lab.cri.client import CriError
from podshim_lab.procfs import ProcStat, descendants, process_table, read_stat

if TYPE_CHECKING:
    from tests.integration.criprocs import alive
    from tests.integration.criutil import (
        BIN_DIR,
        CRI_NAMESPACE,
        DEADLINE,
        PODSHIM_RUNTIME,
        CriLab,
        PodRecord,
        _need_busybox,
        own_cgroup_dirs,
    )
else:
    from criprocs import alive
    from criutil import (
        BIN_DIR,
        CRI_NAMESPACE,
        DEADLINE,
        PODSHIM_RUNTIME,
        CriLab,
        PodRecord,
        _need_busybox,
        own_cgroup_dirs,
    )

NODE = "podshim-node"
SLEEP = ["sleep", "3600"]
#: a node daemon holding nothing leaves after this long (the config's idle_exit_seconds)
IDLE = 2
#: the version an "upgraded" podshim reports (see :func:`shim_wrapper`)
NEW_VERSION = "99.0.0+upgrade"
WRAPPER = """#!/bin/sh
# podshim as installed, or an "upgraded" one while {flag} exists
if [ -e {flag} ]; then exec {upgraded} "$@"; fi
exec {real} "$@"
"""
UPGRADED = """#!{python}
import sys
import podshim
podshim.__version__ = "{version}"
sys.argv[0] = "{wrapper}"  # the daemon is spawned through the wrapper, as the shim is
from podshim.shim.main import main
sys.exit(main())
"""


def shim_wrapper(directory: Path) -> Path:
    """A shim binary for containerd's PATH that is today's podshim, or, while the
    returned flag file exists, the same code claiming a newer version (an upgrade).
    Both keep the shim's process name (the kernel takes it from the script's name)."""
    (directory / "new").mkdir(parents=True)
    flag = directory / "upgraded"
    wrapper = directory / "containerd-shim-podshim-v1"
    upgraded = directory / "new" / "containerd-shim-podshim-v1"
    real = Path(BIN_DIR) / "containerd-shim-podshim-v1"
    upgraded.write_text(UPGRADED.format(python=sys.executable, version=NEW_VERSION, wrapper=wrapper))
    wrapper.write_text(WRAPPER.format(flag=flag, upgraded=upgraded, real=real))
    for f in (wrapper, upgraded):
        f.chmod(0o755)
    return flag


class NodeLab(CriLab):
    """A :class:`CriLab` whose pods share the node daemon: a pod is gone when its own
    processes, pins, cgroups and state are, while the daemon may stay."""

    def __init__(self, lab: Containerd, runtime_root: Path, busybox: str, config: Path) -> None:
        super().__init__(lab, runtime_root, busybox)
        self.config = config
        self.upgrade_flag = Path()

    def daemons(self) -> list[ProcStat]:
        """Shim processes not forked by another (a pod's anchor is the daemon's fork)."""
        shims = {s.pid: s for s in self.processes() if s.comm.startswith("containerd-shim")}
        return [s for s in shims.values() if s.ppid not in shims]

    def remember(self, pod_id: str) -> None:
        """The pod's own processes: its sandbox pid, its containers and what is below
        them (the daemon and other pods' processes are not the pod's)."""
        rec = self.pods[pod_id]
        table = process_table()
        roots = []
        with contextlib.suppress(CriError, AssertionError):
            roots.append(self.sandbox_pid(pod_id))
        for cid in rec.containers:
            with contextlib.suppress(CriError):
                roots.append(self.cri.container_status(cid).pid)
        for pid in roots:
            if pid in table:
                for stat in [table[pid], *descendants(pid, table)]:
                    rec.procs.setdefault(stat.pid, stat)

    def leftovers(self, pod_id: str) -> list[str]:
        sock = self.shim_socket(pod_id)
        return [f for f in super().leftovers(pod_id) if sock not in f]

    def runtime_state(self, rec: PodRecord, task_id: str) -> Path:
        return self.podshim_runc_root / CRI_NAMESPACE / task_id

    def strays(self) -> list[ProcStat]:
        """All but containerd and the (idle) daemons, which may linger."""
        daemons = {d.pid for d in self.daemons()}
        return [s for s in self.processes() if s.pid not in daemons]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeLab]:
    _need_busybox()
    home = tmp_path_factory.mktemp("podshim-node")
    config = home / "node.toml"
    upgrade_flag = shim_wrapper(home / "bin")
    lab = Containerd(
        cri=True,
        runtimes={NODE: RuntimeHandler(PODSHIM_RUNTIME, {"ConfigPath": str(config)})},
        extra_path=[str(home / "bin"), BIN_DIR],
    )
    root = lab.state / "podshim-runc"
    config.write_text(
        f'shim_scope = "node"\nruntime_root = "{root}"\nlog_level = "debug"\n'
        f"idle_exit_seconds = {IDLE}\n"
    )
    crilab: NodeLab | None = None
    errors: list[str] = []
    homes = set(os.listdir(rundir.nodes_dir())) if os.path.isdir(rundir.nodes_dir()) else set()
    try:
        lab.start()
        lab.ensure_pause()
        crilab = NodeLab(lab, root, lab.ensure_busybox(namespace=CRI_NAMESPACE), config)
        crilab.upgrade_flag = upgrade_flag
        yield crilab
    finally:
        if crilab is not None:
            errors += crilab.cleanup()
            crilab.cri.close()
            try:  # holding nothing, every daemon leaves within IDLE s and takes its home
                wait_for(lambda: not crilab.daemons(), timeout=DEADLINE, interval=0.2,
                         message="the idle node daemons to exit")  # fmt: skip
            except AssertionError as exc:
                errors.append(str(exc))
            left = set(os.listdir(rundir.nodes_dir())) - homes
            errors += [f"node daemon home {h} left" for h in sorted(left)]
        try:
            lab.close()  # the daemon leaves with containerd (it holds no task by now)
        except Exception as exc:
            errors.append(f"close() failed: {exc}")
        errors += [f"{lab.paths.token}: {what}" for what in lab.leftovers()]
        assert not errors, "node lab teardown left things behind:\n" + "\n".join(errors)


@pytest.fixture
def cri(node: NodeLab) -> Iterator[NodeLab]:
    before = set(node.pods)
    try:
        yield node
    finally:
        mine = [p for p in node.pods if p not in before]
        errors = node.cleanup(mine) if node.lab.running else ["containerd is not running"]
        assert not errors, "test left things behind:\n" + "\n".join(errors)


def pod_with_sleep(cri: NodeLab, name: str) -> tuple[str, str]:
    pod_id, _ = cri.pod(name, NODE)
    cid = cri.create(pod_id, "c", SLEEP)
    cri.start(pod_id, cid)
    return pod_id, cid


def test_every_pod_and_namespace_is_served_by_one_daemon(cri: NodeLab) -> None:
    pods = [pod_with_sleep(cri, f"one-{i}") for i in range(3)]
    shims = {cri.shim_pid(pod_id) for pod_id, _ in pods}
    assert len(shims) == 1, f"pods are served by {shims}"
    (daemon,) = shims
    for _, cid in pods:
        assert cri.exec_ok(cid, "echo", "hi").strip() == "hi"
    # a plain container in another containerd namespace joins the same daemon
    image = cri.lab.ensure_busybox(namespace="other")
    ctr = functools.partial(cri.lab.ctr, namespace="other")
    ctr(
        "run", "-d", "--runtime", PODSHIM_RUNTIME, "--runtime-config-path", str(cri.config),
        image, "plain", "sleep", "3600",
    )  # fmt: skip
    try:
        pid = int(ctr("task", "ls").stdout.split("\n")[1].split()[1])
        stat = read_stat(pid)
        assert stat is not None and stat.ppid == daemon, f"ctr task {pid} is not the daemon's"
        assert {s.pid for s in cri.daemons()} == {daemon}
    finally:
        ctr("task", "kill", "-s", "KILL", "plain")
        wait_for(
            lambda: "STOPPED" in ctr("task", "ls").stdout,
            timeout=DEADLINE, interval=0.2, message="ctr task to stop",
        )  # fmt: skip
        ctr("task", "rm", "plain")
        ctr("container", "rm", "plain")
    # the daemon outlives its pods (it exits idle, or with containerd)
    for pod_id, _ in pods:
        assert not cri.stop_and_remove(pod_id)
        cri.wait_gone(pod_id)
    stat = read_stat(daemon)
    assert stat is not None and alive(stat) is not None, "the daemon left with its pods"


def test_a_failing_pod_leaves_the_others_alone(cri: NodeLab) -> None:
    good, good_cid = pod_with_sleep(cri, "good")
    bad, _ = cri.pod("bad", NODE)
    daemon = cri.shim_pid(good)
    bad_cid = cri.create(bad, "broken", ["/no/such/program"])
    with pytest.raises(CriError):
        cri.cri.start_container(bad_cid)
    assert cri.exec_ok(good_cid, "echo", "still").strip() == "still"
    assert cri.cri.container_status(good_cid).state == "RUNNING"
    assert cri.shim_pid(good) == daemon
    assert not cri.stop_and_remove(bad)
    cri.wait_gone(bad)
    assert cri.exec_ok(good_cid, "true") == ""


def test_daemon_killed_with_ten_pods_reports_every_task_exited(cri: NodeLab) -> None:
    pods = [pod_with_sleep(cri, f"kill-{i}") for i in range(10)]
    daemon = cri.shim_pid(pods[0][0])
    assert {cri.shim_pid(p) for p, _ in pods} == {daemon}
    os.kill(daemon, signal.SIGKILL)
    for pod_id, cid in pods:  # containerd runs `delete` for every task the daemon served
        cri.wait_container(cid, "EXITED")
        cri.wait_pod(pod_id, "NOTREADY")
    for pod_id, _ in pods:
        errors = cri.stop_and_remove(pod_id)
        assert not errors, errors
    for pod_id, _ in pods:
        cri.wait_gone(pod_id)
    # the next pod starts a fresh daemon
    pod_id, cid = pod_with_sleep(cri, "after")
    assert cri.shim_pid(pod_id) != daemon
    assert cri.exec_ok(cid, "echo", "fresh").strip() == "fresh"


def test_node_socket_is_one_per_containerd_not_per_pod(cri: NodeLab) -> None:
    pod_id, _ = pod_with_sleep(cri, "sock")
    address = (cri.bundle(pod_id) / "address").read_text().removeprefix("unix://")
    assert os.path.dirname(address) == os.path.dirname(cri.shim_socket(pod_id))
    assert address != shim_paths.socket_path(cri.lab.address, CRI_NAMESPACE, pod_id)


def test_the_daemon_is_charged_to_containerds_cgroup_not_a_pods(cri: NodeLab) -> None:
    pod_id, _ = pod_with_sleep(cri, "cg")
    daemon = cri.shim_pid(pod_id)
    assert cri.lab.pid is not None
    assert own_cgroup_dirs(daemon) == own_cgroup_dirs(cri.lab.pid)


def test_an_upgrade_sends_new_pods_to_a_new_daemon_and_the_old_one_drains(cri: NodeLab) -> None:
    old_pod, old_cid = pod_with_sleep(cri, "old")
    old = cri.shim_pid(old_pod)
    argv = Path(f"/proc/{old}/cmdline").read_bytes().decode().split("\0")
    old_home = Path(rundir.nodes_dir()) / argv[argv.index("-node") + 1]
    assert (old_home / "daemon.log").is_file()
    cri.upgrade_flag.touch()
    try:
        new_pod, new_cid = pod_with_sleep(cri, "new")
    finally:
        cri.upgrade_flag.unlink()
    new = cri.shim_pid(new_pod)
    assert new != old, "the upgraded podshim reused the old daemon"
    assert cri.exec_ok(old_cid, "echo", "old").strip() == "old"  # running pods untouched
    assert cri.exec_ok(new_cid, "echo", "new").strip() == "new"
    assert not cri.stop_and_remove(old_pod)
    cri.wait_gone(old_pod)
    # the old daemon holds nothing now: it leaves; the new one serves on
    wait_for(
        lambda: read_stat(old) is None or read_stat(old).state == "Z",  # type: ignore[union-attr]
        timeout=DEADLINE, interval=0.2, message="the old daemon to exit",
    )  # fmt: skip
    assert not old_home.exists(), "a cleanly exited daemon left its directory"
    assert cri.exec_ok(new_cid, "true") == ""


def test_one_pods_creates_do_not_hold_up_anothers_exec(cri: NodeLab) -> None:
    """Pod A creates and starts 10 containers while pod B's ExecSync is timed: the
    worst added latency is printed, and must stay far below any blocking wait."""
    _, b_cid = pod_with_sleep(cri, "quiet")
    busy, _ = cri.pod("busy", NODE)

    def exec_times(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            cri.exec_ok(b_cid, "true")
            out.append(time.perf_counter() - t)
        return out

    idle = exec_times(10)
    done = threading.Event()
    errors: list[BaseException] = []

    def create_ten() -> None:
        try:
            for i in range(10):
                cri.start(busy, cri.create(busy, f"c{i}", SLEEP))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=create_ten)
    worker.start()
    loaded: list[float] = []
    while not done.is_set():
        loaded += exec_times(1)
    worker.join()
    assert not errors, errors
    added = max(loaded) - statistics.median(idle)
    print(
        f"\nExecSync of pod B: idle p50 {statistics.median(idle) * 1e3:.1f} ms; while pod A "
        f"creates 10 containers p50 {statistics.median(loaded) * 1e3:.1f} ms, "
        f"max {max(loaded) * 1e3:.1f} ms (worst added {added * 1e3:.1f} ms, {len(loaded)} calls)"
    )
    assert added < 2.0, f"pod B's exec waited {added:.2f}s behind pod A's creates"
