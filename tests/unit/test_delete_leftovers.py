"""The ``delete`` action removes what a dead shim left: its socket (killed while
containerd was down) and its diag registry entry (crashed shims used to leave entries
until some reader pruned them), and nothing that is not a shim socket of ours."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from podshim import rundir
from podshim.diag.registry import entry_name
from podshim.oci import bundle as files
from podshim.shim.delete import _remove_dead_socket


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PODSHIM_RUN_DIR", str(tmp_path / "run"))
    for d in (rundir.sockets_dir(), rundir.registry_dir()):
        os.makedirs(d)
    return tmp_path / "run"


def bundle_with(tmp: Path, address: str) -> str:
    b = tmp / "bundle"
    b.mkdir(exist_ok=True)
    (b / files.ADDRESS).write_text("unix://" + address)
    return str(b)


def dead_socket(path: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # bound, never listening: connect is refused, as for a killed shim


def test_a_dead_shims_socket_and_registry_entry_go(tmp_path: Path, run_dir: Path) -> None:
    path = os.path.join(rundir.sockets_dir(), "a" * 16)
    dead_socket(path)
    entry = Path(rundir.registry_dir(), entry_name(path))
    entry.write_text("{}")
    other = Path(rundir.registry_dir(), entry_name(path + "x"))
    other.write_text("{}")
    _remove_dead_socket(bundle_with(tmp_path, path))
    assert not os.path.lexists(path) and not entry.exists()
    assert other.exists()  # another shim's entry stays


def test_a_live_shims_socket_stays(tmp_path: Path, run_dir: Path) -> None:
    path = os.path.join(rundir.sockets_dir(), "b" * 16)
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen(1)
    try:
        entry = Path(rundir.registry_dir(), entry_name(path))
        entry.write_text("{}")
        _remove_dead_socket(bundle_with(tmp_path, path))
        assert os.path.exists(path) and entry.exists()
    finally:
        live.close()


def test_paths_that_are_not_our_shim_sockets_are_never_removed(
    tmp_path: Path, run_dir: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    _remove_dead_socket(bundle_with(tmp_path, str(victim)))
    assert victim.read_text() == "precious"
    inside = Path(rundir.sockets_dir(), "c" * 16)
    inside.write_text("not a socket")
    _remove_dead_socket(bundle_with(tmp_path, str(inside)))
    assert inside.exists()
    elsewhere = tmp_path / "dead.sock"
    dead_socket(str(elsewhere))
    _remove_dead_socket(bundle_with(tmp_path, str(elsewhere)))
    assert elsewhere.exists()
