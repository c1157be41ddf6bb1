"""``podshim node-install``'s pieces without a containerd: the bundle copy (versioned,
``current``, kept when the same), pruning of old versions that no process runs from,
the options passed on to the host's ``podshim install``, and the node label through the
Kubernetes API (a local HTTP server standing in for it)."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from podshim import cli
from podshim.admin import cli as admin_cli
from podshim.admin import kubeapi, node
from podshim.admin.errors import AdminError


def _bundle(path: Path, version: str, build: str = "a") -> Path:
    (path / "bin").mkdir(parents=True)
    (path / node.BUNDLE_FILE).write_text(json.dumps({"podshim": version, "build": build}))
    sleep = shutil.which("sleep")
    assert sleep is not None
    shutil.copy2(sleep, path / "bin" / "prog")  # a program of this version
    return path


def _opts(tmp_path: Path, bundle: Path) -> node.NodeOptions:
    return node.NodeOptions(
        bundle=str(bundle), host_root=str(tmp_path / "host"), host_pid=os.getpid(),
        prefix="/opt/podshim", address="/run/x.sock", install_args=(), restart=False,
        label_node=None,
    )  # fmt: skip


def test_copy_is_versioned_and_kept_when_the_same(tmp_path: Path) -> None:
    lines: list[str] = []
    opts = _opts(tmp_path, _bundle(tmp_path / "b1", "1.0"))
    node.copy_bundle(opts, "1.0", lines.append)
    local = tmp_path / "host" / "opt" / "podshim"
    assert os.readlink(local / "current") == "1.0"
    assert (local / "1.0" / "bin" / "prog").is_file()
    # the parents it made, for --cleanup (host paths)
    assert json.loads((local / node.CREATED).read_text()) == ["/opt"]
    stamp = (local / "1.0" / "bin" / "prog").stat().st_ino
    node.copy_bundle(opts, "1.0", lines.append)
    assert "this bundle is there already" in lines[-1]
    assert (local / "1.0" / "bin" / "prog").stat().st_ino == stamp
    # another build of the same version replaces it
    other = _opts(tmp_path, _bundle(tmp_path / "b2", "1.0", build="b"))
    node.copy_bundle(other, "1.0", lines.append)
    assert json.loads((local / "1.0" / node.BUNDLE_FILE).read_text())["build"] == "b"
    assert sorted(os.listdir(local)) == sorted([node.CREATED, "1.0", "current"])


def test_prune_keeps_a_version_a_process_runs_from(tmp_path: Path) -> None:
    lines: list[str] = []
    old = _opts(tmp_path, _bundle(tmp_path / "b1", "1.0"))
    node.copy_bundle(old, "1.0", lines.append)
    new = _opts(tmp_path, _bundle(tmp_path / "b2", "2.0"))
    node.copy_bundle(new, "2.0", lines.append)
    local = tmp_path / "host" / "opt" / "podshim"
    assert os.readlink(local / "current") == "2.0"
    proc = subprocess.Popen([str(local / "1.0" / "bin" / "prog"), "60"])
    try:
        assert node.in_use(str(local / "1.0")) == [proc.pid]
        node.prune(new, "2.0", lines.append)
        assert (local / "1.0").is_dir(), lines
        assert f"in use by pids [{proc.pid}]" in lines[-1] and " 60" in lines[-1]
    finally:
        proc.kill()
        proc.wait()
    node.prune(new, "2.0", lines.append)
    assert not (local / "1.0").exists() and (local / "2.0").is_dir()
    assert "no process runs from it" in lines[-1]


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(AdminError, match="is not a podshim bundle"):
        node.bundle_info(str(tmp_path))


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["node-install", *argv])


def test_install_options_are_passed_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[node.NodeOptions] = []

    def fake(opts: node.NodeOptions, report: Any) -> int:
        seen.append(opts)
        return 0

    monkeypatch.setattr(node, "install", fake)
    args = _parse(
        "--host-root", "/host", "--root", "/srv/r", "--bundle", str(tmp_path),
        "--config", "/etc/c.toml", "--bin-dir", "/usr/bin", "--restart",
    )  # fmt: skip
    assert admin_cli.run_node_install(args) == 0
    (opts,) = seen
    assert opts.install_args == ("--root", "/srv/r", "--config", "/etc/c.toml", "--bin-dir", "/usr/bin")
    assert opts.prefix == "/srv/r/opt/podshim" and opts.local(opts.prefix) == "/host/srv/r/opt/podshim"
    assert opts.restart and opts.host_pid == 1 and opts.bundle == str(tmp_path)
    assert opts.host_command[:2] == ["nsenter", "--target=1"]


class _Api(http.server.BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple[str, str, dict[str, str], Any]]] = []
    status = 200

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Api.calls.append((self.command, self.path, dict(self.headers), body))
        self.send_response(_Api.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"kind": "Status", "message": "nodes is forbidden"}')

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[kubeapi.Api]:
    _Api.calls.clear()
    _Api.status = 200
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield kubeapi.Api(f"http://127.0.0.1:{server.server_address[1]}", "tok", None)
    finally:
        server.shutdown()
        server.server_close()


def test_label_node_patches_the_node(api: kubeapi.Api) -> None:
    kubeapi.label_node("node-1", node.LABEL, "true", api)
    kubeapi.label_node("node-1", node.LABEL, None, api)
    (m1, path1, h1, b1), (_, _, _, b2) = _Api.calls
    assert (m1, path1) == ("PATCH", "/api/v1/nodes/node-1")
    assert h1["Authorization"] == "Bearer tok"
    assert h1["Content-Type"] == "application/merge-patch+json"
    assert b1 == {"metadata": {"labels": {"podshim.io/installed": "true"}}}
    assert b2 == {"metadata": {"labels": {"podshim.io/installed": None}}}  # removes it


def test_label_node_refused(api: kubeapi.Api) -> None:
    _Api.status = 403
    with pytest.raises(AdminError, match=r"HTTP 403: .*forbidden"):
        kubeapi.label_node("node-1", node.LABEL, "true", api)


def test_in_cluster_needs_a_pod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(AdminError, match="not in a Kubernetes pod"):
        kubeapi.Api.in_cluster(str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(AdminError, match="no service account token"):
        kubeapi.Api.in_cluster(str(tmp_path))


LABELS = ("podshim.io/installed", "podshim.io/sandbox-api")


def test_the_sandbox_api_label_follows_the_hosts_check(api: kubeapi.Api) -> None:
    base = [{"name": "handler podshim", "status": "ok", "detail": "", "hint": ""}]
    sb = {"name": node.SANDBOX_CHECK, "status": "ok", "detail": "", "hint": ""}
    assert node.node_labels([*base, sb]) == {LABELS[0]: "true", LABELS[1]: "true"}
    # 1.6/1.7 (no such handler), or registered but not runnable: the label goes
    assert node.node_labels(base) == {LABELS[0]: "true", LABELS[1]: None}
    assert node.node_labels([*base, {**sb, "status": "warn"}])[LABELS[1]] is None
    kubeapi.label_node_with("node-1", node.node_labels([*base, sb]), api)
    ((_, _, _, body),) = _Api.calls
    assert body == {"metadata": {"labels": {LABELS[0]: "true", LABELS[1]: "true"}}}

