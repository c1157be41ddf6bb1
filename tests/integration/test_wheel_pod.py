"""podshim as a user installs it: the wheel alone in a fresh venv runs a CRI pod whose
containers share the pod's PID namespace (CRI's default for Kubernetes pods), with the
``podshim-init`` that the build compiled into the wheel; ``ctr run`` on it; ``podshim
check`` from it exits 0; one version everywhere (``podshim version``, the shim's ``-v``
and its Connect answer, the distribution's metadata, the launcher's compiled-in version:
all ``podshim.__version__``); and ``podshim demo`` runs from ``podshim[lab]``.

``scripts/test.sh`` leaves the venvs that ``scripts/check_wheel.sh`` made in
``$PODSHIM_WHEEL_VENV`` and ``$PODSHIM_WHEEL_LAB_VENV`` (see wheelutil.py); run alone,
this module builds them itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim import __version__
from podshim.api.task.v2 import shim_pb2
from podshim.ttrpc.client import call_sync
from podshim_lab import Containerd, wait_for
from podshim_lab.procfs import read_stat

if TYPE_CHECKING:
    from tests.integration import criprocs as cp
    from tests.integration import criutil as cu
    from tests.integration import shimutil as su
    from tests.integration import wheelutil
else:
    import criprocs as cp
    import criutil as cu
    import shimutil as su
    import wheelutil



@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> wheelutil.Built:
    return wheelutil.built(tmp_path_factory)


@pytest.fixture(scope="module")
def wheel_venv(built: wheelutil.Built) -> Path:
    return built.venv


def _clean_env() -> dict[str, str]:
    """This process's environment without what would make the dev venv importable."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


def _run(*argv: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False,
        env=_clean_env(), cwd="/",
    )  # fmt: skip


@pytest.fixture(scope="module")
def cri_lab(wheel_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[cu.CriLab]:
    """The CRI lab, its podshim handler's shim taken from the wheel's venv."""
    cu._need_busybox()
    lab, crilab = cu.open_cri_lab(
        tmp_path_factory.mktemp("wheel-cri"), str(wheel_venv / "bin"), shim_pythonpath=False
    )
    try:
        yield crilab
    finally:
        errors = cu.close_cri_lab(lab, crilab)
        assert not errors, "CRI lab teardown left things behind:\n" + "\n".join(errors)


cri = cu.cri  # per test: its pods stopped, removed and checked gone


def test_shared_pid_pod_from_the_wheel(cri: cu.CriLab, wheel_venv: Path) -> None:
    assert not wheel_venv.resolve().is_relative_to(Path(sys.prefix).resolve()), "not separate"
    pod, _ = cri.pod("wheelpod", cu.PODSHIM, hostname="wheelpod", pid_mode="POD")
    one = cri.container(pod, "one", ["sleep", "3601"])
    two = cri.container(pod, "two", ["sleep", "3602"])

    # the shim is the wheel venv's Python running the wheel's podshim
    shim = cri.shim_pid(pod)
    argv = Path(f"/proc/{shim}/cmdline").read_bytes().split(b"\0")
    assert argv[0].decode().startswith(str(wheel_venv)), argv
    # the PID init is the program the build put into the installed package
    shim_inits = wait_for(
        lambda: [s for s in cri.inits() if s.ppid == shim and s.state != "Z"] or None,
        timeout=cu.DEADLINE,
        message=f"the {cu.INIT_COMM} of pod {pod}",
    )
    assert len(shim_inits) == 1, cp.describe(shim_inits)
    exe = os.readlink(f"/proc/{shim_inits[0].pid}/exe")
    site = f"{wheel_venv}/lib/python{sys.version_info.major}.{sys.version_info.minor}"
    assert exe == f"{site}/site-packages/podshim/host/namespaces/podshim-init", exe
    assert (
        cp.ns_of(one.pid, "pid") == cp.ns_of(two.pid, "pid") == cp.ns_of(shim_inits[0].pid, "pid")
    )
    assert "sleep 3602" in cri.exec_ok(one.id, "ps")
    assert read_stat(one.pid) is not None


@pytest.fixture(scope="module")
def ctr_lab(wheel_venv: Path) -> Iterator[Containerd]:
    """A plain lab containerd whose podshim is the wheel venv's (no PYTHONPATH)."""
    lab = su.open_lab(extra_path=[str(wheel_venv / "bin")], shim_pythonpath=False)
    try:
        yield lab
    finally:
        su.close_lab(lab)


def test_ctr_run_and_one_version_everywhere(ctr_lab: Containerd, wheel_venv: Path) -> None:
    """``ctr run`` on the wheel's podshim; every place that shows podshim's version shows
    ``__version__``: ``podshim version``, the shim's ``-v`` (the launcher, then the Python
    shim), its Connect answer, the installed distribution, the launcher's own copy."""
    out = su.run(ctr_lab, "wheel-rm", "echo", "hello from the wheel")
    assert out.returncode == 0 and out.stdout.strip() == "hello from the wheel", out
    cid = "wheel-connect"
    su.run_detached(ctr_lab, cid, "sleep", "300")
    try:
        path = su.shim_address(ctr_lab, cid).removeprefix("unix://")
        connect = call_sync(
            path, "containerd.task.v2.Task", "Connect", shim_pb2.ConnectRequest(id=cid),
            shim_pb2.ConnectResponse, metadata=(("containerd-namespace-ttrpc", ctr_lab.namespace),),
            timeout=su.DEADLINE,
        )  # fmt: skip
        exe = Path(os.readlink(f"/proc/{connect.shim_pid}/exe")).resolve()
        argv0 = su.cmdline(connect.shim_pid)[0]
        assert argv0.startswith(str(wheel_venv)) or exe.is_relative_to(wheel_venv), (argv0, exe)
        shown = {"Connect": connect.version.removeprefix("podshim ")}
    finally:
        su.remove_container(ctr_lab, cid)
    version = _run(wheel_venv / "bin" / "podshim", "version")
    assert version.stdout.startswith("podshim "), version
    shown["podshim version"] = version.stdout.split()[-1]
    dash_v = _run(wheel_venv / "bin" / "containerd-shim-podshim-v1", "-v")
    assert "Version: " in dash_v.stdout, dash_v
    shown["-v"] = dash_v.stdout.split("Version: ")[1].split()[0]
    meta = _run(
        wheel_venv / "bin" / "python", "-c", "import importlib.metadata as m; print(m.version('podshim'))"
    )
    shown["metadata"] = meta.stdout.strip()
    launcher = (wheel_venv / "bin" / "containerd-shim-podshim-v1").read_bytes()
    compiled = re.search(rb"podshim-start-settings 1 ([^ \0]+) node ", launcher)
    assert compiled is not None, "no version compiled into the launcher"
    shown["launcher"] = compiled.group(1).decode()
    assert shown == dict.fromkeys(shown, __version__), shown


def test_podshim_check_from_the_wheel(ctr_lab: Containerd, wheel_venv: Path) -> None:
    res = _run(wheel_venv / "bin" / "podshim", "check", "--address", ctr_lab.address, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = {r["name"]: r for r in json.loads(res.stdout)}
    assert lines["podshim-init"]["status"] == "ok", lines["podshim-init"]
    assert lines["podshim-init"]["detail"].startswith(str(wheel_venv)), lines["podshim-init"]
    assert lines["containerd running"]["status"] == "ok", lines["containerd running"]


def test_demo_from_podshim_lab_extra(built: wheelutil.Built) -> None:
    """``pip install --find-links DIST 'podshim[lab]'`` (check_wheel.sh made that venv)
    runs the demo: a pod through CRI on the venv's own podshim."""
    lab_venv = built.lab_venv
    assert _run(lab_venv / "bin" / "python", "-c", "import grpc").returncode == 0
    res = _run(lab_venv / "bin" / "podshim", "demo", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"podshim {__version__} demo" in res.stdout, res.stdout[-2000:]
