"""VM pods through CRI: the ``podshim-vm`` handler (``default_host = "uvm"``), one QEMU
utility VM per pod, its containers run by crun in the guest (``podshim-vm-runc``: runc;
issue 13's acceptance).

One private containerd serves the module (:mod:`vmlab`); every test's pods are stopped,
removed and checked gone (QEMU, mounts, run-directory entries, bundles) after it.
Skipped, saying why, when ``podshim uvm prepare`` has not been run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim_lab import wait_for
from podshim_lab.cri.client import api

if TYPE_CHECKING:
    from tests.integration import crievents as ce
    from tests.integration import criutil as cu
    from tests.integration import vmlab
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import crievents as ce
    import criutil as cu
    import vmlab

pytestmark = pytest.mark.integration

VM = vmlab.VM
PODSHIM_CLI = str(Path(cu.BIN_DIR) / "podshim")
WEB = "echo hello-from-the-vm > /tmp/index.html; exec httpd -f -p 8080 -h /tmp"
HOG = 'x=$(head -c 67108864 /dev/zero | tr "\\0" x); sleep 1'


@pytest.fixture(scope="module")
def vm_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[vmlab.VmLab]:
    with vmlab.open_vm_lab(tmp_path_factory.mktemp("podshim-vm")) as lab:
        yield lab


@pytest.fixture
def cri(vm_lab: vmlab.VmLab) -> Iterator[vmlab.VmLab]:
    before = set(vm_lab.pods)
    try:
        yield vm_lab
    finally:
        mine = [p for p in vm_lab.pods if p not in before]
        errors = vm_lab.cleanup(mine) if vm_lab.lab.running else ["containerd is not running"]
        assert not errors, "test left things behind:\n" + "\n".join(errors)


def _diag(cri: vmlab.VmLab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PODSHIM_CLI, "diag", "--address", cri.lab.address, *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, f"{res.args}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body: bytes = r.read()
            return body.decode()
    except OSError:
        return None


def test_two_containers_share_localhost_and_the_pod_ip_answers(cri: vmlab.VmLab) -> None:
    pod, _ = cri.pod("vm-net", VM, hostname="vm-net")
    web = cri.container(pod, "web", ["sh", "-c", WEB])
    client = cri.container(pod, "client", ["sleep", "3600"])
    guest_kernel = cri.exec_ok(web.id, "uname", "-r").strip()
    assert guest_kernel and guest_kernel != os.uname().release, guest_kernel
    assert cri.exec_ok(client.id, "uname", "-r").strip() == guest_kernel
    assert cri.exec_ok(client.id, "hostname").strip() == "vm-net"

    def fetched() -> str | None:
        r = cri.exec(client.id, "wget", "-qO-", "http://127.0.0.1:8080/index.html")
        return r.stdout if r.exit_code == 0 and r.stdout else None

    got = wait_for(fetched, timeout=cu.DEADLINE, interval=0.3,
                   message="the web container on localhost")  # fmt: skip
    assert got == "hello-from-the-vm\n"
    ip = cri.cri.pod_status(pod).ip
    assert ip, cri.cri.pod_status(pod).raw
    body = wait_for(lambda: _http(f"http://{ip}:8080/index.html"), timeout=cu.DEADLINE,
                    interval=0.3, message=f"the pod IP {ip} from the host")  # fmt: skip
    assert body == "hello-from-the-vm\n"
    addrs = cri.exec_ok(client.id, "ip", "-4", "addr", "show", "eth0")
    assert f"inet {ip}/" in addrs, addrs


def test_exec_sync_logs_and_stats(cri: vmlab.VmLab, tmp_path: Path) -> None:
    pod, _ = cri.pod("vm-io", VM, log_directory=str(tmp_path))
    talker = cri.container(pod, "talker", ["sh", "-c", "echo out-line; echo err-line >&2; "
                                           "exec sleep 3600"], log_path="talker.log")  # fmt: skip
    res = cri.exec(talker.id, "sh", "-c", "echo to-out; echo to-err >&2; exit 3")
    assert (res.exit_code, res.stdout, res.stderr) == (3, "to-out\n", "to-err\n"), res
    log_path = tmp_path / "talker.log"

    def logged() -> str | None:
        text = Path(log_path).read_text()
        return text if "err-line" in text and "out-line" in text else None

    text = wait_for(logged, timeout=cu.DEADLINE, interval=0.2,
                    message=f"both lines in {log_path}")  # fmt: skip
    assert " stdout F out-line" in text and " stderr F err-line" in text, text

    def measured() -> api.ContainerStats | None:
        s = cri.cri.container_stats(talker.id)
        return s if s.memory.working_set_bytes.value else None

    stats = wait_for(measured, timeout=cu.DEADLINE, interval=0.5,
                     message="memory stats of the guest container")  # fmt: skip
    assert stats.cpu.usage_core_nano_seconds.value > 0, stats
    # the guest runtime's (crun's) own failure reaches CRI, naming the binary
    with pytest.raises(cu.CriError) as err:
        cri.container(pod, "missing", ["/no/such/binary"])
    assert "crun " in err.value.details and "/no/such/binary" in err.value.details, err.value


def test_oom_kill_in_the_guest_cgroup_v2(cri: vmlab.VmLab) -> None:
    pod, _ = cri.pod("vm-oom", VM)
    with ce.CtrEvents(cri.lab) as events:
        events.prime(cri.touch_namespace, "/namespaces/update")
        cid = cri.create(pod, "hog", ["sh", "-c", HOG],
                         resources=cu.resources(memory_limit=32 * cu.MIB))  # fmt: skip
        cri.cri.start_container(cid)
        done = cri.wait_container(cid, "EXITED")
        events.wait(lambda e: e.topic == "/tasks/oom" and e.body.get("container_id") == cid,
                    what=f"/tasks/oom of {cid}")  # fmt: skip
    assert done.exit_code == 137, done
    wait_for(lambda: cri.cri.container_status(cid).reason == "OOMKilled", timeout=cu.DEADLINE,
             interval=0.2, message="reason OOMKilled")  # fmt: skip


def test_qemu_killed_is_host_death(cri: vmlab.VmLab) -> None:
    pod, _ = cri.pod("vm-death", VM)
    one = cri.container(pod, "one", ["sleep", "3600"])
    qemu = cri.qemu_pid(pod)
    with ce.CtrEvents(cri.lab) as events:
        events.prime(cri.touch_namespace, "/namespaces/update")
        os.kill(qemu, signal.SIGKILL)
        cri.wait_pod(pod, "NOTREADY")
        cri.wait_container(one.id, "EXITED")
        exit_event = events.wait(
            lambda e: e.topic == "/tasks/exit" and e.body.get("container_id") == pod,
            what=f"/tasks/exit of sandbox {pod}",
        )
    assert exit_event.body.get("exit_status") == 1, exit_event.line


def test_diag_exec_stacks_and_share_reach_the_vm(cri: vmlab.VmLab) -> None:
    pod, _ = cri.pod("vm-diag", VM)
    box = cri.container(pod, "box", ["sleep", "3600"])
    guest_kernel = cri.exec_ok(box.id, "uname", "-r").strip()
    out = _ok(_diag(cri, "exec", pod, "--", "uname", "-a"))
    assert guest_kernel in out, out
    assert _diag(cri, "exec", pod, "--", "sh", "-c", "exit 5").returncode == 5
    # the shim's view: the sandbox's host is a VM, with the accelerator the probe chose
    host = next(t["host"] for t in json.loads(_ok(_diag(cri, "tasks", "--json", pod)))
                if t["id"] == pod)  # fmt: skip
    assert host["kind"] == "uvm" and host["accel"] in ("tcg", "kvm"), host
    assert host["runtime"] == "crun", host
    assert int(host["qemu_pid"]) > 0 and float(host["boot_seconds"]) > 0, host
    assert f"host of {pod}: " in _ok(_diag(cri, "tasks", pod))
    stacks = _ok(_diag(cri, "stacks", pod))
    assert "agent" in stacks and "runc" not in stacks.split("agent", 1)[0], stacks[:2000]
    with tempfile.TemporaryDirectory(prefix="vmshare-") as d:
        Path(d, "note.txt").write_text("shared-into-the-vm\n")
        _ok(_diag(cri, "share", "--ro", pod, d, "/mnt/shared"))
        assert _ok(_diag(cri, "exec", pod, "--", "cat", "/mnt/shared/note.txt")) == (
            "shared-into-the-vm\n"
        )
        # into a named container (by a prefix of its id), while it runs: its own mount
        # namespace in the guest, read-only there too
        _ok(_diag(cri, "share", "--ro", "--container", box.id[:12], pod, d, "/srv/from-host"))
        assert cri.exec_ok(box.id, "cat", "/srv/from-host/note.txt") == "shared-into-the-vm\n"
        res = cri.exec(box.id, "sh", "-c", "echo x > /srv/from-host/new")
        assert res.exit_code != 0 and not Path(d, "new").exists(), res
        bad = _diag(cri, "share", "--container", "no-such", pod, d, "/srv/x")
        assert bad.returncode != 0 and "no containers of pod" in bad.stderr, bad.stderr
        cri.stop_and_remove(pod)  # the share must not pin the host directory
        cri.wait_gone(pod)


def test_runc_in_the_guest(cri: vmlab.VmLab, tmp_path: Path) -> None:
    """The handler whose [uvm] table says runtime = "runc": the same pod, runc's errors."""
    pod, _ = cri.pod("vm-runc", vmlab.VM_RUNC, log_directory=str(tmp_path))
    box = cri.container(pod, "box", ["sh", "-c", "echo up; exec sleep 3600"], log_path="b.log")
    assert cri.exec_ok(box.id, "cat", "/proc/1/cmdline") == "sleep\x003600\x00"
    host = next(t["host"] for t in json.loads(_ok(_diag(cri, "tasks", "--json", pod)))
                if t["id"] == pod)  # fmt: skip
    assert host["runtime"] == "runc", host
    log = tmp_path / "b.log"
    wait_for(lambda: log.exists() and "stdout F up" in log.read_text(), timeout=cu.DEADLINE,
             interval=0.2, message="the container's log line")  # fmt: skip
    # the guest runtime's own failure reaches CRI: runc's message, naming the binary
    with pytest.raises(cu.CriError) as err:
        cri.container(pod, "missing", ["/no/such/binary"])
    assert "runc " in err.value.details and "/no/such/binary" in err.value.details, err.value


def test_host_network_pod_is_refused_naming_the_field(cri: vmlab.VmLab) -> None:
    config = cri.pod_config("vm-hostnet", host_network=True)
    with pytest.raises(cu.CriError) as err:
        cri.cri.run_pod_config(config, VM)
    assert "network" in err.value.details, err.value
    # CRI removes what it made; podshim left nothing of its own
    left = [p for p in cri.cri.list_pods() if p.metadata.name == config.metadata.name]
    for p in left:
        cri.cri.remove_pod(p.id)


def test_twenty_vm_pods_up_and_down_leave_nothing(cri: vmlab.VmLab) -> None:
    for i in range(20):
        pod, _ = cri.pod(f"vm-many-{i}", VM)
        c = cri.container(pod, "c", ["sleep", "3600"])
        assert cri.exec_ok(c.id, "echo", f"n{i}") == f"n{i}\n"
        assert not cri.stop_and_remove(pod)
        cri.wait_gone(pod)
