"""critest's Security Context specs (``pkg/validate/security_context_linux.go``) through
CRI on podshim and, in the same test, on runc: the namespace options (HostPID, HostIpc,
PodPID, ContainerPID, HostNetwork) and the "bucket" of per-container settings (RunAsUser,
RunAsUserName, RunAsGroup, SupplementalGroups, ReadOnlyRootfs, Privileged, capabilities,
MaskedPaths, ReadonlyPaths, NoNewPrivs).

Where critest reads a setting from inside the container, these tests do the same and
also read the container's process from the host (``/proc/<pid>/status``), which shows
what the runtime really set up. Not covered: SELinux and AppArmor (disabled in the lab's
containerd), seccomp, user namespaces and SupplementalGroupsPolicy (not in containerd
1.6's CRI).
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim_lab.cri.client import api

if TYPE_CHECKING:
    from tests.integration import criprocs as cp
    from tests.integration import criutil as cu
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criprocs as cp
    import criutil as cu

# the fixtures: one CRI containerd per module, per-test cleanup checks
cri_lab = cu.cri_lab
cri = cu.cri

HANDLERS = pytest.mark.parametrize("handler", [cu.PODSHIM, cu.RUNC])
SLEEP = ["sleep", "3600"]
CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN = 12, 13, 21


def _status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` of a container's process, read from the host."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _caps(status: str) -> int:
    return int(status, 16)


def _run(cri: cu.CriLab, pod: str, config: api.ContainerConfig) -> cu.ContainerInfo:
    return cri.start(pod, cri.create_config(pod, config))


def _ctr(cri: cu.CriLab, pod: str, name: str, command: list[str]) -> cu.ContainerInfo:
    """A running container whose namespace options are the pod's (all of them, as kubelet
    sends them)."""
    return _run(cri, pod, cri.container_config(pod, name, command))


# -- NamespaceOption -----------------------------------------------------------------------


@HANDLERS
def test_host_pid(cri: cu.CriLab, handler: str) -> None:
    pod, _ = cri.pod("hostpid", handler, pid_mode="NODE")
    target = _ctr(cri, pod, "target", ["sleep", "4242"])
    viewer = _ctr(cri, pod, "viewer", SLEEP)
    assert cp.ns_of(viewer.pid, "pid") == cp.host_ns("pid")
    # the other container's process shows with its host pid
    pids = cri.exec_ok(viewer.id, "pidof", "sleep").split()
    assert str(target.pid) in pids, (target.pid, pids)
    assert not cri.inits(), "a PID init in a hostPID pod"


@contextlib.contextmanager
def _host_shm_segment() -> Iterator[str]:
    """A System V shared memory segment in the host's IPC namespace; its id."""
    out = subprocess.run(["ipcmk", "-M", "1048576"], capture_output=True, text=True, check=True)
    match = re.search(r"(\d+)\s*$", out.stdout)
    assert match, out.stdout
    try:
        yield match.group(1)
    finally:
        subprocess.run(["ipcrm", "-m", match.group(1)], check=True)


@HANDLERS
def test_host_ipc_true_and_false(cri: cu.CriLab, handler: str) -> None:
    with _host_shm_segment() as segment:
        for host_ipc in (True, False):
            pod, _ = cri.pod(f"ipc{host_ipc}", handler, pid_mode="POD", ipc_host=host_ipc)
            c = _ctr(cri, pod, "c", SLEEP)
            # (busybox has no ipcs: /proc/sysvipc lists the reader's IPC namespace)
            table = cri.exec_ok(c.id, "cat", "/proc/sysvipc/shm").splitlines()[1:]
            ids = {line.split()[1] for line in table}
            assert (segment in ids) == host_ipc, (host_ipc, segment, ids)
            assert (cp.ns_of(c.pid, "ipc") == cp.host_ns("ipc")) == host_ipc


@HANDLERS
def test_pod_pid_and_container_pid(cri: cu.CriLab, handler: str) -> None:
    shared, _ = cri.pod("podpid", handler, pid_mode="POD")
    first = _ctr(cri, shared, "first", ["sleep", "4243"])
    second = _ctr(cri, shared, "second", SLEEP)
    # PID 1 of a shared namespace is the pod's (pause, podshim-init), not a workload
    pid1 = cri.exec_ok(second.id, "cat", "/proc/1/cmdline").replace("\0", " ").strip()
    assert pid1 and pid1 not in ("sleep 4243", "sleep 3600"), pid1
    assert "sleep 4243" in cri.exec_ok(second.id, "ps", "-o", "args")
    assert cp.ns_of(first.pid, "pid") == cp.ns_of(second.pid, "pid") != cp.host_ns("pid")

    own, _ = cri.pod("ctrpid", handler, pid_mode="CONTAINER")
    alone = _ctr(cri, own, "alone", ["sleep", "4244"])
    assert cri.exec_ok(alone.id, "cat", "/proc/1/cmdline").split("\0")[:2] == ["sleep", "4244"]


@HANDLERS
def test_host_network_true_and_false(cri: cu.CriLab, handler: str) -> None:
    with socket.socket() as server:
        server.bind(("0.0.0.0", 0))
        server.listen()
        port = server.getsockname()[1]
        for host_net in (True, False):
            pod, _ = cri.pod(f"net{host_net}", handler, pid_mode="POD", host_network=host_net)
            c = _ctr(cri, pod, "c", SLEEP)
            listening = re.findall(r":(\d+)\s", cri.exec_ok(c.id, "netstat", "-ltn"))
            assert (str(port) in listening) == host_net, (host_net, port, listening)
            assert (cp.ns_of(c.pid, "net") == cp.host_ns("net")) == host_net


# -- the bucket: one pod, a container per setting ------------------------------------------


@HANDLERS
def test_users_and_groups(cri: cu.CriLab, handler: str) -> None:
    pod, _ = cri.pod("users", handler, pid_mode="POD")

    config = cri.container_config(pod, "runasuser", SLEEP)
    config.linux.security_context.run_as_user.value = 1001
    c = _run(cri, pod, config)
    assert cri.exec_ok(c.id, "id", "-u").strip() == "1001"
    assert _status(c.pid)["Uid"].split() == ["1001"] * 4

    config = cri.container_config(pod, "runasusername", SLEEP)
    config.linux.security_context.run_as_username = "nobody"
    c = _run(cri, pod, config)
    assert cri.exec_ok(c.id, "id", "-nu").strip() == "nobody"
    assert _status(c.pid)["Uid"].split() == ["65534"] * 4

    config = cri.container_config(pod, "runasgroup", SLEEP)
    config.linux.security_context.run_as_user.value = 1001
    config.linux.security_context.run_as_group.value = 1002
    g = _run(cri, pod, config)
    assert cri.exec_ok(g.id, "sh", "-c", "echo $(id -u):$(id -g)").strip() == "1001:1002"
    assert _status(g.pid)["Gid"].split() == ["1002"] * 4

    config = cri.container_config(pod, "groups", SLEEP)
    config.linux.security_context.supplemental_groups.extend([1234, 5678])
    c = _run(cri, pod, config)
    assert {"1234", "5678"} <= set(cri.exec_ok(c.id, "id", "-G").split())
    assert {"1234", "5678"} <= set(_status(c.pid)["Groups"].split())

    # RunAsGroup without RunAsUser is refused at create
    config = cri.container_config(pod, "badgroup", SLEEP)
    config.linux.security_context.run_as_group.value = 1002
    with pytest.raises(cu.CriError):
        cri.create_config(pod, config)


@HANDLERS
def test_filesystem_settings(cri: cu.CriLab, handler: str) -> None:
    pod, _ = cri.pod("fs", handler, pid_mode="POD")
    for readonly in (True, False):
        config = cri.container_config(pod, f"rootfs{readonly}", SLEEP)
        config.linux.security_context.readonly_rootfs = readonly
        c = _run(cri, pod, config)
        res = cri.exec(c.id, "touch", "/test.go")
        if readonly:
            assert res.exit_code != 0 and "Read-only file system" in res.stderr, res
        else:
            assert res.exit_code == 0, res

    config = cri.container_config(pod, "masked", SLEEP)
    config.linux.security_context.masked_paths.append("/etc/group")
    c = _run(cri, pod, config)
    assert cri.exec_ok(c.id, "cat", "/etc/group") == ""
    config = cri.container_config(pod, "unmasked", SLEEP)
    assert "root:x:0:" in cri.exec_ok(_run(cri, pod, config).id, "cat", "/etc/group")

    config = cri.container_config(pod, "readonlypaths", SLEEP)
    config.linux.security_context.readonly_paths.append("/tmp")
    c = _run(cri, pod, config)
    res = cri.exec(c.id, "touch", "/tmp/test")
    assert res.exit_code != 0 and "Read-only file system" in res.stderr, res


@HANDLERS
def test_privileges_and_capabilities(cri: cu.CriLab, handler: str) -> None:
    config = cri.pod_config("priv", pid_mode="POD")
    config.linux.security_context.privileged = True
    pod = cri.run_pod(config, handler)

    def manages_network(c: cu.ContainerInfo) -> bool:
        name = f"d{c.id[:8]}"
        return cri.exec(c.id, "ip", "link", "add", name, "type", "bridge").exit_code == 0

    def container(name: str, **security: object) -> cu.ContainerInfo:
        config = cri.container_config(pod, name, SLEEP)
        sc = config.linux.security_context
        for key, value in security.items():
            if key in ("add", "drop"):
                getattr(sc.capabilities, f"{key}_capabilities").extend(value)
            else:
                setattr(sc, key, value)
        return _run(cri, pod, config)

    privileged = container("privileged", privileged=True)
    assert manages_network(privileged)
    plain = container("plain")
    assert not manages_network(plain)
    full, some = (_caps(_status(c.pid)["CapEff"]) for c in (privileged, plain))
    assert full & some == some and full >> CAP_SYS_ADMIN & 1, (hex(full), hex(some))

    added = container("netadmin", add=["NET_ADMIN"])
    assert manages_network(added)
    assert _caps(_status(added.pid)["CapEff"]) >> CAP_NET_ADMIN & 1
    dropped = container("nonetraw", drop=["NET_RAW"])
    assert not _caps(_status(dropped.pid)["CapBnd"]) >> CAP_NET_RAW & 1
    assert _caps(_status(plain.pid)["CapBnd"]) >> CAP_NET_RAW & 1

    every = container("all", add=["ALL"])
    bounding = cri.exec_ok(every.id, "grep", "CapBnd", "/proc/self/status")
    assert not re.search(r"CapBnd:\s0+$", bounding.strip()), bounding
    none = container("none", drop=["ALL"])
    bounding = cri.exec_ok(none.id, "grep", "CapBnd", "/proc/self/status")
    assert re.search(r"CapBnd:\s0+$", bounding.strip()), bounding
    assert _caps(_status(none.pid)["CapBnd"]) == 0

    for nnp in (True, False):
        c = container(f"nnp{nnp}", no_new_privs=nnp)
        assert _status(c.pid)["NoNewPrivs"] == str(int(nnp))
        assert f"NoNewPrivs:\t{int(nnp)}" in cri.exec_ok(c.id, "cat", "/proc/self/status")
