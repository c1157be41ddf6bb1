"""podshim as a user installs it: the wheel alone in a fresh venv runs a CRI pod whose
containers share the pod's PID namespace (CRI's default for Kubernetes pods), with the
``podshim-init`` that the build compiled into the wheel.

``scripts/test.sh`` leaves the venv that ``scripts/check_wheel.sh`` made from the wheel
in ``$PODSHIM_WHEEL_VENV``; run alone, this module builds one itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim_lab import wait_for
from podshim_lab.procfs import read_stat

if TYPE_CHECKING:
    from tests.integration import criprocs as cp
    from tests.integration import criutil as cu
else:
    import criprocs as cp
    import criutil as cu

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("PODSHIM_WHEEL_VENV")
    if given and (Path(given) / "bin" / "containerd-shim-podshim-v1").exists():
        return Path(given)
    venv = tmp_path_factory.mktemp("wheel") / "venv"
    env = {**os.environ, "PODSHIM_WHEEL_VENV": str(venv)}
    subprocess.run(["bash", str(REPO / "scripts" / "check_wheel.sh")], check=True, env=env)
    return venv


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
