"""critest's volume, mount propagation and read-only mount specs (``container.go``,
``container_linux.go``) through CRI on podshim and, in the same test, on runc.

The host side makes its own bind mounts below the test's temporary directory (as
critest does below its own) and removes them, recursively and lazily, whatever happens.
Recursive read-only mounts are not covered: containerd 1.6's CRI has no such field (the
suite skips those specs on runtimes that do not announce the feature).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim import mountinfo
from podshim_lab.cri.client import api

if TYPE_CHECKING:
    from tests.integration import criutil as cu
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criutil as cu

# the fixtures: one CRI containerd per module, per-test cleanup checks
cri_lab = cu.cri_lab
cri = cu.cri

HANDLERS = pytest.mark.parametrize("handler", [cu.PODSHIM, cu.RUNC])
SLEEP = ["sleep", "3600"]


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _mounted_below(path: Path) -> list[str]:
    root = str(path)
    return [m.mountpoint for m in mountinfo.read() if m.mountpoint.startswith(root + "/")]


@contextlib.contextmanager
def _host_mounts(base: Path) -> Iterator[Path]:
    """``base``, created; every mount made below it is lazily unmounted afterwards."""
    base.mkdir()
    try:
        yield base
    finally:
        for point in sorted(_mounted_below(base), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
        assert not _mounted_below(base), f"mounts left below {base}: {_mounted_below(base)}"


def _run(cri: cu.CriLab, pod: str, config: api.ContainerConfig) -> cu.ContainerInfo:
    return cri.start(pod, cri.create_config(pod, config))


# -- volumes (container.go) ------------------------------------------------------------------


@HANDLERS
def test_volume_and_symlinked_volume(cri: cu.CriLab, handler: str, tmp_path: Path) -> None:
    host = tmp_path / "volume"
    host.mkdir()
    (host / "flagFile").write_text("flag\n")
    link = tmp_path / "link"
    link.symlink_to(host)
    pod, _ = cri.pod("volume", handler, pid_mode="POD")
    for path in (host, link):
        config = cri.container_config(pod, f"vol-{path.name}", SLEEP)
        config.mounts.add(host_path=str(path), container_path=str(path))
        c = _run(cri, pod, config)
        assert cri.exec_ok(c.id, "ls", "-A", str(path)).split() == ["flagFile"]


# -- mount propagation (container_linux.go) ---------------------------------------------------

PROPAGATIONS = {
    "rprivate": api.PROPAGATION_PRIVATE,
    "rslave": api.PROPAGATION_HOST_TO_CONTAINER,
    "rshared": api.PROPAGATION_BIDIRECTIONAL,
}


@HANDLERS
@pytest.mark.parametrize("mode", list(PROPAGATIONS))
def test_mount_propagation(cri: cu.CriLab, handler: str, mode: str, tmp_path: Path) -> None:
    propagation = PROPAGATIONS[mode]
    config = cri.pod_config("propagation", pid_mode="POD")
    config.linux.security_context.privileged = True
    pod = cri.run_pod(config, handler)
    with _host_mounts(tmp_path / "hostpath") as base:
        source, point = base / "mnt", base / "mnt" / "propagationMnt"
        flags = base / "propagationSrcDir"
        point.mkdir(parents=True)
        flags.mkdir()
        (flags / "flagFile").write_text("")
        _mount("--bind", str(source), str(source))
        _mount("--make-rprivate" if mode == "rprivate" else "--make-rshared", str(source))

        ctr = cri.container_config(pod, f"prop-{mode}", SLEEP)
        ctr.linux.security_context.privileged = True
        ctr.mounts.add(host_path=str(source), container_path=str(source), propagation=propagation)
        cid = cri.create_config(pod, ctr)
        mounts = cri.cri.container_status(cid).raw.status.mounts
        assert len(mounts) == 1, mounts
        got = mounts[0]
        assert (got.container_path, got.host_path) == (str(source), str(source))
        assert not got.readonly and not got.selinux_relabel
        assert got.propagation == propagation
        cri.start(pod, cid)

        # host -> container
        _mount("--bind", str(flags), str(point))
        seen = cri.exec_ok(cid, "ls", "-A", str(point)).split()
        assert seen == ([] if mode == "rprivate" else ["flagFile"]), (mode, seen)

        # container -> host
        inner = source / "containerMntPoint"
        cri.exec_ok(cid, "mkdir", "-p", str(inner))
        cri.exec_ok(cid, "mount", "--bind", "/etc", str(inner))
        seen = sorted(os.listdir(inner))
        if mode == "rshared":
            assert "passwd" in seen, seen
        else:
            assert seen == [], (mode, seen)


# -- read-only mounts (container_linux.go) ----------------------------------------------------


@HANDLERS
def test_readonly_mount_is_not_recursive(cri: cu.CriLab, handler: str, tmp_path: Path) -> None:
    config = cri.pod_config("readonly", pid_mode="POD")
    config.linux.security_context.privileged = True
    pod = cri.run_pod(config, handler)
    with _host_mounts(tmp_path / "hostpath") as base:
        (base / "tmpfs").mkdir()
        _mount("-t", "tmpfs", "none", str(base / "tmpfs"))
        ctr = cri.container_config(pod, "ro", SLEEP)
        ctr.mounts.add(host_path=str(base), container_path="/mnt", readonly=True)
        cid = cri.create_config(pod, ctr)
        status = cri.cri.container_status(cid).raw.status
        assert [(m.container_path, m.readonly) for m in status.mounts] == [("/mnt", True)]
        cri.start(pod, cid)

        res = cri.exec(cid, "touch", "/mnt/file")
        assert res.exit_code != 0 and "Read-only file system" in res.stderr, res
        # critest's non-recursive spec: a mount below the read-only one stays writable
        cri.exec_ok(cid, "touch", "/mnt/tmpfs/file")
        assert (base / "tmpfs" / "file").exists()
        assert not (base / "file").exists()
