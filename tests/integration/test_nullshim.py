"""The do-nothing shim of the benchmarks (``bench/nullshim``) through CRI.

It must let containerd's CRI plugin run a pod's whole life (RunPodSandbox, Create,
Start, ExecSync, Stop, Remove) while running nothing: the only runtime process is its
daemon, whose pid every task reports. Pod scope: one daemon per pod, gone once the pod
is removed. Node scope: one daemon for every pod of the containerd.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from podshim.api.task.v2 import shim_pb2
from podshim_lab import Containerd, RuntimeHandler, wait_for
from podshim_lab.cri.client import CriClient
from podshim_lab.procfs import descendants

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import nullshim  # noqa: E402

DEADLINE = 60.0


@pytest.fixture
def bin_dir(tmp_path: Path) -> str:
    nullshim.install(str(tmp_path / "bin"))
    return str(tmp_path / "bin")


@pytest.fixture
def lab(containerd_factory: Callable[..., Containerd], bin_dir: str) -> Iterator[Containerd]:
    runtimes = {
        f"null-{scope}": RuntimeHandler(runtime)
        for scope, runtime in nullshim.RUNTIME_TYPES.items()
    }
    lab = containerd_factory(cri=True, runtimes=runtimes, extra_path=[bin_dir], log_level="info")
    lab.ensure_pause()
    yield lab


def shim_processes(lab: Containerd) -> list[tuple[int, str]]:
    """(pid, command line) of every process below the lab's subreaper but containerd."""
    out = []
    for st in descendants(lab.subreaper_pid or -1):
        if st.pid != lab.pid and st.state != "Z":
            try:
                raw = Path(f"/proc/{st.pid}/cmdline").read_bytes()
            except OSError:  # it exited since the listing
                continue
            out.append((st.pid, raw.replace(b"\0", b" ").decode()))
    return out


def pod_up(cri: CriClient, image: str, handler: str, name: str, host_net: bool) -> tuple[str, str]:
    cfg = cri.pod_config(name, "nullshim-test", f"uid-{name}", host_network=host_net)
    pod = cri.run_pod_config(cfg, handler)
    assert cri.pod_status(pod).ready
    cid = cri.create_container(pod, cfg, "c", image, ["sleep", "3600"])
    cri.start_container(cid)
    return pod, cid


@pytest.mark.parametrize("host_net", [False, True], ids=["pod-network", "host-network"])
@pytest.mark.parametrize("scope", ["pod", "node"])
def test_pod_lives_and_nothing_runs(lab: Containerd, scope: str, host_net: bool) -> None:
    image = lab.ensure_busybox(namespace="k8s.io")
    binary = nullshim.BINARIES[scope]
    with CriClient(lab.address, timeout=DEADLINE) as cri:
        pod, cid = pod_up(cri, image, f"null-{scope}", "p1", host_net)
        status = cri.container_status(cid)
        assert status.state == "RUNNING"
        procs = shim_processes(lab)
        assert len(procs) == 1, procs  # the daemon, nothing else: no pause, no sleep
        daemon, argv = procs[0]
        assert binary in argv
        assert status.pid == daemon

        res = cri.exec_sync(cid, ["echo", "hi"], timeout=20)
        assert (res.exit_code, res.stdout, res.stderr) == (0, "", "")

        if scope == "node":  # a second pod: the same daemon
            pod2, cid2 = pod_up(cri, image, "null-node", "p2", host_net)
            assert cri.container_status(cid2).pid == daemon
            assert shim_processes(lab) == procs

        cri.stop_pod(pod)
        exited = cri.container_status(cid)
        assert exited.state == "EXITED"
        assert exited.exit_code == 128 + 9  # CRI stops a pod's containers with SIGKILL
        assert not cri.pod_status(pod).ready
        cri.remove_pod(pod)
        assert not [p for p in cri.list_pods() if p.id == pod]

        if scope == "pod":
            wait_for(lambda: not shim_processes(lab), DEADLINE, message="the pod's daemon exits")
        else:
            assert shim_processes(lab) == procs  # resident: serves pod 2 still
            cri.stop_pod(pod2)
            cri.remove_pod(pod2)
            assert shim_processes(lab) == procs


def test_delete_action_prints_a_delete_response(bin_dir: str, tmp_path: Path) -> None:
    before = time.time()
    shim = f"{bin_dir}/{nullshim.BINARIES['pod']}"
    res = subprocess.run(
        [shim, "-namespace", "ns", "-id", "t1", "-address", str(tmp_path / "c.sock"), "delete"],
        capture_output=True,
        timeout=DEADLINE,
        check=True,
        cwd=tmp_path,
    )
    resp = shim_pb2.DeleteResponse.FromString(res.stdout)
    assert resp.exit_status == 137
    assert before - 1 <= resp.exited_at.seconds <= time.time() + 1
