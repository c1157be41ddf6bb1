"""The utility VM's QEMU command line, image paths and accelerator choice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim.host.uvm import agentapi, qemu


def _cfg(**kw: object) -> qemu.VmConfig:
    base: dict[str, object] = {
        "kernel": "/img/vmlinux",
        "initrd": "/img/initrd",
        "agent_socket": "/run/x/agent.sock",
        "console_log": "/run/x/console.log",
    }
    base.update(kw)
    return qemu.VmConfig(**base)  # type: ignore[arg-type]


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_minimal_vm() -> None:
    argv = qemu.qemu_argv(_cfg(), binary="/bin/qemu")
    assert argv[0] == "/bin/qemu"
    assert _opt(argv, "-M") == ["microvm,acpi=off,memory-backend=ram"]
    assert _opt(argv, "-object") == ["memory-backend-memfd,id=ram,size=256M"]
    assert _opt(argv, "-accel") == ["tcg"]
    assert "-cpu" not in argv
    assert _opt(argv, "-m") == ["256"] and _opt(argv, "-smp") == ["1"]
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv
    assert _opt(argv, "-kernel") == ["/img/vmlinux"]
    assert _opt(argv, "-initrd") == ["/img/initrd"]
    assert _opt(argv, "-serial") == ["file:/run/x/console.log"]
    (append,) = _opt(argv, "-append")
    assert append.split() == list(qemu.BASE_CMDLINE)
    assert "reboot=t" in append and "panic=-1" in append
    assert "lapic_timer_period=4000000" in append
    (chardev,) = _opt(argv, "-chardev")
    assert chardev == "socket,id=agent,path=/run/x/agent.sock,server=on,wait=off"
    devices = _opt(argv, "-device")
    assert devices == [
        "virtio-serial-device,max_ports=2",
        f"virtserialport,chardev=agent,name={agentapi.PORT_NAME}",
        "virtio-balloon-device,free-page-reporting=on",
    ]
    assert "-fsdev" not in argv and "-netdev" not in argv
    # anonymous guest RAM and no balloon, when asked
    plain = qemu.qemu_argv(_cfg(memfd=False, free_page_reporting=False), binary="/bin/qemu")
    assert _opt(plain, "-M") == ["microvm,acpi=off"] and "-object" not in plain
    assert not [d for d in _opt(plain, "-device") if "balloon" in d]


def test_full_vm() -> None:
    argv = qemu.qemu_argv(
        _cfg(
            memory_mb=128,
            cpus=2,
            share_dir="/run/x/share",
            tap="tap0",
            mac="02:00:00:00:00:01",
            cmdline=("ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off", "podshim.hostname=p"),
            tb_size_mb=32,
            tools_dir="/img/tools-1",
        ),
        binary="/bin/qemu",
    )
    assert _opt(argv, "-accel") == ["tcg,tb-size=32"]
    assert _opt(argv, "-m") == ["128"] and _opt(argv, "-smp") == ["2"]
    (append,) = _opt(argv, "-append")
    assert append.split()[-2:] == [
        "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off",
        "podshim.hostname=p",
    ]
    assert _opt(argv, "-fsdev") == [
        "local,id=share,path=/run/x/share,security_model=none,multidevs=remap",
        "local,id=tools,path=/img/tools-1,security_model=none,readonly=on",
    ]
    assert _opt(argv, "-netdev") == ["tap,id=n0,ifname=tap0,script=no,downscript=no"]
    devices = _opt(argv, "-device")
    assert f"virtio-9p-device,fsdev=share,mount_tag={agentapi.SHARE_TAG}" in devices
    assert f"virtio-9p-device,fsdev=tools,mount_tag={agentapi.TOOLS_TAG}" in devices
    assert "virtio-net-device,netdev=n0,mac=02:00:00:00:00:01" in devices


def test_kvm() -> None:
    argv = qemu.qemu_argv(_cfg(accel="kvm", tb_size_mb=32), binary="/bin/qemu")
    assert _opt(argv, "-accel") == ["kvm"]
    assert _opt(argv, "-cpu") == ["host"]


@pytest.mark.parametrize(
    "kw",
    [
        {"accel": "hvf"},
        {"memory_mb": 0},
        {"cpus": 0},
        {"tap": "tap0"},
        {"mac": "02:00:00:00:00:01"},
        {"cmdline": ("a b",)},
        {"cmdline": ("",)},
        {"share_dir": "/a,b"},
        {"agent_socket": "/run/a,b/agent.sock"},
    ],
)
def test_refused(kw: dict[str, object]) -> None:
    with pytest.raises(errdefs.InvalidArgument):
        qemu.qemu_argv(_cfg(**kw), binary="/bin/qemu")


def test_qemu_binary_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(errdefs.FailedPrecondition, match=qemu.QEMU_PACKAGE):
        qemu.qemu_binary()


def test_image_paths(tmp_path: Path) -> None:
    with pytest.raises(errdefs.FailedPrecondition, match="podshim uvm prepare"):
        qemu.image_paths(str(tmp_path))
    (tmp_path / "vmlinux").write_bytes(b"k")
    with pytest.raises(errdefs.FailedPrecondition, match="initrd"):
        qemu.image_paths(str(tmp_path))
    (tmp_path / "initrd").write_bytes(b"i")
    with pytest.raises(errdefs.FailedPrecondition, match="tools missing"):
        qemu.image_paths(str(tmp_path))
    (tmp_path / "tools-1").mkdir()
    (tmp_path / "tools").symlink_to("tools-1")
    # the link resolved: a VM keeps the tools it booted with when prepare moves it
    assert qemu.image_paths(str(tmp_path)) == (
        str(tmp_path / "vmlinux"),
        str(tmp_path / "initrd"),
        os.path.realpath(tmp_path / "tools-1"),
    )


def test_accel(tmp_path: Path) -> None:
    assert qemu.accel(str(tmp_path)) == "tcg"
    (tmp_path / "accel.json").write_text("not json")
    assert qemu.accel(str(tmp_path)) == "tcg"
    (tmp_path / "accel.json").write_text(json.dumps({"accel": "tcg", "why": "x"}))
    assert qemu.accel(str(tmp_path)) == "tcg"
    (tmp_path / "accel.json").write_text(json.dumps({"accel": "kvm", "why": "booted"}))
    assert qemu.accel(str(tmp_path)) == "kvm"


def test_q35_for_a_stock_kernel() -> None:
    argv = qemu.qemu_argv(
        _cfg(machine="q35", share_dir="/s", tap="tap0", mac="02:00:00:00:00:01"),
        binary="/bin/qemu",
    )
    assert _opt(argv, "-M") == ["q35,memory-backend=ram"]
    devices = _opt(argv, "-device")
    assert "virtio-balloon-pci,free-page-reporting=on" in devices
    assert devices[0] == "virtio-serial-pci,max_ports=2"
    assert f"virtio-9p-pci,fsdev=share,mount_tag={agentapi.SHARE_TAG}" in devices
    assert "virtio-net-pci,netdev=n0,mac=02:00:00:00:00:01" in devices
    with pytest.raises(errdefs.InvalidArgument):
        qemu.qemu_argv(_cfg(machine="pc"), binary="/bin/qemu")


def test_machine(tmp_path: Path) -> None:
    assert qemu.machine(str(tmp_path)) == "microvm"
    (tmp_path / "accel.json").write_text(json.dumps({"accel": "tcg", "machine": "q35"}))
    assert qemu.machine(str(tmp_path)) == "q35"
    (tmp_path / "accel.json").write_text(json.dumps({"accel": "tcg", "machine": "isapc"}))
    assert qemu.machine(str(tmp_path)) == "microvm"
