"""``podshim uvm prepare --stock-kernel``: Debian's kernel instead of podshim's own.

The kernel package (``linux-image-amd64``'s dependency, e.g. ``linux-image-6.1.0-57-amd64``)
is fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` under
``<image dir>/stock`` rather than installed: installing it would run initramfs-tools and
pull kmod onto the host, and nothing of it is needed there. Its ``vmlinuz`` (a bzImage;
QEMU's microvm boots it through its firmware) becomes the image's kernel.

Debian builds the drivers the guest needs as modules, so the initramfs gets them (with
their dependencies, from ``modules.dep``) and a small static loader as ``/init``
(``modload.c``): it loads them, passing the command line's ``virtio_mmio.device=``
arguments (QEMU's device list) on, and execs the agent.

Much slower than the own kernel (TCG boot 5.3 s against 0.40 s, medians of 7 boots
here; q35 with ACPI and PCI, and modules). The agent configures eth0 itself
(``podshim.net=``), so its pods have their network as the others do.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from podshim import errors as errdefs
from podshim.host.uvm import guest

__all__ = ["MODULES", "StockKernel", "build_loader", "fetch", "module_order"]

META_PACKAGE = "linux-image-amd64"
#: the modules the guest loads, by name (their dependencies come along)
MODULES = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "virtio_net",
    "overlay",
)
LOADER_SOURCE = os.path.join(guest.HERE, "modload.c")
#: the loader's list of modules, one guest path a line, in load order
MODULE_LIST = "/etc/podshim-modules"

Log = Callable[[str], None]


@dataclass(frozen=True)
class StockKernel:
    vmlinuz: str
    #: the unpacked package's /lib/modules/<release>
    modules: str
    release: str


def _run(argv: list[str], cwd: str | None = None) -> str:
    try:
        done = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise errdefs.FailedPrecondition(f"{' '.join(argv)}: {e}") from e
    if done.returncode != 0:
        raise errdefs.FailedPrecondition(
            f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-1000:]}"
        )
    return done.stdout


def _package_name() -> str:
    out = _run(["apt-cache", "depends", META_PACKAGE])
    for line in out.splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
            return dep
    raise errdefs.FailedPrecondition(f"apt-cache depends {META_PACKAGE}: no linux-image-*")


def _found(root: str) -> StockKernel | None:
    # the unpacked package: boot/vmlinuz-<release>, lib/modules/<release>/kernel/...
    kernels = sorted(glob.glob(os.path.join(root, "boot", "vmlinuz-*")))
    if not kernels:
        return None
    release = os.path.basename(kernels[-1]).removeprefix("vmlinuz-")
    modules = os.path.join(root, "lib", "modules", release)
    if not os.path.isdir(os.path.join(modules, "kernel")):
        return None
    return StockKernel(kernels[-1], modules, release)


def fetch(directory: str, log: Log) -> StockKernel:
    """Debian's kernel, downloaded and unpacked under ``<directory>/stock`` (once)."""
    root = os.path.join(directory, "stock", "root")
    found = _found(root)
    if found is not None:
        return found
    package = _package_name()
    work = os.path.join(directory, "stock")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    log(f"apt-get download {package}")
    _run(["apt-get", "download", package], cwd=work)
    debs = glob.glob(os.path.join(work, "*.deb"))
    if len(debs) != 1:
        raise errdefs.FailedPrecondition(f"apt-get download {package}: got {debs}")
    _run(["dpkg-deb", "-x", debs[0], root])
    os.unlink(debs[0])
    found = _found(root)
    if found is None:
        raise errdefs.FailedPrecondition(f"{package}: no vmlinuz and modules in it")
    _prune(found)
    return found


def _prune(sk: StockKernel) -> None:
    """Keep only the kernel and the modules the guest loads (~400 MB -> ~10 MB)."""
    keep = set(module_order(sk.modules))
    for top, _, names in os.walk(os.path.join(sk.modules, "kernel")):
        for n in names:
            path = os.path.join(top, n)
            if os.path.relpath(path, sk.modules) not in keep:
                os.unlink(path)


def _name(path: str) -> str:
    return os.path.basename(path).split(".ko")[0].replace("-", "_")


def modinfo_depends(path: str) -> list[str]:
    """The ``depends=`` of a module's ``.modinfo`` section (an ELF64 file): what
    ``depmod`` writes into ``modules.dep``, which the package does not ship."""
    with open(path, "rb") as f:
        elf = f.read()
    if elf[:5] != b"\x7fELF\x02":
        raise errdefs.InvalidArgument(f"{path}: not an ELF64 module")
    shoff = int.from_bytes(elf[0x28:0x30], "little")
    shentsize, shnum, shstrndx = (
        int.from_bytes(elf[o : o + 2], "little") for o in (0x3A, 0x3C, 0x3E)
    )

    def section(i: int) -> tuple[int, int, int]:
        h = shoff + i * shentsize
        name = int.from_bytes(elf[h : h + 4], "little")
        offset = int.from_bytes(elf[h + 0x18 : h + 0x20], "little")
        size = int.from_bytes(elf[h + 0x20 : h + 0x28], "little")
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if elf[stroff + name : stroff + name + 9] == b".modinfo\0":
            for item in elf[offset : offset + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [d for d in item[8:].decode().split(",") if d]
            return []
    return []


def module_order(modules: str, wanted: tuple[str, ...] = MODULES) -> list[str]:
    """The module files (relative to ``modules``) to load for ``wanted``, dependencies
    first, each once. NotFound naming a module the kernel does not have."""
    by_name: dict[str, str] = {}
    for top, _, names in os.walk(os.path.join(modules, "kernel")):
        for n in names:
            if ".ko" in n:
                by_name[_name(n)] = os.path.relpath(os.path.join(top, n), modules)
    order: list[str] = []

    def visit(name: str, depth: int) -> None:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            raise errdefs.NotFound(f"kernel module {name} not in {modules}")
        if path in order or depth > 64:
            return
        for dep in modinfo_depends(os.path.join(modules, path)):
            visit(dep, depth + 1)
        order.append(path)

    for name in wanted:
        visit(name, 0)
    return order


def build_loader(out: str, cc: str = "gcc") -> None:
    """Compile the module loader (static) into ``out``."""
    if shutil.which(cc) is None:
        raise errdefs.FailedPrecondition(f"{cc} not found: apt-get install gcc libc6-dev")
    _run([cc, "-static", "-O2", "-s", "-Wall", "-o", out, LOADER_SOURCE])
