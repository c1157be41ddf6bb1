"""podshim install on containerd 2.x: the handler podshim-sb, podshim-node as the proxy
plugin ``podshim`` with the systemd unit of its daemon (all in the manifest, undone by
uninstall), the fallback without grpcio, the plugin name taken, what 1.6/1.7 get; the
systemctl calls (a fake systemctl); podshim check on a proxy-plugin handler."""

from __future__ import annotations

import os
import socket
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from podshim.admin import check, install, service, uninstall
from podshim.admin import cli as admin_cli
from podshim.admin import manifest as mf
from podshim.admin.ctdconfig import ContainerdBinary
from podshim.admin.errors import AdminError
from tests.unit.admin_fakes import MAIN_V2, MAIN_V3, node, quiet, tree

CRI = "io.containerd.grpc.v1.cri"
CRI3 = "io.containerd.cri.v1.runtime"
RTYPE = "io.containerd.podshim.v1"
ADDRESS = "/run/test-containerd/containerd.sock"


def _load(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def _node_2x(tmp_path: Path, main: str = MAIN_V3, version: str = "2.1.9") -> install.Options:
    """A 2.x node whose containerd's ``config dump`` names its gRPC address."""
    opts = node(tmp_path, version, main)
    Path(opts.containerd).write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --version ] && {{ echo "containerd containerd v{version} x"; exit 0; }}\n'
        f"printf '[grpc]\\n  address = \"{ADDRESS}\"\\n'\n"
    )
    return opts


def _runtimes(opts: install.Options, plugin: str = CRI3) -> dict[str, Any]:
    runtimes: dict[str, Any] = _load(opts.dropin)["plugins"][plugin]["containerd"]["runtimes"]
    return runtimes


def test_2x_adds_podshim_sb_the_proxy_plugin_and_the_daemons_unit(tmp_path: Path) -> None:
    opts = _node_2x(tmp_path)
    before = tree(tmp_path)
    plan = install.run(opts, dry_run=False, report=quiet)

    runtimes = _runtimes(opts)
    assert set(runtimes) == {"podshim", "podshim-node", "podshim-sb"}
    assert runtimes["podshim-sb"] == {  # no options table: 2.1's CRI fails StartContainer
        "runtime_type": RTYPE,
        "runtime_path": opts.link,
        "sandboxer": "shim",
    }
    assert runtimes["podshim-node"] == {"runtime_type": RTYPE, "sandboxer": "podshim"}
    assert runtimes["podshim"]["options"] == {
        "ConfigPath": os.path.join(opts.podshim_dir, "config.toml")
    }
    assert opts.daemon_socket == str(tmp_path / "root/run/podshim/sandbox.sock")
    assert _load(opts.dropin)["proxy_plugins"] == {
        "podshim": {"type": "sandbox", "address": opts.daemon_socket}
    }
    daemon_cfg = os.path.join(opts.podshim_dir, "daemon.toml")
    assert _load(daemon_cfg) == {}  # comments only: the daemon's defaults
    assert not os.path.exists(os.path.join(opts.podshim_dir, "node.toml"))

    unit = Path(opts.unit)
    assert unit == tmp_path / "root/etc/systemd/system/podshim-daemon.service"
    text = unit.read_text()
    assert text.startswith("# written by podshim install\n")
    assert "\nBefore=containerd.service\n" in text and "\nKillMode=process\n" in text
    assert "\nWantedBy=containerd.service\n" in text
    # started means serving: containerd (ordered after) starts once the socket is there
    assert f"\nExecStartPost=/bin/sh -c 'until test -S {opts.daemon_socket}; do" in text
    argv = [sys.executable, "-m", "podshim.cli", "daemon", "--address", ADDRESS,
            "--socket", opts.daemon_socket, "--config", daemon_cfg]  # fmt: skip
    assert service.exec_start(text) == argv
    assert plan.unit == opts.unit and list(plan.daemon) == argv
    recorded = mf.load(opts.manifest)
    assert recorded is not None
    assert [e.kind for e in recorded.entries if e.path == opts.unit] == ["unit"]

    assert install.plan(opts).changes == []  # idempotent
    assert uninstall.run(opts, dry_run=False, report=quiet) == 0
    assert tree(tmp_path) == before  # the unit and the systemd dir it made are gone


@pytest.mark.parametrize("version", ["1.6.20", "1.7.24"])
def test_1x_gets_neither_podshim_sb_nor_a_proxy_plugin(tmp_path: Path, version: str) -> None:
    opts = node(tmp_path, version)
    plan = install.run(opts, dry_run=False, report=quiet)
    dropin = _load(opts.dropin)
    assert "proxy_plugins" not in dropin
    runtimes = _runtimes(opts, CRI)
    assert {"podshim", "podshim-node"} <= set(runtimes) and "podshim-sb" not in runtimes
    assert runtimes["podshim-node"]["options"]["ConfigPath"].endswith("/node.toml")
    assert "sandboxer" not in runtimes["podshim-node"]
    assert plan.unit == "" and not os.path.lexists(opts.unit_dir)


def test_2x_without_grpcio_keeps_the_node_scope_shim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "has_grpc", lambda: False)
    opts = _node_2x(tmp_path, MAIN_V2, "2.0.0")  # a version 2 main file on 2.x
    lines: list[str] = []
    plan = install.run(opts, dry_run=False, report=lines.append)
    assert any("no grpcio" in line for line in lines), lines
    runtimes = _runtimes(opts, CRI)
    assert runtimes["podshim-node"]["options"]["ConfigPath"].endswith("/node.toml")
    assert "sandboxer" not in runtimes["podshim-node"]
    assert runtimes["podshim-sb"]["sandboxer"] == "shim"
    assert "proxy_plugins" not in _load(opts.dropin)
    assert plan.unit == "" and not os.path.lexists(opts.unit)


@pytest.mark.parametrize(
    "table, message",
    [
        ('[proxy_plugins.podshim]\n  type = "snapshot"\n  address = "/run/x.sock"\n', "taken"),
        ('[proxy_plugins.podshim]\n  type = "sandbox"\n  address = "/run/other.sock"\n', "taken"),
        (f'[plugins."{CRI3}".containerd.runtimes.podshim-sb]\n  runtime_type = "x.y.v2"\n', "taken"),
        (None, "cannot go into a systemd unit"),
    ],
)
def test_2x_bad_input_changes_nothing(tmp_path: Path, table: str | None, message: str) -> None:
    opts = _node_2x(tmp_path, MAIN_V3 + (table or ""))
    if table is None:  # a path systemd would read otherwise (a space)
        opts = install.options(
            root=str(tmp_path / "root"),
            containerd=opts.containerd,
            shim=opts.shim,
            daemon_socket="/run/pod shim.sock",
        )
    before = tree(tmp_path)
    with pytest.raises(AdminError, match=message):
        install.run(opts, dry_run=False, report=quiet)
    assert tree(tmp_path) == before


def test_2x_accepts_its_own_proxy_plugin_declared_by_hand(tmp_path: Path) -> None:
    sock = tmp_path / "root/run/podshim/sandbox.sock"
    opts = _node_2x(
        tmp_path, MAIN_V3 + f'[proxy_plugins.podshim]\n  type = "sandbox"\n  address = "{sock}"\n'
    )
    install.run(opts, dry_run=False, report=quiet)
    assert uninstall.run(opts, dry_run=False, report=quiet) == 0


def test_2x_dry_run_prints_the_unit_and_changes_nothing(tmp_path: Path) -> None:
    opts = _node_2x(tmp_path)
    before = tree(tmp_path)
    lines: list[str] = []
    install.run(opts, dry_run=True, report=lines.append)
    assert tree(tmp_path) == before
    unit = [line for line in lines if line.startswith(f"would write systemd unit {opts.unit}")]
    assert len(unit) == 1 and "    ExecStart=" in unit[0], lines
    dropin = next(line for line in lines if line.startswith(f"would write {opts.dropin}"))
    assert "[proxy_plugins.podshim]" in dropin and 'sandboxer = "shim"' in dropin


def test_uninstall_keeps_a_unit_edited_since_install(tmp_path: Path) -> None:
    opts = _node_2x(tmp_path)
    install.run(opts, dry_run=False, report=quiet)
    with open(opts.unit, "a") as f:
        f.write("Environment=MINE=1\n")
    lines: list[str] = []
    assert uninstall.run(opts, dry_run=False, report=lines.append) == 1
    assert any(line.startswith(f"refused: {opts.unit} changed") for line in lines), lines
    assert Path(opts.unit).read_text().endswith("Environment=MINE=1\n")
    assert not os.path.exists(opts.dropin)
    with pytest.raises(AdminError, match="changed since podshim install wrote it"):
        install.plan(opts)  # install does not overwrite it either


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fake ``systemctl`` on PATH that records its arguments; systemd "running"."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl.calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(service, "systemd_running", lambda: True)
    yield calls


def test_systemd_enables_the_unit_before_containerd_and_disables_it_on_uninstall(
    tmp_path: Path, systemctl: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    opts = _node_2x(tmp_path)
    plan = install.run(opts, dry_run=False, report=quiet)
    assert admin_cli.start_daemon(plan, restart=True) == 0
    assert systemctl.read_text().splitlines() == [
        "daemon-reload",
        "enable --now podshim-daemon.service",
    ]
    systemctl.unlink()
    assert uninstall.run(opts, dry_run=False, report=quiet) == 0
    assert systemctl.read_text().splitlines() == [
        "disable --now podshim-daemon.service",
        "daemon-reload",
    ]
    assert not os.path.lexists(opts.unit)


def test_without_restart_install_says_how_to_start_the_daemon(
    tmp_path: Path, systemctl: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    opts = _node_2x(tmp_path)
    plan = install.run(opts, dry_run=False, report=quiet)
    assert admin_cli.start_daemon(plan, restart=False) == 0
    assert not systemctl.exists()
    out = capsys.readouterr().out
    assert "systemctl enable --now podshim-daemon.service" in out
    assert " ".join(plan.daemon) in out


def _serving(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def test_check_reports_the_proxy_plugins_daemon(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.write_text("#!/bin/sh\necho podshim 0.1.0\n")
    shim.chmod(0o755)
    sock = tmp_path / "sandbox.sock"
    dumped = tmp_path / "dump.toml"
    dumped.write_text(
        "version = 3\n"
        f'[proxy_plugins.podshim]\n  type = "sandbox"\n  address = "{sock}"\n'
        f'[plugins."{CRI3}".containerd.runtimes.podshim]\n'
        f'  runtime_type = "{RTYPE}"\n  runtime_path = "{shim}"\n'
        f'[plugins."{CRI3}".containerd.runtimes.podshim-node]\n'
        f'  runtime_type = "{RTYPE}"\n  sandboxer = "podshim"\n'
        f'[plugins."{CRI3}".containerd.runtimes.podshim-sb]\n'
        f'  runtime_type = "{RTYPE}"\n  runtime_path = "{shim}"\n  sandboxer = "shim"\n'
    )
    containerd = tmp_path / "containerd"
    containerd.write_text(f"#!/bin/sh\ncat {dumped}\n")
    containerd.chmod(0o755)
    binary = ContainerdBinary(str(containerd), (2, 1, 9), "containerd v2.1.9")
    target = check.Target("/x.sock", str(tmp_path / "config.toml"), str(containerd), None, "")

    def lines() -> dict[str, check.Result]:
        return {r.name: r for r in check.check_handlers(target, binary)}

    missing = lines()
    assert set(missing) == {"handler podshim", "handler podshim-node", "handler podshim-sb"}
    assert missing["handler podshim-sb"].status == check.OK
    node_line = missing["handler podshim-node"]
    assert node_line.status == check.WARN and str(sock) in node_line.detail
    assert "systemctl enable --now podshim-daemon.service" in node_line.hint
    with _serving(sock):
        served = lines()["handler podshim-node"]
    assert served.status == check.OK and "daemon serving" in served.detail, served
    dumped.write_text(dumped.read_text().replace('type = "sandbox"', 'type = "snapshot"'))
    assert "no sandbox proxy plugin" in lines()["handler podshim-node"].detail
