"""A Create whose ttrpc deadline passes while runc works leaves nothing behind (issue 9,
defect 6), through a serving shim: the runtime is a wrapper that makes ``runc create``
slow, the call's deadline is far shorter. The shim lets runc finish, deletes the
container it made (its cgroup with it) and goes on serving.
"""

from __future__ import annotations

import glob
import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.api.runc.options import oci_pb2
from podshim.api.task.v2 import shim_pb2 as pb
from podshim_lab import Containerd, wait_for

if TYPE_CHECKING:
    from tests.integration import shimio as si
    from tests.integration import shimutil as su
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import shimio as si
    import shimutil as su

pytestmark = pytest.mark.timeout(300)

lab = su.module_lab
GROUP = "gcancel"
KEEPER = "cancel-keeper"


@pytest.fixture(scope="module")
def keeper(lab: Containerd) -> Iterator[str]:
    """A grouped task whose shim receives the direct calls; its socket address."""
    with su.containers(lab) as ids:
        ids.append(KEEPER)
        su.run_detached(lab, KEEPER, "sleep", "100000", opts=su.group_opts(GROUP))
        yield su.shim_address(lab, KEEPER)


def _bundle(tmp: Path, cgroup: str) -> Path:
    busybox, runc = shutil.which("busybox"), shutil.which("runc")
    assert busybox and runc
    bundle = tmp / "bundle"
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy(busybox, bundle / "rootfs" / "bin" / "busybox")
    for applet in ("sh", "sleep"):
        (bundle / "rootfs" / "bin" / applet).symlink_to("busybox")
    subprocess.run([runc, "spec"], cwd=bundle, check=True, timeout=60)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sleep", "1000"]
    spec["linux"]["cgroupsPath"] = cgroup
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def test_create_past_its_deadline_leaves_no_container(
    lab: Containerd, keeper: str, tmp_path: Path
) -> None:
    tid = f"cancelled-{secrets.token_hex(3)}"
    cgroup = f"/podshim-t-{secrets.token_hex(4)}"
    bundle = _bundle(tmp_path, cgroup)
    runc = shutil.which("runc")
    slow = tmp_path / "slow-runc"
    slow.write_text(f'#!/bin/sh\ncase " $* " in *" create "*) sleep 2;; esac\nexec {runc} "$@"\n')
    slow.chmod(0o755)
    root = tmp_path / "runc-root"
    opts = oci_pb2.Options(binary_name=str(slow), root=str(root))
    req = pb.CreateTaskRequest(
        id=tid, bundle=str(bundle),
        options=any_pb2.Any(type_url="containerd.runc.v1.Options", value=opts.SerializeToString()),
    )  # fmt: skip

    def left() -> list[str]:
        return glob.glob(f"{root}/*/{tid}") + glob.glob(f"/sys/fs/cgroup/*{cgroup}")

    try:
        with pytest.raises(errdefs.ShimError):  # deadline exceeded (or cancelled)
            si.shim_call(keeper, "Create", req, pb.CreateTaskResponse, timeout=0.5)
        # runc create goes on for ~1.5 s after the deadline: it must be undone once it
        # ended (it used to be left running past an undo that had looked too early)
        wait_for(lambda: not _runc_of(slow) and not left(), timeout=su.DEADLINE)
        subprocess.run(["sleep", "2"], check=True)  # nothing comes back later either
        assert left() == []
        assert not (bundle / "init.pid").exists()
        with pytest.raises(errdefs.NotFound):
            si.shim_call(keeper, "State", pb.StateRequest(id=tid), pb.StateResponse)
        st = si.shim_call(keeper, "State", pb.StateRequest(id=KEEPER), pb.StateResponse)
        assert st.status == 2  # the shim goes on serving its task
    finally:
        if runc is not None:
            subprocess.run([runc, "--root", str(root / lab.namespace), "delete", "--force", tid],
                           capture_output=True, timeout=60)  # fmt: skip
        for path in glob.glob(f"/sys/fs/cgroup/*{cgroup}"):
            subprocess.run(["rmdir", path], capture_output=True, timeout=60)


def _runc_of(wrapper: Path) -> bool:
    """Whether a process still runs the wrapper (the slow runc)."""
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                if str(wrapper).encode() in f.read():
                    return True
        except OSError:
            pass
    return False
