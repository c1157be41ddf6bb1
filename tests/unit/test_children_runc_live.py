"""A Create cancelled while the real runc works leaves nothing (issue 9, defect 6).

Root only: real runc, a busybox bundle, a cgroup of its own. The call is cancelled at
several points after ``runc create`` was spawned; when the CancelledError arrives there
is no runc container, no cgroup, no process and no file this Create wrote. (It used to
be cancelled under runc's feet: runc went on creating after the undo had looked.)
"""

from __future__ import annotations

import asyncio
import ctypes
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from podshim.linux.reaper import Reaper, set_child_subreaper
from podshim.oci.runc import Runc
from podshim.oci.runtime import RuntimeConfig
from podshim.task.container import Container
from podshim.task.contract import ShimContext

from .fakes import RecordingPublisher
from .test_children_cancel import _children

RUNC = shutil.which("runc")
BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or RUNC is None or BUSYBOX is None, reason="needs root, runc, busybox"
)


class Bundle:
    def __init__(self, tmp: Path) -> None:
        self.tag = secrets.token_hex(4)
        self.cgroup = f"/podshim-t-{self.tag}"
        self.root = tmp / "runc-root"
        self.dir = tmp / "bundle"
        rootfs = self.dir / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        assert BUSYBOX is not None
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in ("sh", "sleep"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        assert RUNC is not None
        subprocess.run([RUNC, "spec"], cwd=self.dir, check=True, timeout=60)
        spec = json.loads((self.dir / "config.json").read_text())
        spec["process"]["terminal"] = False
        spec["process"]["args"] = ["sleep", "1000"]
        spec["linux"]["cgroupsPath"] = self.cgroup
        (self.dir / "config.json").write_text(json.dumps(spec))
        self.spec = spec

    def runc(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        assert RUNC is not None
        return subprocess.run([RUNC, "--root", str(self.root / "ns"), *args],
                              capture_output=True, timeout=60)  # fmt: skip

    def cgroups(self) -> list[str]:
        return glob.glob(f"/sys/fs/cgroup/*{self.cgroup}") + glob.glob(
            f"/sys/fs/cgroup/unified{self.cgroup}"
        )


@pytest.fixture
def bundle(tmp_path: Path) -> Iterator[Bundle]:
    before = _children()
    set_child_subreaper()
    b = Bundle(tmp_path)
    try:
        yield b
    finally:
        ctypes.CDLL(None, use_errno=True).prctl(36, 0, 0, 0, 0)
        b.runc("delete", "--force", "c1")  # what a failing test left: ours only
        for pid in _children() - before:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for path in b.cgroups():
            try:
                os.rmdir(path)
            except OSError:
                pass


def _runc_running() -> bool:
    for pid in _children():
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().startswith("runc"):
                    return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("when", ["spawned", "state"])
def test_create_cancelled_mid_runc_leaves_nothing(bundle: Bundle, when: str) -> None:
    """Cancelled once runc runs, or once it has written its state directory."""
    before = _children()
    state = bundle.root / "ns" / "c1"

    def reached() -> bool:
        return _runc_running() and (when == "spawned" or state.exists())

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        assert RUNC is not None
        cfg = RuntimeConfig(binary=RUNC, root=str(bundle.root))
        runc = Runc(cfg, "ns", reaper, str(bundle.dir / "log.json"))
        c = Container(ShimContext("ns", reaper, RecordingPublisher()), "c1",
                      str(bundle.dir), bundle.spec, [], runc,
                      terminal=False, stdin="", stdout="", stderr="")  # fmt: skip
        task = asyncio.ensure_future(c.create())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not reached() and not task.done() and loop.time() < deadline:
            await asyncio.sleep(0)
        if task.done():  # runc was quicker than this loop: nothing to show this time
            await c.delete("")
            pytest.skip("runc create ended before the cancel point")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # at once, with nothing to wait for:
        assert not (bundle.root / "ns" / "c1").exists()
        assert bundle.cgroups() == []
        assert _children() - before == set()
        assert not (bundle.dir / "init.pid").exists()
        assert not (bundle.dir / "podshim-runtime.json").exists()
        reaper.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
    assert bundle.runc("list", "-q").stdout.split() == []
