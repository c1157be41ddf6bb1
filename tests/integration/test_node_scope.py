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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim.shim import paths as shim_paths
from podshim_lab import Containerd, RuntimeHandler, wait_for
from podshim_lab.cri.client import CriError
from podshim_lab.procfs import ProcStat, descendants, process_table, read_stat

if TYPE_CHECKING:
    from tests.integration.criprocs import alive, describe
    from tests.integration.criutil import (
        BIN_DIR,
        CRI_NAMESPACE,
        DEADLINE,
        PODSHIM_RUNTIME,
        CriLab,
        PodRecord,
        _need_busybox,
    )
else:
    from criprocs import alive, describe
    from criutil import (
        BIN_DIR,
        CRI_NAMESPACE,
        DEADLINE,
        PODSHIM_RUNTIME,
        CriLab,
        PodRecord,
        _need_busybox,
    )

NODE = "podshim-node"
SLEEP = ["sleep", "3600"]


class NodeLab(CriLab):
    """A :class:`CriLab` whose pods share the node daemon: a pod is gone when its own
    processes, pins, cgroups and state are, while the daemon may stay."""

    def __init__(self, lab: Containerd, runtime_root: Path, busybox: str, config: Path) -> None:
        super().__init__(lab, runtime_root, busybox)
        self.config = config

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

    def cleanup(self, pod_ids: Iterable[str] | None = None) -> list[str]:
        ids = list(self.pods) if pod_ids is None else pod_ids
        errors: list[str] = []
        for pod_id in ids:
            errors += self.stop_and_remove(pod_id)
        for pod_id in ids:
            try:
                self.wait_gone(pod_id)
            except AssertionError as exc:
                errors.append(str(exc))
                self.force_cleanup(pod_id)
        if self.lab.running:  # nothing but the (idle) daemon may remain
            daemons = {d.pid for d in self.daemons()}
            extra = [s for s in self.processes() if s.pid not in daemons]
            errors += [f"left process:\n{describe(extra)}"] if extra else []
        return errors


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeLab]:
    _need_busybox()
    home = tmp_path_factory.mktemp("podshim-node")
    config = home / "node.toml"
    lab = Containerd(
        cri=True,
        runtimes={NODE: RuntimeHandler(PODSHIM_RUNTIME, {"ConfigPath": str(config)})},
        extra_path=[BIN_DIR],
    )
    root = lab.state / "podshim-runc"
    config.write_text(f'shim_scope = "node"\nruntime_root = "{root}"\nlog_level = "debug"\n')
    crilab: NodeLab | None = None
    errors: list[str] = []
    try:
        lab.start()
        lab.ensure_pause()
        crilab = NodeLab(lab, root, lab.ensure_busybox(namespace=CRI_NAMESPACE), config)
        yield crilab
    finally:
        if crilab is not None:
            errors += crilab.cleanup()
            crilab.cri.close()
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
