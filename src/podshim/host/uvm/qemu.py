"""The QEMU command line of a utility VM, and where its image and accelerator come from.

One VM per pod: QEMU's ``microvm`` machine without ACPI (no PCI, no firmware tables: the
fastest boot), the guest kernel booted directly (PVH), the prepared initramfs, and only
virtio-mmio devices, which microvm lists on the kernel command line for the guest:

* a virtio-serial port named :data:`agentapi.PORT_NAME` on a unix socket QEMU serves
  (``server=on,wait=off``): the agent's ttrpc channel;
* the pod's share directory over 9p (tag :data:`agentapi.SHARE_TAG`, ``multidevs=remap``
  so inode numbers of the host's different file systems stay unique in the guest);
* a tap device (made beforehand in the pod's network namespace) as the guest's eth0;
* the serial console into a file, which boot errors quote.

The accelerator is KVM only if ``podshim uvm prepare``'s boot probe recorded that a VM
booted with it (:func:`accel`): on machines whose ``/dev/kvm`` cannot run an ordinary
guest kernel (kvm-pvm) opening it succeeds, booting does not. Otherwise TCG.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from podshim import errors as errdefs
from podshim.host.uvm import agentapi
from podshim.host.uvm.guest import ACCEL, DEFAULT_DIR, INITRD, KERNEL, PREPARE_COMMAND, TOOLS

__all__ = [
    "BASE_CMDLINE",
    "QEMU",
    "QEMU_PACKAGE",
    "VmConfig",
    "accel",
    "image_paths",
    "machine",
    "qemu_argv",
    "qemu_binary",
]

QEMU = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
MACHINES = ("microvm", "q35")
#: the guest kernel's fixed arguments. quiet: the serial console is slow under TCG.
#: reboot=t + QEMU's -no-reboot: the agent's reboot() ends QEMU; panic=-1: so does a
#: panic. lapic_timer_period: QEMU's APIC bus runs at 1 GHz, 1e9 / HZ (250) ticks per
#: jiffy; presetting it skips the ~0.1 s calibration (a patch of the guest kernel).
#: noreplace-smp: with one CPU the kernel would rewrite its ~6000 lock prefixes one
#: text_poke at a time (~60 ms under TCG, each a self-modifying-code store); keeping
#: them costs nothing measurable. no_timer_check: QEMU's IO-APIC timer works; its check
#: waits for 4 ticks (16 ms at HZ=250). Together ~90 ms of a ~0.45 s boot (README).
BASE_CMDLINE = (
    "console=ttyS0",
    "quiet",
    "reboot=t",
    "panic=-1",
    "lapic_timer_period=4000000",
    "noreplace-smp",
    "no_timer_check",
)


@dataclass(frozen=True)
class VmConfig:
    """One VM: image, channels, size, devices."""

    kernel: str
    initrd: str
    #: the unix socket QEMU listens on for the agent's virtio-serial port
    agent_socket: str
    #: the guest's serial console (a file QEMU writes)
    console_log: str
    memory_mb: int = 256
    cpus: int = 1
    #: "tcg" or "kvm"
    accel: str = "tcg"
    #: shared into the guest over 9p, tag agentapi.SHARE_TAG
    share_dir: str | None = None
    #: the guest tools directory, shared read-only over 9p (tag agentapi.TOOLS_TAG)
    tools_dir: str | None = None
    #: an existing tap device (QEMU runs in its network namespace) and the guest's MAC
    tap: str | None = None
    mac: str | None = None
    #: extra kernel arguments: podshim.net=..., podshim.hostname=...
    cmdline: tuple[str, ...] = ()
    #: TCG's translation cache size (QEMU's default grows with guest RAM)
    tb_size_mb: int | None = None
    #: guest RAM from a memfd (shmem: no transparent huge pages, so a guest page
    #: touched costs 4 KiB, not 2 MiB) instead of anonymous memory
    memfd: bool = True
    #: a virtio balloon with free page reporting: pages the guest frees go back to the
    #: host (QEMU punches them out of the memfd)
    free_page_reporting: bool = True
    #: "microvm" (podshim's kernel), or "q35" for a stock kernel (``prepare
    #: --stock-kernel``: Debian's cannot find virtio-mmio devices without ACPI)
    machine: str = "microvm"


def qemu_binary() -> str:
    """The path of ``qemu-system-x86_64``, or FailedPrecondition naming its package."""
    found = shutil.which(QEMU)
    if found is None:
        raise errdefs.FailedPrecondition(
            f"{QEMU} not found: apt-get install --no-install-recommends {QEMU_PACKAGE}"
        )
    return found


def _accel_arg(cfg: VmConfig) -> str:
    if cfg.accel == "kvm":
        return "kvm"
    if cfg.accel != "tcg":
        raise errdefs.InvalidArgument(f"accelerator {cfg.accel!r}: want 'tcg' or 'kvm'")
    if cfg.tb_size_mb is not None:
        return f"tcg,tb-size={cfg.tb_size_mb}"
    return "tcg"


def _no_commas(what: str, value: str) -> str:
    # QEMU's option syntax escapes "," as ",,"; a path with one is refused instead
    if "," in value:
        raise errdefs.InvalidArgument(f"{what} {value!r}: a comma cannot be passed to QEMU")
    return value


def qemu_argv(cfg: VmConfig, binary: str | None = None) -> list[str]:
    """The full QEMU argv for ``cfg`` (``binary`` defaults to :func:`qemu_binary`)."""
    if cfg.memory_mb <= 0 or cfg.cpus <= 0:
        raise errdefs.InvalidArgument(f"VM size {cfg.memory_mb} MB, {cfg.cpus} CPUs")
    if (cfg.tap is None) != (cfg.mac is None):
        raise errdefs.InvalidArgument("a VM network needs both a tap device and a MAC")
    cmdline = [*BASE_CMDLINE, *cfg.cmdline]
    for arg in cmdline:
        if not arg or any(c.isspace() for c in arg):
            raise errdefs.InvalidArgument(f"kernel argument {arg!r}: empty or with a space")
    if cfg.machine not in MACHINES:
        raise errdefs.InvalidArgument(f"machine {cfg.machine!r}: want one of {MACHINES}")
    bus = "device" if cfg.machine == "microvm" else "pci"  # virtio-mmio or virtio-pci
    machine = "microvm,acpi=off" if cfg.machine == "microvm" else cfg.machine
    if cfg.memfd:
        machine += ",memory-backend=ram"
    argv = [
        binary or qemu_binary(),
        "-M", machine,
        *(("-object", f"memory-backend-memfd,id=ram,size={cfg.memory_mb}M")
          if cfg.memfd else ()),
        "-accel", _accel_arg(cfg),
        *(("-cpu", "host") if cfg.accel == "kvm" else ()),
        "-smp", str(cfg.cpus),
        "-m", str(cfg.memory_mb),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", _no_commas("kernel", cfg.kernel),
        "-initrd", _no_commas("initrd", cfg.initrd),
        "-append", " ".join(cmdline),
        "-serial", "file:" + _no_commas("console log", cfg.console_log),
        "-chardev",
        f"socket,id=agent,path={_no_commas('agent socket', cfg.agent_socket)},"
        "server=on,wait=off",
        # max_ports=2: port 0 is the console's, 1 the agent's; the default 31 ports make
        # the guest set up 64 virtqueues at boot (~5 ms under TCG)
        "-device", f"virtio-serial-{bus},max_ports=2",
        "-device", f"virtserialport,chardev=agent,name={agentapi.PORT_NAME}",
    ]  # fmt: skip
    if cfg.free_page_reporting:
        argv += ["-device", f"virtio-balloon-{bus},free-page-reporting=on"]
    if cfg.share_dir is not None:
        argv += [
            "-fsdev",
            f"local,id=share,path={_no_commas('share dir', cfg.share_dir)},"
            "security_model=none,multidevs=remap",
            "-device", f"virtio-9p-{bus},fsdev=share,mount_tag={agentapi.SHARE_TAG}",
        ]  # fmt: skip
    if cfg.tools_dir is not None:
        argv += [
            "-fsdev",
            f"local,id=tools,path={_no_commas('tools dir', cfg.tools_dir)},"
            "security_model=none,readonly=on",
            "-device", f"virtio-9p-{bus},fsdev=tools,mount_tag={agentapi.TOOLS_TAG}",
        ]  # fmt: skip
    if cfg.tap is not None and cfg.mac is not None:
        argv += [
            "-netdev",
            f"tap,id=n0,ifname={_no_commas('tap', cfg.tap)},script=no,downscript=no",
            "-device", f"virtio-net-{bus},netdev=n0,mac={_no_commas('mac', cfg.mac)}",
        ]  # fmt: skip
    return argv


def image_paths(directory: str = DEFAULT_DIR) -> tuple[str, str, str]:
    """The prepared kernel, initrd and guest tools directory (the ``tools`` symlink
    resolved: a VM keeps the tools it booted with when ``prepare`` moves the link), or
    FailedPrecondition naming the command."""
    kernel = os.path.join(directory, KERNEL)
    initrd = os.path.join(directory, INITRD)
    tools = os.path.realpath(os.path.join(directory, TOOLS))
    missing = [p for p in (kernel, initrd) if not os.path.isfile(p)]
    if not os.path.isdir(tools):
        missing.append(os.path.join(directory, TOOLS))
    if missing:
        raise errdefs.FailedPrecondition(
            f"the utility VM image is not prepared ({', '.join(missing)} missing): "
            f"run `{PREPARE_COMMAND}`"
        )
    return kernel, initrd, tools


def read_accel(directory: str = DEFAULT_DIR) -> dict[str, object]:
    """The boot probe's record (accel.json), or an empty dict when there is none."""
    try:
        with open(os.path.join(directory, ACCEL), encoding="utf-8") as f:
            found = json.load(f)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def tsc_khz(directory: str = DEFAULT_DIR) -> object:
    """The host TSC rate the probe recorded (kHz; :mod:`.guest.tsc` checks it), or None."""
    return read_accel(directory).get("tsc_khz")


def accel(directory: str = DEFAULT_DIR) -> str:
    """``"kvm"`` when the recorded boot probe booted a VM with KVM, else ``"tcg"``."""
    return "kvm" if read_accel(directory).get("accel") == "kvm" else "tcg"


def machine(directory: str = DEFAULT_DIR) -> str:
    """The machine type the prepared image boots on (``"q35"`` for a stock kernel)."""
    found = read_accel(directory).get("machine")
    return found if isinstance(found, str) and found in MACHINES else "microvm"
