"""``podshim install`` / ``uninstall`` against each containerd line here (1.6 system; 1.7
and 2.1 from scripts/fetch_containerd.sh), on a lab containerd's own config file as the
"main config" (CRI on, CNI, sandbox image, a runc handler with options: what a node has).

For each version: ``containerd config dump`` before and after install differ only by
podshim's tables (on 1.6/1.7 the drop-in must carry the CRI section or the dump loses the
CNI dir, the sandbox image and runc's options); containerd restarted on the installed
config runs a CRI pod on the handler ``podshim`` through the linked shim; uninstall puts
the config back byte for byte and leaves nothing of install.

On 2.x install also adds the handler ``podshim-sb`` (``sandboxer = "shim"``) and makes
``podshim-node`` the proxy plugin ``podshim`` served by ``podshim daemon``, with a
systemd unit for it. There is no systemd here: the test runs the daemon from the unit's
ExecStart line, as systemd would (before containerd restarts), and runs a pod on each of
the three handlers.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from podshim import rundir
from podshim.admin import check, service
from podshim.service.proxystate import ProxyState, home_dir
from podshim_lab import Containerd, wait_for
from podshim_lab.procfs import descendants

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
#: containerd 2.x: the Sandbox API handler, and podshim-node's sandboxer
SANDBOX_HANDLER = "podshim-sb"
PLUGIN = "podshim"
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


class UnitDaemon:
    """``podshim daemon`` run from the ExecStart line of install's unit (no systemd here)."""

    def __init__(self, unit: Path, log: Path) -> None:
        text = unit.read_text()
        self.argv = service.exec_start(text)
        (post,) = [ln for ln in text.splitlines() if ln.startswith("ExecStartPost=")]
        self.post = shlex.split(post.removeprefix("ExecStartPost="))
        assert self.argv[1:4] == ["-m", "podshim.cli", "daemon"], self.argv
        self.socket = self.argv[self.argv.index("--socket") + 1]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stderr=log, start_new_session=True
            )
        proc = self.proc
        # as systemd: the unit counts as started (containerd may start) once this ends
        subprocess.run(self.post, check=True, timeout=cu.DEADLINE)
        assert proc.poll() is None, self.tail()
        wait_for(
            lambda: service.reachable(self.socket) is None,
            timeout=cu.DEADLINE,
            interval=0.1,
            message=lambda: f"the daemon to serve (exit {proc.poll()})\n{self.tail()}",
        )

    def tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-60:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def _pod_on(crilab: cu.CriLab, handler: str, name: str) -> str:
    """A pod on ``handler`` with one container sharing its PID namespace; checked to
    run; stopped and removed (its leftovers checked by the caller)."""
    pod, _ = crilab.pod(name, handler, pid_mode="POD")
    c = crilab.container(pod, "c", ["sleep", "3600"])
    assert crilab.exec_ok(c.id, "echo", "hi").strip() == "hi"
    assert crilab.exec_ok(c.id, "cat", "/proc/1/cmdline").rstrip("\0") == "podshim-init"
    return pod


def test_install_check_pod_uninstall(lab: tuple[Containerd, Path], tmp_path: Path) -> None:
    ctd, bin_dir = lab
    modern = ctd.build.version.startswith("2.")
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
    sock = f"/run/podshim-test-{secrets.token_hex(4)}.sock"  # short: a unix socket path
    paths = ["--config", str(config), "--containerd", binary, "--root", str(root)]
    paths += ["--bin-dir", str(bin_dir), "--daemon-socket", sock]

    # check tells a config changed after containerd started only past its 1 s resolution
    started = check._started_at(ctd.pid or 0)
    assert started is not None
    wait_for(lambda: time.time() > started + 1.5, timeout=10, interval=0.1)
    res = _podshim("install", *paths)
    assert res.returncode == 0, res
    again = _podshim("install", *paths)
    assert again.returncode == 0 and "nothing to change" in again.stdout, again

    after = _dump(binary, config)
    handlers = (*HANDLERS, SANDBOX_HANDLER) if modern else HANDLERS
    added = {h: _runtimes(after).pop(h) for h in handlers}
    unit = root / "etc/systemd/system/podshim-daemon.service"
    if modern:  # the proxy plugin, and nothing else of it in the dump
        proxies = after["proxy_plugins"]
        plugin = proxies.pop(PLUGIN)  # the dump adds its defaults (capabilities, platform)
        assert (plugin["type"], plugin["address"]) == ("sandbox", sock), plugin
        if not proxies and "proxy_plugins" not in before:
            del after["proxy_plugins"]
        assert "systemctl enable --now podshim-daemon.service" in res.stdout, res.stdout
    assert after == before  # nothing but podshim's tables changed
    assert unit.is_file() is modern
    for handler in handlers:
        assert added[handler]["runtime_type"] == "io.containerd.podshim.v1"
    assert added["podshim"]["options"]["ConfigPath"] == str(root / "etc/podshim/config.toml")
    if modern:
        assert added["podshim-node"]["sandboxer"] == PLUGIN
        assert added[SANDBOX_HANDLER]["sandboxer"] == "shim"
        for handler in ("podshim-node", SANDBOX_HANDLER):  # 2.1's CRI: no options table
            assert not added[handler].get("options"), added[handler]
    else:
        node_cfg = added["podshim-node"]["options"]["ConfigPath"]
        assert node_cfg == str(root / "etc/podshim/node.toml")

    assert _check(ctd)["config loaded"]["status"] == "warn"  # not restarted yet
    daemon = UnitDaemon(unit, tmp_path / "daemon.log") if modern else None
    crilab = cu.CriLab(ctd, Path(rundir.runtime_root(ctd.address)), busybox)
    errors: list[str] = []
    try:
        if daemon is not None:
            assert _check(ctd)["handler podshim-node"]["status"] == "warn"  # not running
            daemon.start()  # as systemd would: before containerd (restarts)
        ctd.restart()
        lines = _check(ctd)
        for name in ("containerd running", "CRI plugin", "shim binary", "config loaded"):
            assert lines[name]["status"] == "ok", lines[name]
        for handler in handlers:
            assert lines[f"handler {handler}"]["status"] == "ok", lines[f"handler {handler}"]
        pod = _pod_on(crilab, cu.PODSHIM, "installed")
        assert "podshim" in " ".join(su.cmdline(crilab.shim_pid(pod)))
        pods = [pod]
        if daemon is not None:
            pods.append(_pod_on(crilab, SANDBOX_HANDLER, "installed-sb"))
            node_pod = _pod_on(crilab, "podshim-node", "installed-node")
            pods.append(node_pod)
            assert daemon.proc is not None
            anchor = crilab.cri.pod_status(node_pod).pid
            assert anchor in {s.pid for s in descendants(daemon.proc.pid)}  # the daemon's pod
        for p in pods:
            assert crilab.stop_and_remove(p) == []
            crilab.wait_gone(p)
        if daemon is not None:
            assert daemon.proc is not None
            assert descendants(daemon.proc.pid) == []
            state = ProxyState(home_dir(ctd.address))
            assert not state.tasks() and not state.sandboxes()
    finally:
        errors += crilab.cleanup()
        crilab.cri.close()
        if daemon is not None:
            daemon.stop()
            if os.path.lexists(sock):
                errors.append(f"the daemon left its socket {sock}")
    assert not errors, errors + ([daemon.tail()] if daemon is not None else [])

    res = _podshim("uninstall", *paths)
    assert res.returncode == 0, res
    assert config.read_bytes() == original
    # every directory install made (the root's, the bin dir, conf.d), the unit and the
    # backup are gone
    assert not root.exists() and not bin_dir.exists()
    assert [n for n in MADE if (config.parent / n).exists()] == []
