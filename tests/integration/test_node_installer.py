"""The node installer of ``deploy/`` without Kubernetes: the bundle the installer image
holds, built by the same ``deploy/build_bundle.py`` from the runtime wheel, and the
image's exact entrypoint (``<bundle>/bin/podshim node-install``, as the DaemonSet runs it)
against a private containerd whose config and bin dir live under a temporary root
standing in for the host (``--root``; the host's ``/`` is this machine's, so
``--host-root /``). The host commands run through ``nsenter`` as in the pod, into this
test's own namespaces (``--host-pid``; the DaemonSet's default, pid 1, is this sandbox's
init here, which may not be entered; the test process shares the host's namespaces).

install: the bundle is copied to ``<root>/opt/podshim/<version>``; ``podshim check`` from
that copy passes; after containerd's restart a CRI pod on the handler ``podshim`` runs on
a shim that is the relocated copy (its interpreter, its podshim-init: /proc/<pid>/exe);
an upgrade (the next version's bundle) while the pod runs moves the link and keeps the old
copy, which the next run removes once the pod is gone; ``--cleanup``: containerd's config
back byte for byte, ``<root>/opt`` and the link gone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim import __version__, rundir
from podshim.admin import check, node
from podshim_lab import Containerd, wait_for

if TYPE_CHECKING:
    from tests.integration import criutil as cu
    from tests.integration import matrix, wheelutil
    from tests.integration import shimutil as su
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criutil as cu
    import matrix
    import shimutil as su
    import wheelutil

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parents[2]
SHIM = "containerd-shim-podshim-v1"
NEWER = f"{__version__}.post1"  # an upgrade's version directory
PY = f"python{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installer image's bundle, built where the image would hold it (a tmp dir)."""
    wheel = wheelutil.built(tmp_path_factory).wheel
    out = tmp_path_factory.mktemp("image") / "opt" / "podshim-bundle"
    subprocess.run(
        [sys.executable, str(REPO / "deploy" / "build_bundle.py"), "--wheel", str(wheel),
         "--out", str(out)],
        check=True, timeout=300,
    )  # fmt: skip
    return out


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Containerd, Path]]:
    """A CRI lab whose config is under ``<root>/etc/containerd`` and whose PATH has
    ``<root>/usr/local/bin`` (empty until install links the shim there) and no other
    directory with podshim's shim binary."""
    root = tmp_path / "root"
    bin_dir = root / "usr" / "local" / "bin"
    etc = root / "etc" / "containerd"
    etc.mkdir(parents=True)
    path = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d]
    keep = [d for d in path if not os.path.exists(os.path.join(d, SHIM))]
    monkeypatch.setenv("PATH", os.pathsep.join(keep))  # the lab's containerd inherits it
    lab = Containerd(
        etc, cri=True, version=matrix.matrix_version(), extra_path=[str(bin_dir)],
        shim_pythonpath=False, extra_env={"PODSHIM_ZYGOTE_IDLE": "3"},
    )  # fmt: skip
    try:
        yield lab, root
    finally:
        errors = cu.close_cri_lab(lab, None)
        assert not errors, "lab teardown left things behind:\n" + "\n".join(errors)


def _node_install(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        [str(bundle / "bin" / "podshim"), "node-install", *args],
        capture_output=True, text=True, timeout=240, check=False, env=env,
    )  # fmt: skip


def _next_version(bundle: Path, image: Path) -> Path:
    """The same bundle as the next version (what the next image would hold): labelled
    so, its ``podshim.__version__`` and its launcher's compiled-in version bumped, as a
    real upgrade's are (both key the zygote and the node daemons)."""
    newer = image / "opt" / "podshim-bundle"
    shutil.copytree(bundle, newer, symlinks=True)
    info = json.loads((newer / "podshim-bundle.json").read_text())
    (newer / "podshim-bundle.json").write_text(json.dumps({**info, "podshim": NEWER}))
    (init,) = newer.glob("lib/python3*/site-packages/podshim/__init__.py")
    text = init.read_text()
    assert f'__version__ = "{__version__}"' in text
    init.write_text(text.replace(f'__version__ = "{__version__}"', f'__version__ = "{NEWER}"'))
    for cached in init.parent.glob("__pycache__/__init__.*"):
        cached.unlink()
    shim_dir = REPO / "src" / "podshim" / "shim"
    launcher = newer / "bin" / "containerd-shim-podshim-v1"
    sources = [str(shim_dir / f) for f in ("launcher.c", "launcher_zygote.c", "launcher_sha256.c")]
    subprocess.run(
        ["cc", "-O2", f'-DPODSHIM_VERSION="{NEWER}"', "-o", str(launcher), *sources],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return newer


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_node_install_pod_upgrade_cleanup(
    host: tuple[Containerd, Path], bundle: Path, tmp_path: Path
) -> None:
    ctd, root = host
    newer = _next_version(bundle, tmp_path / "image2")
    ctd.start()
    ctd.ensure_pause()
    busybox = ctd.ensure_busybox(namespace=cu.CRI_NAMESPACE)
    binary = shutil.which(ctd.containerd_bin)
    assert binary is not None
    config = ctd.paths.config
    assert config.is_relative_to(root)
    original = config.read_bytes()
    before = _tree(root)
    args = ["--host-root", "/", "--host-pid", str(os.getpid()), "--root", str(root)]
    args += ["--address", ctd.address]
    args += ["--config", str(config), "--containerd", binary]
    # check tells a config changed after containerd started only past its 1 s resolution
    started = check._started_at(ctd.pid or 0)
    assert started is not None
    wait_for(lambda: time.time() > started + 1.5, timeout=10, interval=0.1)

    res = _node_install(bundle, *args)
    assert res.returncode == 0, res.stdout + res.stderr
    prefix = root / "opt" / "podshim"
    copy = prefix / __version__
    assert os.readlink(prefix / "current") == __version__
    assert json.loads((copy / "podshim-bundle.json").read_text())["podshim"] == __version__
    link = root / "usr" / "local" / "bin" / SHIM
    assert os.readlink(link) == str(copy / "bin" / SHIM)
    assert f"{copy}/bin/podshim check --address {ctd.address}" in res.stdout, res.stdout
    again = _node_install(bundle, *args)  # idempotent: the same bundle is kept
    assert again.returncode == 0 and "this bundle is there already" in again.stdout, again
    assert "nothing to change" in again.stdout, again

    ctd.restart()
    checked = subprocess.run(
        [str(prefix / "current" / "bin" / "podshim"), "check", "--address", ctd.address,
         "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked
    lines = {r["name"]: r for r in json.loads(checked.stdout)}
    for name in ("shim binary", "config loaded", "handler podshim", "podshim-init"):
        assert lines[name]["status"] == "ok", lines[name]
    assert lines["podshim-init"]["detail"].startswith(str(copy)), lines["podshim-init"]

    crilab = cu.CriLab(ctd, Path(rundir.runtime_root(ctd.address)), busybox)
    try:
        pod, _ = crilab.pod("relocated", cu.PODSHIM, pid_mode="POD")
        c = crilab.container(pod, "c", ["sleep", "3600"])
        assert crilab.exec_ok(c.id, "echo", "hi").strip() == "hi"
        shim = crilab.shim_pid(pod)
        # the shim is the relocated copy's interpreter, not this venv's nor the bundle's
        assert os.readlink(f"/proc/{shim}/exe") == str(copy / "bin" / PY)
        inits = wait_for(
            lambda: [s for s in crilab.inits() if s.ppid == shim and s.state != "Z"] or None,
            timeout=cu.DEADLINE,
            message=f"the {cu.INIT_COMM} of pod {pod}",
        )
        assert os.readlink(f"/proc/{inits[0].pid}/exe").startswith(f"{copy}/lib/"), inits

        # an upgrade (the next image's bundle) while the pod runs: the link moves to the
        # new copy, the old one stays while the pod's shim runs from it
        res = _node_install(newer, *args)
        assert res.returncode == 0, res.stdout + res.stderr
        assert os.readlink(link) == str(prefix / NEWER / "bin" / SHIM)
        assert os.readlink(prefix / "current") == NEWER
        assert f"keep {copy}: in use by pids" in res.stdout, res.stdout
        assert crilab.exec_ok(c.id, "echo", "still").strip() == "still"
        # a pod started after the upgrade
        pod2, _ = crilab.pod("upgraded", cu.PODSHIM, pid_mode="POD")
        crilab.container(pod2, "c", ["sleep", "3600"])
        shim2 = crilab.shim_pid(pod2)
        new_exe = os.readlink(f"/proc/{shim2}/exe")
        for p, pid in ((pod, shim), (pod2, shim2)):
            assert crilab.stop_and_remove(p) == []
            crilab.wait_gone(p)
            su.wait_gone(pid, what=f"the shim of {p}")
    finally:
        errors = crilab.cleanup()
        crilab.cri.close()
    assert not errors, errors
    # the old version drains: its zygote leaves once idle (PODSHIM_ZYGOTE_IDLE)
    wait_for(lambda: not node.in_use(str(copy)), timeout=cu.DEADLINE, message=f"{copy} unused")
    res = _node_install(newer, *args)  # the old copy drained: now it goes
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"removed {copy} (no process runs from it)" in res.stdout, res.stdout
    assert sorted(os.listdir(prefix)) == sorted([".podshim-created-dirs.json", NEWER, "current"])

    res = _node_install(newer, "--cleanup", *args)
    assert res.returncode == 0, res.stdout + res.stderr
    assert config.read_bytes() == original
    assert not (root / "opt").exists() and not os.path.lexists(link)
    # what install made under the root is gone (the lab's own files aside)
    assert _tree(root) - before - {str(p.relative_to(root)) for p in ctd.paths.scratch.rglob("*")} == set()
    # the pod started after the upgrade runs the new code (zygotes are keyed by version)
    assert new_exe == str(prefix / NEWER / "bin" / PY)
