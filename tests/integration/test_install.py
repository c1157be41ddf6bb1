"""``podshim install`` / ``uninstall`` against each containerd line here (1.6 system; 1.7
and 2.1 from scripts/fetch_containerd.sh), on a lab containerd's own config file as the
"main config" (CRI on, CNI, sandbox image, a runc handler with options: what a node has).

For each version: ``containerd config dump`` before and after install differ only by
podshim's two handler tables (on 1.6/1.7 the drop-in must carry the CRI section or the
dump loses the CNI dir, the sandbox image and runc's options); containerd restarted on
the installed config runs a CRI pod on the handler ``podshim`` through the linked shim;
uninstall puts the config back byte for byte and leaves nothing of install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from podshim import rundir
from podshim.admin import check
from podshim_lab import Containerd, wait_for

if TYPE_CHECKING:
    from tests.integration import criutil as cu
    from tests.integration import matrix
    from tests.integration import shimutil as su
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criutil as cu
    import matrix
    import shimutil as su

pytestmark = pytest.mark.timeout(300)

VERSIONS = [matrix.selected()] if matrix.selected() else ["1.6", *matrix.NEWER]
PODSHIM_CLI = str(Path(sys.executable).parent / "podshim")
HANDLERS = ("podshim", "podshim-node")
SHIM = "containerd-shim-podshim-v1"
#: what install adds next to the main config (uninstall must take all of it away)
MADE = ("conf.d", "config.toml.before-podshim")


def _dump(binary: str, config: Path) -> dict[str, Any]:
    res = subprocess.run(
        [binary, "--config", str(config), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    table = tomllib.loads(res.stdout)
    table.pop("imports", None)  # 1.x lists the main file too; compared on the file itself
    return table


def _runtimes(table: dict[str, Any]) -> dict[str, Any]:
    plugin = (
        "io.containerd.cri.v1.runtime" if table.get("version") == 3 else "io.containerd.grpc.v1.cri"
    )
    runtimes: dict[str, Any] = table["plugins"][plugin]["containerd"]["runtimes"]
    return runtimes


def _podshim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODSHIM_CLI, *args], capture_output=True, text=True, timeout=120, check=False
    )


def _check(ctd: Containerd) -> dict[str, dict[str, str]]:
    res = _podshim("check", "--address", ctd.address, "--json")
    assert res.returncode == 0, res
    return {r["name"]: r for r in json.loads(res.stdout)}


@pytest.fixture(params=VERSIONS)
def lab(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Containerd, Path]]:
    """A CRI lab of one version whose PATH has ``<tmp>/bin`` (empty until install links
    the shim there) and no other directory with podshim's shim binary."""
    version = matrix.require(str(request.param))
    bin_dir = tmp_path / "bin"
    path = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d]
    keep = [d for d in path if not os.path.exists(os.path.join(d, SHIM))]
    monkeypatch.setenv("PATH", os.pathsep.join(keep))  # the lab's containerd inherits it
    lab = Containerd(cri=True, version=version, extra_path=[str(bin_dir)])
    try:
        yield lab, bin_dir
    finally:
        errors = cu.close_cri_lab(lab, None)
        assert not errors, "lab teardown left things behind:\n" + "\n".join(errors)


def test_install_check_pod_uninstall(lab: tuple[Containerd, Path], tmp_path: Path) -> None:
    ctd, bin_dir = lab
    assert shutil.which(SHIM) is None  # containerd finds the shim only once installed
    ctd.start()
    ctd.ensure_pause()
    busybox = ctd.ensure_busybox(namespace=cu.CRI_NAMESPACE)
    binary = shutil.which(ctd.containerd_bin)
    assert binary is not None
    config = ctd.paths.config
    original = config.read_bytes()
    before = _dump(binary, config)
    root = tmp_path / "root"
    paths = ["--config", str(config), "--containerd", binary, "--root", str(root)]
    paths += ["--bin-dir", str(bin_dir)]

    # check tells a config changed after containerd started only past its 1 s resolution
    started = check._started_at(ctd.pid or 0)
    assert started is not None
    wait_for(lambda: time.time() > started + 1.5, timeout=10, interval=0.1)
    res = _podshim("install", *paths)
    assert res.returncode == 0, res
    again = _podshim("install", *paths)
    assert again.returncode == 0 and "nothing to change" in again.stdout, again

    after = _dump(binary, config)
    added = {h: _runtimes(after).pop(h) for h in HANDLERS}
    assert after == before  # nothing but the two handler tables changed
    for handler, name in zip(HANDLERS, ("config.toml", "node.toml"), strict=True):
        assert added[handler]["runtime_type"] == "io.containerd.podshim.v1"
        assert added[handler]["options"]["ConfigPath"] == str(root / "etc/podshim" / name)

    assert _check(ctd)["config loaded"]["status"] == "warn"  # not restarted yet
    ctd.restart()
    lines = _check(ctd)
    for name in ("containerd running", "CRI plugin", "shim binary", "config loaded"):
        assert lines[name]["status"] == "ok", lines[name]
    for name in ("handler podshim", "handler podshim-node"):
        assert lines[name]["status"] == "ok", lines[name]
    crilab = cu.CriLab(ctd, Path(rundir.runtime_root(ctd.address)), busybox)
    try:
        pod, _ = crilab.pod("installed", cu.PODSHIM, pid_mode="POD")
        c = crilab.container(pod, "c", ["sleep", "3600"])
        assert crilab.exec_ok(c.id, "echo", "hi").strip() == "hi"
        assert "podshim" in " ".join(su.cmdline(crilab.shim_pid(pod)))
        assert crilab.stop_and_remove(pod) == []
        crilab.wait_gone(pod)
    finally:
        errors = crilab.cleanup()
        crilab.cri.close()
    assert not errors, errors

    res = _podshim("uninstall", *paths)
    assert res.returncode == 0, res
    assert config.read_bytes() == original
    # every directory install made (the root's, the bin dir, conf.d) and the backup are gone
    assert not root.exists() and not bin_dir.exists()
    assert [n for n in MADE if (config.parent / n).exists()] == []
