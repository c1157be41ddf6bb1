"""linux.mount.unmount_all: every stacked layer goes, without reading mountinfo (root)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from podshim import mountinfo
from podshim.linux import mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def mounted(path: Path) -> int:
    return sum(1 for m in mountinfo.read() if m.mountpoint == str(path))


def test_three_stacked_layers_all_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "t"
    target.mkdir()
    try:
        for i in range(3):
            mount.mount("tmpfs", f"layer{i}", str(target), ["size=64k"])
        assert mounted(target) == 3
        reads: list[int] = []
        real = mountinfo.read

        def counted(*args: Any) -> Any:
            reads.append(1)
            return real(*args)

        monkeypatch.setattr(mountinfo, "read", counted)
        mount.unmount_all(str(target))
        assert reads == []  # the kernel's answers were enough
        monkeypatch.undo()
        assert mounted(target) == 0
        mount.unmount_all(str(target))  # not a mount point: nothing to do
        mount.unmount_all(str(tmp_path / "missing"))  # gone: nothing to do
    finally:
        while mounted(target):
            mount.unmount(str(target))
