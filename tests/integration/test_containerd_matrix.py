"""podshim on the newer containerd lines: 1.7.24 (Debian trixie) and 2.1.9 (Debian sid),
unpacked by scripts/fetch_containerd.sh and started by the lab with their own config
dialect (``version = 2`` for 1.7, ``version = 3`` with NRI off for 2.1).

Runs on both newer versions, or only on ``$PODSHIM_CONTAINERD`` when that is set (CI:
2.1 with test_cri_pod.py, 1.7 as a smoke). Each version gets one plain lab (``ctr``)
and one CRI lab (handlers ``runc`` and ``podshim``); every fixture asserts at its end
that nothing of the lab or its pods and containers is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim_lab import Containerd, RuntimeHandler, wait_for
from podshim_lab.cleanup import remove_cgroup
from podshim_lab.cri.client import CriError

if TYPE_CHECKING:
    from tests.integration import criprocs as cp
    from tests.integration import criutil as cu
    from tests.integration import matrix
    from tests.integration import shimutil as su
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criprocs as cp
    import criutil as cu
    import matrix
    import shimutil as su

pytestmark = pytest.mark.timeout(600)

VERSIONS = [matrix.selected()] if matrix.selected() else list(matrix.NEWER)

# per-test cleanup checks: CRI pods (criutil, on this module's cri_lab below) and ctr
# containers (shimutil, on this module's lab)
cri = cu.cri
ids = su.ids


@pytest.fixture(scope="module", params=VERSIONS)
def version(request: pytest.FixtureRequest) -> str:
    """The containerd version under test (its binaries must be there: never skipped)."""
    return matrix.require(str(request.param))


@pytest.fixture(scope="module")
def lab(version: str) -> Iterator[Containerd]:
    """A plain lab of ``version`` with podshim on its PATH and busybox imported."""
    lab = su.open_lab(version=version)
    try:
        yield lab
    finally:
        su.close_lab(lab)


@pytest.fixture(scope="module")
def cri_lab(version: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[cu.CriLab]:
    """The two-handler CRI lab of ``version``, checked after the module's last test."""
    lab, crilab = cu.open_cri_lab(tmp_path_factory.mktemp(f"matrix-{version}"), version=version)
    try:
        yield crilab
    finally:
        errors = cu.close_cri_lab(lab, crilab)
        assert not errors, "CRI lab teardown left things behind:\n" + "\n".join(errors)


def _server_version(lab: Containerd) -> str:
    out = lab.ctr("version").stdout
    match = re.search(r"Server:\s*\n\s*Version:\s*(\S+)", out)
    assert match, out
    return match.group(1)


def test_lab_runs_the_selected_containerd(lab: Containerd, version: str) -> None:
    assert _server_version(lab).startswith(version + "."), lab.ctr("version").stdout
    header = lab.paths.config.read_text().splitlines()[1]
    assert header == ("version = 3" if version.startswith("2.") else "version = 2"), header


def test_ctr_run_podshim_exit_code_and_output(lab: Containerd) -> None:
    cid = f"m{secrets.token_hex(3)}"
    res = su.run(lab, cid, "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3")
    assert res.returncode == 3, res
    assert res.stdout == "to-stdout\n", res
    assert "to-stderr\n" in res.stderr, res
    # --rm: the container and its task are gone
    assert cid not in lab.ctr("containers", "ls", "-q").stdout.split()
    assert cid not in lab.tasks()


def test_ctr_exec_and_kill(lab: Containerd, ids: list[str]) -> None:
    cid = f"m{secrets.token_hex(3)}"
    ids.append(cid)
    su.run_detached(lab, cid, "sleep", "3600")
    res = lab.ctr(
        "task", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo in-exec; exit 4", check=False
    )
    assert res.returncode == 4, res
    assert res.stdout == "in-exec\n", res
    lab.ctr("task", "kill", "-s", "SIGKILL", cid)
    su.wait_status(lab, cid, "STOPPED")
    lab.ctr("task", "delete", cid)
    lab.ctr("container", "rm", cid)
    assert cid not in lab.tasks()


def test_cri_pod_shared_pid_two_containers(cri: cu.CriLab) -> None:
    pod, _ = cri.pod("matrix", cu.PODSHIM, hostname=f"mx-{secrets.token_hex(3)}", pid_mode="POD")
    one = cri.container(pod, "one", ["sleep", "3601"])
    two = cri.container(pod, "two", ["sleep", "3602"])
    assert cp.ns_of(one.pid, "pid") == cp.ns_of(two.pid, "pid") != cp.host_ns("pid")
    for kind in ("ipc", "uts", "net"):
        assert cp.ns_of(one.pid, kind) == cp.ns_of(two.pid, kind), kind
    # each sees the other's process, both are served by podshim's shim
    assert "sleep 3602" in cri.exec_ok(one.id, "ps")
    assert "sleep 3601" in cri.exec_ok(two.id, "ps")
    res = cri.exec(two.id, "sh", "-c", "echo from-two; exit 5")
    assert (res.exit_code, res.stdout) == (5, "from-two\n"), res
    assert "podshim" in " ".join(su.cmdline(cri.shim_pid(pod)))
    # stop + remove: the fixture (criutil.cri) then checks nothing of the pod is left
    assert cri.stop_and_remove(pod) == []
    cri.wait_gone(pod)


# -- what differs on the newer lines (strict xfails: each fails today, on that version) ---


@pytest.fixture
def fresh_cri(version: str, tmp_path: Path) -> Iterator[cu.CriLab]:
    """A CRI lab of ``version`` for one test that may leave a pod the runtime lost track
    of: its pods are removed as kubelet would (retrying), whatever the runtime did not
    clean up is forced away, then the lab is closed and checked to have left nothing."""
    lab, crilab = cu.open_cri_lab(tmp_path / "cri", version=version)
    errors: list[str] = []
    try:
        yield crilab
    finally:
        for pod in list(crilab.pods):
            _settle(crilab, pod)
        errors = cu.close_cri_lab(lab, crilab)
    assert not errors, "CRI lab teardown left things behind:\n" + "\n".join(errors)


def _settle(cri: cu.CriLab, pod: str) -> None:
    rec = cri.pods[pod]

    def removed() -> bool:
        rec.removed = False
        return not cri.stop_and_remove(pod)

    with contextlib.suppress(AssertionError):
        wait_for(removed, timeout=cu.DEADLINE, interval=0.5)
    try:
        cri.wait_gone(pod, timeout=30)
    except AssertionError:
        cri.force_cleanup(pod)
        for task in (pod, *rec.containers):
            remove_cgroup(f"{rec.cgroup_parent}/{task}")


def test_cri_pod_survives_containerd_restart(fresh_cri: cu.CriLab) -> None:
    """containerd 1.7's shim reload (ShimManager.loadShims) deletes a loaded task that is
    not in its sandbox store and reports no pids as a leaked shim: the sandbox task reports
    its anchor when the pod has no PID init, so the pod stays READY."""
    cri = fresh_cri
    pod, _ = cri.pod("restart", cu.PODSHIM, hostname=f"rs-{secrets.token_hex(3)}")
    c = cri.container(pod, "c", ["sleep", "3600"])
    cri.remember(pod)
    cri.restart_containerd()
    assert cri.cri.pod_status(pod).ready
    assert cri.cri.container_status(c.id).state == "RUNNING"
    assert cri.exec_ok(c.id, "echo", "hello").strip() == "hello"


def test_cri_pod_removed_after_its_shim_died(fresh_cri: cu.CriLab) -> None:
    """Kill the pod's shim: CRI sees the pod NOTREADY and StopPodSandbox +
    RemovePodSandbox (retried as kubelet does) leave nothing. (containerd 2.x, and at
    times 1.7: CRI's first TaskExit handling of each container fails, task delete 'ttrpc:
    closed', and is retried after a backoff of ~1-2 s; a RemovePodSandbox in between
    fails with 'container is still running'. 1.6 removes at once, which
    test_cri_pod.py::test_shim_killed relies on.)"""
    cri = fresh_cri
    pod, _ = cri.pod("shimkill", cu.PODSHIM, hostname=f"sk-{secrets.token_hex(3)}")
    cri.container(pod, "one", ["sleep", "3600"])
    cri.container(pod, "two", ["sleep", "3600"])
    shim = cri.shim_pid(pod)
    cri.remember(pod)
    os.kill(shim, signal.SIGKILL)
    cri.wait_pod(pod, "NOTREADY")
    last: list[str] = []

    def removed() -> bool:
        last[:] = cri.stop_and_remove(pod)
        return not last

    wait_for(removed, timeout=cu.DEADLINE, interval=0.5, message=lambda: f"pod removal: {last}")
    cri.wait_gone(pod)


def test_cri_handler_runtime_path(
    version: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A handler's ``runtime_path`` names podshim's shim binary, which is not on
    containerd's PATH: 1.7 and 2.1 run it from there."""
    if version == "1.6":
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                raises=CriError,
                reason="containerd 1.6.20 ignores runtime_path: the shim must be on PATH",
            )
        )
    config = cu.podshim_config(tmp_path / "podshim.toml", tmp_path / "unused")
    shim = os.path.join(su.BIN_DIR, su.SHIM_BINARY)
    handler = RuntimeHandler(su.RUNTIME, {"ConfigPath": str(config)}, runtime_path=shim)
    lab = Containerd(version=version, cri=True, runtimes={cu.PODSHIM: handler})
    crilab: cu.CriLab | None = None
    errors: list[str] = []
    try:
        lab.start()
        lab.ensure_pause()
        busybox = lab.ensure_busybox(namespace=cu.CRI_NAMESPACE)
        runtime_root = lab.state / "podshim-runc"
        cu.podshim_config(config, runtime_root)
        crilab = cu.CriLab(lab, runtime_root, busybox)
        assert lab.pid is not None
        environ = Path(f"/proc/{lab.pid}/environ").read_bytes().split(b"\0")
        path = next(e[5:].decode() for e in environ if e.startswith(b"PATH="))
        assert shutil.which(su.SHIM_BINARY, path=path) is None, f"{su.SHIM_BINARY} on {path}"
        pod, _ = crilab.pod("rpath", cu.PODSHIM, hostname=f"rp-{secrets.token_hex(3)}")
        c = crilab.container(pod, "c", ["sleep", "3600"])
        assert crilab.exec_ok(c.id, "echo", "via-runtime-path").strip() == "via-runtime-path"
    finally:
        errors = cu.close_cri_lab(lab, crilab)
    assert not errors, "lab teardown left things behind:\n" + "\n".join(errors)
