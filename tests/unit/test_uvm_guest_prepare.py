"""``podshim uvm prepare``: currency of the image, what gets rebuilt, the fragment's checks.

The builders and the boot probe are replaced by recorders here: the real kernel build
and boot run in CI's install.sh and tests/integration/test_uvm_boot.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim.host.uvm import guest
from podshim.host.uvm.guest import (
    command,
    initramfs,
    kernel,
    manifest,
    prepare,
    probe,
    status,
    tsc,
)  # fmt: skip


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Private copies of every input (fragment, patches, source tarball, agent, runc)."""
    src = tmp_path / "inputs"
    (src / "patches").mkdir(parents=True)
    (src / "agent").mkdir()
    (src / "kernel.config").write_text("CONFIG_A=y\n")
    (src / "patches/0001-x.patch").write_text("--- a/x\n+++ b/x\n")
    (src / "linux.tar.xz").write_bytes(b"tarball")
    (src / "agent/agent.c").write_text("int main(void) { return 0; }\n")
    (src / "agent/agent.h").write_text("\n")
    (src / "runc").write_bytes(b"runc 1")
    monkeypatch.setattr(guest, "FRAGMENT", str(src / "kernel.config"))
    monkeypatch.setattr(guest, "PATCHES", str(src / "patches"))
    monkeypatch.setattr(guest, "KERNEL_SOURCE", str(src / "linux.tar.xz"))
    monkeypatch.setattr(manifest, "AGENT_DIR", str(src / "agent"))
    monkeypatch.setattr(initramfs, "RUNC", str(src / "runc"))
    return src


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.cmdlines: list[tuple[str, ...]] = []


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()

    def build_kernel(out: str, directory: str, **kw: object) -> None:
        rec.calls.append("kernel")
        Path(out).write_bytes(b"vmlinux")

    def build_agent(out: str) -> None:
        rec.calls.append("agent")
        Path(out).write_bytes(b"agent")

    def build_initrd(out: str, agent: str, **kw: object) -> int:
        rec.calls.append("initrd")
        assert Path(agent).read_bytes() == b"agent"
        Path(out).write_bytes(b"initrd")
        tools = kw["tools"]
        assert isinstance(tools, str) and tools == str(Path(out).parent / "tools")
        Path(tools + "-1").mkdir(exist_ok=True)
        if not os.path.lexists(tools):
            os.symlink("tools-1", tools)
        return 6

    def boot_probe(
        k: str,
        i: str,
        accel: str,
        timeout: float,
        machine: str = "microvm",
        tools: str | None = None,
        cmdline: tuple[str, ...] = (),
    ) -> probe.BootResult:
        rec.cmdlines.append(cmdline)
        assert tools is not None and os.path.basename(tools).startswith("tools-"), tools
        rec.calls.append(f"probe-{accel}" + ("" if machine == "microvm" else f"-{machine}"))
        if accel == "kvm":
            return probe.BootResult(False, timeout, "kvm: did not answer")
        return probe.BootResult(True, 0.5, kernel="6.1.0-test")

    monkeypatch.setattr(kernel, "build_kernel", build_kernel)
    monkeypatch.setattr(prepare, "_build_agent", build_agent)
    monkeypatch.setattr(initramfs, "build_initrd", build_initrd)
    monkeypatch.setattr(probe, "boot_probe", boot_probe)
    monkeypatch.setattr(probe, "kvm_usable_device", lambda: None)
    monkeypatch.setattr(tsc, "host_khz", lambda: (2_500_000, ""))
    return rec


def _prepare(d: Path) -> bool:
    return prepare.prepare(str(d), log=lambda line: None)


def test_builds_once_then_nothing(tmp_path: Path, inputs: Path, builds: Recorder) -> None:
    d = tmp_path / "img"
    assert _prepare(d)
    assert builds.calls == ["kernel", "agent", "initrd", "probe-tcg", "probe-kvm"]
    accel = json.loads((d / "accel.json").read_text())
    assert accel["accel"] == "tcg" and "cannot boot" in accel["why"]
    assert accel["tcg_boot_s"] == 0.5 and accel["guest_kernel"] == "6.1.0-test"
    # the TCG probe boots as pods will: with the host's TSC rate, which is recorded
    assert accel["tsc_khz"] == 2_500_000
    assert builds.cmdlines[0] == ("tsc_early_khz=2500000",) and builds.cmdlines[1] == ()
    recorded = manifest.read(str(d))
    assert set(recorded) == {"kernel", "initrd"}
    builds.calls.clear()
    start = time.monotonic()
    assert not _prepare(d)
    assert time.monotonic() - start < 1.0
    assert builds.calls == []


def test_only_the_stale_part_is_rebuilt(tmp_path: Path, inputs: Path, builds: Recorder) -> None:
    d = tmp_path / "img"
    _prepare(d)
    for change, expected in (
        (lambda: (inputs / "agent/agent.c").write_text("changed"), ["agent", "initrd"]),
        (lambda: (inputs / "runc").write_bytes(b"runc 2"), ["agent", "initrd"]),
        (lambda: (inputs / "kernel.config").write_text("CONFIG_B=y\n"), ["kernel"]),
        (lambda: (inputs / "patches/0002-y.patch").write_text("+"), ["kernel"]),
        (lambda: os.utime(inputs / "linux.tar.xz", (1, 1)), ["kernel"]),
        (lambda: (d / "initrd").unlink(), ["agent", "initrd"]),
        (lambda: (d / "vmlinux").unlink(), ["kernel"]),
    ):
        builds.calls.clear()
        change()
        assert _prepare(d), expected
        assert builds.calls == [*expected, "probe-tcg", "probe-kvm"]
    # a lost probe record: only the probe again
    builds.calls.clear()
    (d / "accel.json").unlink()
    assert _prepare(d)
    assert builds.calls == ["probe-tcg", "probe-kvm"]


def test_force_rebuilds_all(tmp_path: Path, inputs: Path, builds: Recorder) -> None:
    d = tmp_path / "img"
    _prepare(d)
    builds.calls.clear()
    prepare.prepare(str(d), force=True, do_probe=False, log=lambda line: None)
    assert builds.calls == ["kernel", "agent", "initrd"]


def test_broken_image_fails_and_says_why(
    tmp_path: Path, inputs: Path, builds: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_boot(k: str, i: str, accel: str, timeout: float, **kw: object) -> probe.BootResult:
        return probe.BootResult(False, timeout, "tcg: deadline; console: Kernel panic")

    monkeypatch.setattr(probe, "boot_probe", no_boot)
    with pytest.raises(errdefs.Internal, match="Kernel panic"):
        _prepare(tmp_path / "img")
    accel = json.loads((tmp_path / "img/accel.json").read_text())
    assert accel["accel"] == "tcg" and accel["tcg_ok"] is False


def test_kvm_that_boots_is_chosen(
    tmp_path: Path, inputs: Path, builds: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        probe, "boot_probe", lambda k, i, accel, timeout, **kw: probe.BootResult(True, 0.2)
    )
    _prepare(tmp_path / "img")
    assert json.loads((tmp_path / "img/accel.json").read_text())["accel"] == "kvm"


def test_no_kvm_device(
    tmp_path: Path, inputs: Path, builds: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probe, "kvm_usable_device", lambda: "no /dev/kvm")
    _prepare(tmp_path / "img")
    assert builds.calls[-1] == "probe-tcg"
    accel = json.loads((tmp_path / "img/accel.json").read_text())
    assert accel == {**accel, "accel": "tcg", "why": "no /dev/kvm"}


def test_status(tmp_path: Path, inputs: Path, builds: Recorder) -> None:
    d = tmp_path / "img"
    ready, detail, hint = status.image_status(str(d))
    if "not installed" in detail:
        pytest.skip(detail)
    assert not ready and "no guest image" in detail and "podshim uvm prepare" in hint
    _prepare(d)
    ready, detail, hint = status.image_status(str(d))
    assert ready and "accelerator tcg" in detail, detail
    (inputs / "runc").write_bytes(b"new runc")
    ready, detail, hint = status.image_status(str(d))
    assert not ready and "initrd" in detail and "out of date" in detail


def test_command_line(
    tmp_path: Path,
    inputs: Path,
    builds: Recorder,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    p = argparse.ArgumentParser()
    command.configure(p)
    d = str(tmp_path / "img")
    assert command.run(p.parse_args(["prepare", "--dir", d, "--no-probe"])) == 0
    assert builds.calls == ["kernel", "agent", "initrd"]
    assert command.run(p.parse_args(["prepare", "--dir", d, "--no-probe"])) == 0
    assert "nothing to do" in capsys.readouterr().err
    (inputs / "linux.tar.xz").unlink()  # the kernel's input changed (and is missing)

    def missing(out: str, directory: str, **kw: object) -> None:
        raise errdefs.FailedPrecondition("apt-get install linux-source-6.1")

    kernel.build_kernel = missing  # type: ignore[assignment]  # restored by monkeypatch
    assert command.run(p.parse_args(["prepare", "--dir", d])) == 1
    assert "apt-get install linux-source-6.1" in capsys.readouterr().err


def test_fragment_has_what_the_guest_needs() -> None:
    symbols = kernel.fragment_symbols()
    for needed in (
        "CONFIG_PVH", "CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "CONFIG_VIRTIO_CONSOLE", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_NET_9P_VIRTIO",
        "CONFIG_9P_FS", "CONFIG_NETWORK_FILESYSTEMS", "CONFIG_IP_PNP", "CONFIG_DEVTMPFS",
        "CONFIG_UNIX98_PTYS", "CONFIG_MEMCG", "CONFIG_CGROUP_PIDS", "CONFIG_CGROUP_BPF",
        "CONFIG_BPF_SYSCALL", "CONFIG_SECCOMP_FILTER", "CONFIG_OVERLAY_FS", "CONFIG_HZ_250",
        "CONFIG_KALLSYMS", "CONFIG_MAGIC_SYSRQ", "CONFIG_BLK_DEV_INITRD",
    ):  # fmt: skip
        assert symbols.get(needed) == "y", needed
    assert "CONFIG_ACPI" not in symbols and "CONFIG_PCI" not in symbols
    assert len(guest.patch_files()) == 2


def test_check_config(tmp_path: Path) -> None:
    cfg = tmp_path / ".config"
    cfg.write_text("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=250\n")
    assert kernel.check_config(str(cfg), {"CONFIG_A": "y", "CONFIG_C": "250"}) == []
    assert kernel.check_config(str(cfg), {"CONFIG_B": "n", "CONFIG_D": "n"}) == []
    assert kernel.check_config(str(cfg), {"CONFIG_B": "y", "CONFIG_C": "100", "CONFIG_E": "y"}) == [
        "CONFIG_B",
        "CONFIG_C",
        "CONFIG_E",
    ]


def test_build_kernel_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(errdefs.FailedPrecondition, match=r"apt-get install linux-source-6\.1"):
        kernel.build_kernel(str(tmp_path / "v"), str(tmp_path), source=str(tmp_path / "none"))
    (tmp_path / "src.tar.xz").write_bytes(b"")
    monkeypatch.setattr(kernel, "BUILD_DEPS", (("no-such-tool-x", "pkg-x"), ("make", "make")))
    with pytest.raises(errdefs.FailedPrecondition, match=r"apt-get install pkg-x$"):
        kernel.build_kernel(str(tmp_path / "v"), str(tmp_path), source=str(tmp_path / "src.tar.xz"))
    assert not (tmp_path / "v").exists()


def test_an_accel_record_of_an_older_podshim_is_probed_again(
    tmp_path: Path, inputs: Path, builds: Recorder
) -> None:
    d = tmp_path / "img"
    assert _prepare(d)
    record = json.loads((d / "accel.json").read_text())
    del record["tsc_khz"]  # as written before the TSC was measured
    (d / "accel.json").write_text(json.dumps(record))
    builds.calls.clear()
    assert _prepare(d)
    assert builds.calls == ["probe-tcg", "probe-kvm"]  # the image itself is current
    assert json.loads((d / "accel.json").read_text())["tsc_khz"] == 2_500_000


def test_tsc_kernel_args_and_invariance(tmp_path: Path) -> None:
    assert tsc.kernel_args("tcg", 2_596_146) == ("tsc_early_khz=2596146",)
    assert tsc.kernel_args("kvm", 2_596_146) == ()  # kvmclock
    for bad in (None, "2596146", True, 5, 99_000_000):
        assert tsc.kernel_args("tcg", bad) == (), bad
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n")
    assert tsc.invariant(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu tsc constant_tsc\n")
    assert not tsc.invariant(str(info))
    assert not tsc.invariant(str(tmp_path / "none"))


@pytest.mark.skipif(shutil.which("gcc") is None or not tsc.invariant(), reason="gcc, invariant TSC")
def test_host_khz_measures_the_tsc() -> None:
    khz, why = tsc.host_khz()
    assert khz is not None and why == "", why
    assert tsc.LOW_KHZ <= khz <= tsc.HIGH_KHZ
