"""Kubernetes pods on podshim, driven through containerd's CRI like kubelet would.

One private containerd (``criutil.cri_lab``) with two handlers, ``runc`` (the
reference) and ``podshim``. Every test stops and removes its pods and the fixture
asserts nothing of them is left. podshim's pod design (``src/podshim/pod``): no pause
process; the sandbox pid CRI sees is a zombie "anchor" child of the shim; the pod's IPC
and UTS namespaces are pinned under ``/run/podshim/pods/<ns>/<pod>``; a PID-namespace
init ``podshim-init`` exists only while a container shares the pod's PID namespace.

Every wait is a poll with a generous deadline, never a fixed sleep.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from podshim_lab import wait_for
from podshim_lab.cleanup import cgroup_dirs, mounts_under, remove_cgroup
from podshim_lab.procfs import descendants, process_table, read_stat

if TYPE_CHECKING:
    from tests.integration import crievents as ce
    from tests.integration import criprocs as cp
    from tests.integration import criutil as cu
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import crievents as ce
    import criprocs as cp
    import criutil as cu

# the fixtures: one CRI containerd per module, per-test cleanup checks
cri_lab = cu.cri_lab
cri = cu.cri

SYSCTLS = {"net.ipv4.ip_unprivileged_port_start": "900", "kernel.shmmni": "3000"}
SERVER = "mkdir -p /tmp/www && echo podshim-ok > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _wait_procs(cri: cu.CriLab, check: Callable[[], list[str]], what: str) -> None:
    """Poll ``check()`` (returns a list of problems) until it returns none."""
    wait_for(
        lambda: not check(),
        timeout=cu.DEADLINE,
        interval=0.2,
        message=lambda: (
            f"{what}: {check()}\nprocesses below the lab:\n" + cp.describe(cri.processes())
        ),
    )


# -- a bridge-network pod --------------------------------------------------------------


@pytest.mark.parametrize("handler", [cu.PODSHIM, cu.RUNC])
def test_bridge_pod_two_containers(cri: cu.CriLab, handler: str) -> None:
    hostname = _unique("web")
    pod, _ = cri.pod("bridge", handler, hostname=hostname, sysctls=SYSCTLS)
    server = cri.container(pod, "server", ["sh", "-c", SERVER])
    client = cri.container(pod, "client", ["sleep", "3600"])
    status = cri.cri.pod_status(pod)
    assert status.ready and status.ip, f"pod status: {status.raw}"

    # shared IPC, UTS and network namespaces, none of them the host's
    for kind in ("ipc", "uts", "net"):
        assert cp.ns_of(server.pid, kind) == cp.ns_of(client.pid, kind), kind
        assert cp.ns_of(server.pid, kind) != cp.host_ns(kind), kind
    # own PID namespaces (pid mode CONTAINER)
    assert cp.ns_of(server.pid, "pid") != cp.ns_of(client.pid, "pid")

    for cid in (server.id, client.id):
        assert cri.exec_ok(cid, "hostname").strip() == hostname
        eth0 = cri.exec_ok(cid, "ip", "addr", "show", "dev", "eth0")
        assert f"inet {status.ip}/" in eth0, eth0
        for key, value in SYSCTLS.items():
            proc = "/proc/sys/" + key.replace(".", "/")
            assert cri.exec_ok(cid, "cat", proc).strip() == value, key

    # the client reaches the server on localhost
    def fetched() -> bool:
        # (busybox 1.35's wget -q crashes here: keep it verbose, the body is on stdout)
        res = cri.exec(client.id, "wget", "-O", "-", "http://127.0.0.1:8080/")
        return res.exit_code == 0 and res.stdout.strip() == "podshim-ok"

    wait_for(fetched, timeout=cu.DEADLINE, interval=0.2, message="wget from the client container")

    if handler != cu.PODSHIM:
        return
    # The only processes: the shim, the containers' own, and the anchor zombie.
    anchor = status.pid
    shim = cri.shim_pid(pod)

    def problems() -> list[str]:
        table = process_table()
        found: list[str] = []
        stat = table.get(anchor)
        if stat is None or stat.state != "Z" or stat.ppid != shim:
            found.append(f"sandbox pid {anchor} is not a zombie child of the shim: {stat}")
        kids = {s.pid for s in cp.children(shim, table)}
        if kids != {anchor, server.pid, client.pid}:
            found.append(f"shim children {sorted(kids)} != anchor+containers")
        pod_procs = {shim} | {s.pid for s in descendants(shim, table)}
        others = [s for s in cri.processes() if s.pid not in pod_procs]
        if others:
            found.append(f"processes outside the pod's shim: {others}")
        inits = [s for s in descendants(shim, table) if s.comm == cu.INIT_COMM]
        if inits:
            found.append(f"{cu.INIT_COMM} without a shared PID namespace: {inits}")
        return found

    _wait_procs(cri, problems, "shim + containers + anchor only")
    # the zombie anchor resolves to no namespace at all
    for kind in ("net", "ipc", "uts"):
        assert not os.path.exists(f"/proc/{anchor}/ns/{kind}")


# -- a shared-PID pod -------------------------------------------------------------------


def test_shared_pid_namespace(cri: cu.CriLab) -> None:
    pod, _ = cri.pod("sharedpid", cu.PODSHIM, hostname=_unique("spid"), pid_mode="POD")
    one = cri.container(pod, "one", ["sleep", "3601"])
    two = cri.container(pod, "two", ["sleep", "3602"])

    inits = wait_for(
        lambda: cri.inits() or None, timeout=cu.DEADLINE, message=f"a {cu.INIT_COMM} process"
    )
    assert len(inits) == 1, cp.describe(inits)
    init = inits[0]
    assert init.state != "Z", cp.describe(inits)
    assert cp.ns_of(init.pid, "pid") == cp.ns_of(one.pid, "pid") == cp.ns_of(two.pid, "pid")
    assert cp.ns_of(one.pid, "pid") != cp.host_ns("pid")
    # the init lives in the sandbox cgroup
    assert cp.cgroup_of(init.pid, "memory") == f"/k8s.io/{pod}"

    assert "sleep 3602" in cri.exec_ok(one.id, "ps")
    # PID 1 looks like pause: a short fixed command line, nothing of the host's paths
    assert cri.exec_ok(one.id, "cat", "/proc/1/cmdline").rstrip("\0") == "podshim-init"
    assert "sleep 3601" in cri.exec_ok(two.id, "ps")
    # PID 1 of the pod shows nothing of the host
    res = cri.exec(one.id, "ls", "-A", "/proc/1/root/")
    assert res.exit_code != 0 or res.stdout.strip() == "", res
    # still exactly one init
    assert len(cri.inits()) == 1, cp.describe(cri.inits())


# -- a host-network pod ------------------------------------------------------------------


@pytest.mark.parametrize("handler", [cu.PODSHIM, cu.RUNC])
def test_host_network_pod(cri: cu.CriLab, handler: str) -> None:
    pod, _ = cri.pod("hostnet", handler, host_network=True, hostname="")
    c = cri.container(pod, "c", ["sleep", "3600"])
    assert cp.ns_of(c.pid, "net") == cp.host_ns("net")
    # no UTS namespace of its own either: the host's hostname
    assert cp.ns_of(c.pid, "uts") == cp.host_ns("uts")
    assert cri.exec_ok(c.id, "hostname").strip() == socket.gethostname()
    assert cp.ns_of(c.pid, "ipc") != cp.host_ns("ipc")


# -- namespaces of a pid outside the pod -------------------------------------------------


def test_foreign_namespaces_refused(cri: cu.CriLab) -> None:
    pod_a, _ = cri.pod("victim", cu.PODSHIM, hostname=_unique("a"))
    victim = cri.container(pod_a, "victim", ["sleep", "3600"])
    pod_b, _ = cri.pod("intruder", cu.PODSHIM, hostname=_unique("b"))
    cri.container(pod_b, "resident", ["sleep", "3600"])
    before = {(s.pid, s.starttime) for s in cri.processes()}

    # Through CRI: pid mode TARGET naming a container of ANOTHER pod. containerd 1.6
    # refuses it itself (validateTargetContainer), before any shim sees a spec.
    with pytest.raises(cu.CriError) as info:
        cri.create(pod_b, "target", ["sleep", "3600"], pid_mode="TARGET", target_id=victim.id)
    assert victim.id in info.value.details, info.value

    # Straight to pod B's shim (what a spec naming a foreign /proc/<pid>/ns path looks
    # like when it does reach podshim): the CRI annotations group the task into pod B's
    # shim, whose namespace rewrite must refuse it.
    for kind, file in (("pid", "pid"), ("network", "net")):
        name = _unique(f"foreign-{kind}")
        res = cri.lab.ctr(
            "run",
            "--rm",
            "--runtime",
            "io.containerd.podshim.v1",
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
            f"io.kubernetes.cri.sandbox-id={pod_b}",
            "--with-ns",
            f"{kind}:/proc/{victim.pid}/ns/{file}",
            cri.busybox,
            name,
            "sleep",
            "3600",
            namespace="k8s.io",
            check=False,
        )
        assert res.returncode != 0, f"{kind}: ctr run succeeded: {res.stdout}"
        assert "namespace" in res.stderr and f"/proc/{victim.pid}/ns/{file}" in res.stderr, (
            res.stderr
        )
        assert name not in cri.lab.ctr("containers", "ls", "-q", namespace="k8s.io").stdout
        assert not cri.bundle(name).exists()

    def extra() -> list[str]:
        now = cri.processes()
        return [f"{s.pid} ({s.comm})" for s in now if (s.pid, s.starttime) not in before]

    _wait_procs(cri, extra, "no new process")
    assert read_stat(victim.pid) is not None, "the victim container's process is gone"
    assert cri.cri.pod_status(pod_a).ready and cri.cri.pod_status(pod_b).ready


# -- the pod host dies ---------------------------------------------------------------------


def test_host_exit_stops_the_pod(cri: cu.CriLab) -> None:
    pod, _ = cri.pod("hostexit", cu.PODSHIM, hostname=_unique("hx"), pid_mode="POD")
    one = cri.container(pod, "one", ["sleep", "3600"])
    two = cri.container(pod, "two", ["sleep", "3600"])
    inits = wait_for(lambda: cri.inits() or None, timeout=cu.DEADLINE, message=cu.INIT_COMM)
    assert len(inits) == 1, cp.describe(inits)

    with ce.CtrEvents(cri.lab) as events:
        events.prime(cri.touch_namespace, "/namespaces/update")
        os.kill(inits[0].pid, signal.SIGKILL)
        cri.wait_pod(pod, "NOTREADY")
        for cid in (one.id, two.id):
            cri.wait_container(cid, "EXITED")
        exit_event = events.wait(
            lambda e: e.topic == "/tasks/exit" and e.body.get("container_id") == pod,
            what=f"/tasks/exit of sandbox {pod}",
        )
    assert exit_event.body.get("exit_status") == 1, exit_event.line


# -- a container exits and is replaced -------------------------------------------------------


def test_replacement_container_same_shim(cri: cu.CriLab) -> None:
    pod, _ = cri.pod("replace", cu.PODSHIM, hostname=_unique("rp"))
    shim = cri.shim_pid(pod)
    shim_stat = read_stat(shim)
    assert shim_stat is not None
    first = cri.create(pod, "app", ["sh", "-c", "exit 3"])
    cri.cri.start_container(first)
    done = cri.wait_container(first, "EXITED")
    assert done.exit_code == 3, done

    second = cri.container(pod, "app", ["sleep", "3600"], attempt=1)
    stat = read_stat(second.pid)
    assert stat is not None and stat.ppid == shim, f"replacement's parent: {stat}"
    assert cp.alive(shim_stat) is not None, "the pod's shim was replaced"
    assert cri.shim_pid(pod) == shim
    assert cri.exec_ok(second.id, "echo", "again").strip() == "again"
    assert cri.cri.pod_status(pod).ready


# -- recovery ---------------------------------------------------------------------------------


def test_containerd_restart(cri: cu.CriLab) -> None:
    pod, _ = cri.pod("restart", cu.PODSHIM, hostname=_unique("rs"))
    c = cri.container(pod, "c", ["sleep", "3600"])
    shim = read_stat(cri.shim_pid(pod))
    assert shim is not None

    cri.restart_containerd()
    assert cp.alive(shim) is not None, "the shim did not survive containerd's restart"
    assert cri.cri.pod_status(pod).ready
    assert cri.cri.container_status(c.id).state == "RUNNING"
    assert cri.exec_ok(c.id, "echo", "hello").strip() == "hello"

    cri.cri.stop_pod(pod)
    cri.cri.remove_pod(pod)
    cri.pods[pod].removed = True
    cri.wait_gone(pod)


def test_shim_killed(cri: cu.CriLab) -> None:
    pod, _ = cri.pod("shimkill", cu.PODSHIM, hostname=_unique("sk"), pid_mode="POD")
    one = cri.container(pod, "one", ["sleep", "3600"])
    two = cri.container(pod, "two", ["sleep", "3600"])
    inits = wait_for(lambda: cri.inits() or None, timeout=cu.DEADLINE, message=cu.INIT_COMM)
    workloads = [s for s in (read_stat(one.pid), read_stat(two.pid)) if s is not None]
    assert len(workloads) == 2
    pins = cri.pins(pod)
    assert mounts_under([pins]), f"no namespace pins under {pins}"
    assert cgroup_dirs(f"/k8s.io/{pod}"), "no sandbox cgroup"
    shim = cri.shim_pid(pod)
    cri.remember(pod)

    os.kill(shim, signal.SIGKILL)
    cri.wait_pod(pod, "NOTREADY")
    cri.cri.stop_pod(pod)
    cri.cri.remove_pod(pod)
    cri.pods[pod].removed = True

    def left() -> list[str]:
        found = [f"mount {m}" for m in mounts_under([pins])]
        if os.path.lexists(pins):
            found.append(f"pin dir {pins}")
        found += [f"{cu.INIT_COMM} {s.pid}" for s in inits if cp.alive(s) is not None]
        found += [f"container process {s.pid}" for s in workloads if cp.alive(s) is not None]
        found += [f"sandbox cgroup {d}" for d in cgroup_dirs(f"/k8s.io/{pod}")]
        return found

    wait_for(
        lambda: not left(),
        timeout=cu.DEADLINE,
        interval=0.2,
        message=lambda: f"the killed shim's pod to be cleaned up: {left()}\n{cri.lab.log_tail(40)}",
    )
    cri.wait_gone(pod)


# -- StopPodSandbox + RemovePodSandbox leave nothing ------------------------------------------


def test_stop_remove_leaves_nothing(cri: cu.CriLab) -> None:
    pod, _ = cri.pod("clean", cu.PODSHIM, hostname=_unique("cl"), pid_mode="POD", sysctls=SYSCTLS)
    one = cri.container(pod, "one", ["sleep", "3600"])
    two = cri.container(pod, "two", ["sleep", "3600"])
    wait_for(lambda: cri.inits() or None, timeout=cu.DEADLINE, message=cu.INIT_COMM)
    cri.remember(pod)
    rec = cri.pods[pod]
    pins = cri.pins(pod)
    socket_path = cri.shim_socket(pod)
    assert mounts_under([pins]), f"no namespace pins under {pins}"
    assert cgroup_dirs(f"/k8s.io/{pod}"), "no sandbox cgroup"
    assert os.path.exists(socket_path)
    comms = {s.comm for s in rec.procs.values()}
    assert cu.INIT_COMM in comms and any(c.startswith("containerd-shim") for c in comms), comms

    cri.cri.stop_pod(pod)
    cri.cri.remove_pod(pod)
    rec.removed = True
    cri.wait_gone(pod)
    # explicit, for the record (wait_gone covers all of it)
    for stat in rec.procs.values():
        assert cp.alive(stat) is None, f"process {stat.pid} ({stat.comm}) survived"
    assert not mounts_under([pins]) and not os.path.lexists(pins)
    for task_id in (pod, one.id, two.id):
        assert not cgroup_dirs(f"/k8s.io/{task_id}"), task_id
        assert not cri.bundle(task_id).exists(), task_id
        assert not cri.runtime_state(rec, task_id).exists(), task_id
    assert not os.path.lexists(socket_path)
    assert not cri.cri.list_pods(pod)


# -- UpdateContainerResources -----------------------------------------------------------------


@pytest.mark.parametrize("handler", [cu.PODSHIM, cu.RUNC])
def test_update_container_resources(cri: cu.CriLab, handler: str) -> None:
    parent = (
        f"/podshim-cri-{secrets.token_hex(3)}"  # kubelet's pod cgroup; PodSandboxStats needs one
    )
    errors: list[str] = []
    try:
        pod, _ = cri.pod("update", handler, hostname=_unique("up"), cgroup_parent=parent)
        start = cu.resources(memory_limit=64 * cu.MIB, cpu_quota=50000, cpu_period=100000)
        c = cri.container(pod, "c", ["sleep", "3600"], resources=start)
        path = c.cgroups_path
        assert path == f"{parent}/{c.id}", path
        assert cp.cgroup_of(c.pid, "memory") == path
        assert cp.read_cgroup("memory", path, "memory.limit_in_bytes") == str(64 * cu.MIB)
        assert cp.read_cgroup("cpu", path, "cpu.cfs_quota_us") == "50000"

        cri.cri.update_resources(
            c.id, cu.resources(memory_limit=128 * cu.MIB, cpu_quota=20000, cpu_period=100000)
        )
        assert cp.read_cgroup("memory", path, "memory.limit_in_bytes") == str(128 * cu.MIB)
        assert cp.read_cgroup("cpu", path, "cpu.cfs_quota_us") == "20000"
        assert cp.read_cgroup("cpu", path, "cpu.cfs_period_us") == "100000"
        linux = cri.cri.container_status(c.id).raw.status.resources.linux
        assert (linux.memory_limit_in_bytes, linux.cpu_quota) == (128 * cu.MIB, 20000)

        stats = cri.cri.container_stats(c.id)
        assert stats.attributes.id == c.id
        assert stats.memory.usage_bytes.value > 0, stats
        pod_stats = cri.cri.pod_stats(pod)
        assert pod_stats.attributes.id == pod
        assert c.id in {s.attributes.id for s in pod_stats.linux.containers}
        assert pod_stats.linux.process.process_count.value >= 1
    finally:  # the pods first: the parent cgroup can only go once it is empty
        errors += cri.cleanup([p for p, r in cri.pods.items() if not r.removed])
        errors += [f"cgroup parent {d}" for d in remove_cgroup(parent)]
    assert not errors, "\n".join(errors)
