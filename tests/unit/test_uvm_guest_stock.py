"""``prepare --stock-kernel``: module dependencies from .modinfo, and the image it makes."""

from __future__ import annotations

import json
import shutil
import stat
import struct
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim.host.uvm.guest import initramfs, prepare, stock

from .test_uvm_guest_initramfs import parse
from .test_uvm_guest_prepare import Recorder, builds, inputs  # noqa: F401 (fixtures)

_real_build_initrd = initramfs.build_initrd


def fake_module(path: Path, depends: str, *, padding: int = 0) -> None:
    """A minimal ELF64 file whose only named section is .modinfo (what the reader needs)."""
    modinfo = b"license=GPL\0" + f"depends={depends}\0".encode() + b"vermagic=6.1\0"
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body = b"\0" * padding + modinfo + shstrtab
    modinfo_off = 64 + padding
    shstr_off = modinfo_off + len(modinfo)
    shoff = 64 + len(body)

    def shdr(name: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, offset, size, 0, 0, 1, 0)

    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    sections = shdr(0, 0, 0) + shdr(1, modinfo_off, len(modinfo))
    sections += shdr(10, shstr_off, len(shstrtab))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + body + sections)


@pytest.fixture
def modules(tmp_path: Path) -> Path:
    root = tmp_path / "lib/modules/6.1.0-9-amd64"
    k = root / "kernel"
    fake_module(k / "drivers/virtio/virtio_ring.ko", "")
    fake_module(k / "drivers/virtio/virtio.ko", "virtio_ring", padding=3)
    fake_module(k / "drivers/virtio/virtio_mmio.ko", "virtio,virtio_ring")
    fake_module(k / "drivers/virtio/virtio_pci.ko", "virtio,virtio_ring")
    fake_module(k / "drivers/char/virtio_console.ko", "virtio,virtio_ring")
    fake_module(k / "net/9p/9pnet.ko", "")
    fake_module(k / "net/9p/9pnet_virtio.ko", "9pnet,virtio,virtio_ring")
    fake_module(k / "fs/netfs/netfs.ko", "")
    fake_module(k / "fs/9p/9p.ko", "9pnet,netfs")
    fake_module(k / "net/core/failover.ko", "")
    fake_module(k / "drivers/net/net_failover.ko", "failover")
    fake_module(k / "drivers/net/virtio_net.ko", "net_failover,virtio,virtio_ring")
    fake_module(k / "fs/overlayfs/overlay.ko", "")
    fake_module(k / "sound/unrelated.ko", "")
    return root


def test_modinfo_depends(modules: Path) -> None:
    k = modules / "kernel"
    assert stock.modinfo_depends(str(k / "drivers/net/virtio_net.ko")) == [
        "net_failover", "virtio", "virtio_ring",
    ]  # fmt: skip
    assert stock.modinfo_depends(str(k / "net/9p/9pnet.ko")) == []
    (k / "bad.ko").write_bytes(b"not an elf")
    with pytest.raises(errdefs.InvalidArgument):
        stock.modinfo_depends(str(k / "bad.ko"))


def test_module_order(modules: Path) -> None:
    order = stock.module_order(str(modules))
    assert len(order) == len(set(order))
    names = [Path(p).name for p in order]
    assert "unrelated.ko" not in names
    assert set(names) >= {"virtio_mmio.ko", "9p.ko", "netfs.ko", "failover.ko"}
    for module, needs in (
        ("virtio.ko", "virtio_ring.ko"),
        ("virtio_mmio.ko", "virtio.ko"),
        ("9pnet_virtio.ko", "9pnet.ko"),
        ("9p.ko", "netfs.ko"),
        ("virtio_net.ko", "net_failover.ko"),
        ("net_failover.ko", "failover.ko"),
    ):
        assert names.index(needs) < names.index(module), (module, needs)
    with pytest.raises(errdefs.NotFound, match="nosuch"):
        stock.module_order(str(modules), ("nosuch",))


def test_prepare_with_the_stock_kernel(
    tmp_path: Path,
    inputs: Path,  # noqa: F811
    builds: Recorder,  # noqa: F811
    modules: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vmlinuz = tmp_path / "boot/vmlinuz-6.1.0-9-amd64"
    vmlinuz.parent.mkdir()
    vmlinuz.write_bytes(b"bzImage")
    sk = stock.StockKernel(str(vmlinuz), str(modules), "6.1.0-9-amd64")
    monkeypatch.setattr(stock, "fetch", lambda directory, log: sk)
    monkeypatch.setattr(stock, "build_loader", lambda out: Path(out).write_bytes(b"loader"))
    real_runc = shutil.which("runc")
    if real_runc is None:
        pytest.skip("runc not installed")
    monkeypatch.setattr(initramfs, "RUNC", real_runc)
    # the real initrd writer (the builds fixture records instead)
    monkeypatch.setattr(initramfs, "build_initrd", _real_build_initrd)
    d = tmp_path / "img"
    assert prepare.prepare(str(d), stock_kernel=True, log=lambda line: None)
    assert (d / "vmlinux").read_bytes() == b"bzImage"
    assert builds.calls == ["agent", "probe-tcg-q35", "probe-kvm-q35"]
    assert json.loads((d / "accel.json").read_text())["machine"] == "q35"
    members = {m.name: m for m in parse((d / "initrd").read_bytes())}
    assert members["init"].data == b"loader"
    assert members["sbin/podshim-agent"].data == b"agent"
    assert members["sbin/podshim-agent"].mode == stat.S_IFREG | 0o755
    listed = members["etc/podshim-modules"].data.decode().split()
    assert listed and all(p.startswith("/usr/lib/modules/6.1.0-9-amd64/kernel/") for p in listed)
    for p in listed:
        assert p.lstrip("/") in members, p
    # current now; the own kernel again rebuilds the kernel and the initrd
    builds.calls.clear()
    assert not prepare.prepare(str(d), stock_kernel=True, log=lambda line: None)
    assert builds.calls == []
    assert prepare.prepare(str(d), log=lambda line: None)
    assert builds.calls[:2] == ["kernel", "agent"]


def test_prune_keeps_what_the_guest_loads(modules: Path) -> None:
    sk = stock.StockKernel("/nonexistent", str(modules), "6.1.0-9-amd64")
    wanted = stock.module_order(str(modules))
    stock._prune(sk)
    left = sorted(str(p.relative_to(modules)) for p in modules.rglob("*.ko"))
    assert left == sorted(wanted)
    assert not (modules / "kernel/sound/unrelated.ko").exists()
