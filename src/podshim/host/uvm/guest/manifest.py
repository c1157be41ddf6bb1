"""What the guest image was built from (``manifest.json``), and whether it is current.

Two parts, rebuilt independently: the kernel (the config fragment, the patches, Debian's
kernel source tarball by size and mtime, :data:`KERNEL_FORMAT`) and the initrd (the agent's
sources, the runc binary, podshim's version, :data:`INITRD_FORMAT`). A part is current when
its file exists and its recorded inputs equal the ones computed now. Bump a format number
when the way a part is built changes.
"""

from __future__ import annotations

import json
import os
from typing import Any

from podshim import __version__
from podshim.host.uvm import guest
from podshim.host.uvm.guest import sha256_file
from podshim.host.uvm.guest.initramfs import BUSYBOX, CRUN

__all__ = [
    "INITRD_FORMAT",
    "KERNEL_FORMAT",
    "Manifest",
    "agent_sources",
    "initrd_inputs",
    "kernel_inputs",
    "read",
    "stock_kernel_inputs",
    "write",
]

KERNEL_FORMAT = 1
INITRD_FORMAT = 2
#: the guest agent's sources (C), next to this package
AGENT_DIR = os.path.join(os.path.dirname(guest.HERE), "agent")

Manifest = dict[str, Any]


def kernel_inputs(source: str | None = None) -> Manifest:
    """The kernel's inputs now. The tarball (138 MB) by size and mtime, not by hash."""
    source = source or guest.KERNEL_SOURCE
    try:
        st = os.stat(source)
        tarball: dict[str, Any] = {"path": source, "size": st.st_size, "mtime": int(st.st_mtime)}
    except OSError:
        tarball = {"path": source, "missing": True}
    return {
        "format": KERNEL_FORMAT,
        "fragment": sha256_file(guest.FRAGMENT),
        "patches": {os.path.basename(p): sha256_file(p) for p in guest.patch_files()},
        "source": tarball,
    }


def stock_kernel_inputs(vmlinuz: str) -> Manifest:
    """A Debian kernel used as it is (``--stock-kernel``)."""
    return {"format": KERNEL_FORMAT, "stock": vmlinuz, "sha256": sha256_file(vmlinuz)}


def agent_sources(directory: str | None = None) -> list[str]:
    """The agent's C sources and headers (default: :data:`AGENT_DIR`), sorted."""
    directory = directory or AGENT_DIR
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, n) for n in names if n.endswith((".c", ".h")))


def initrd_inputs(runc: str, extra: Manifest | None = None) -> Manifest:
    """The initrd's inputs now; ``extra`` adds what else goes in (stock kernel modules)."""
    return {
        "format": INITRD_FORMAT,
        "podshim": __version__,
        "agent": {os.path.basename(p): sha256_file(p) for p in agent_sources()},
        "runc": {"path": runc, "sha256": sha256_file(runc) if os.path.isfile(runc) else ""},
        "crun": sha256_file(CRUN) if os.path.isfile(CRUN) else "",
        "busybox": sha256_file(BUSYBOX) if os.path.isfile(BUSYBOX) else "",
        **({"extra": extra} if extra else {}),
    }


def read(directory: str) -> Manifest:
    """The recorded manifest ({} when there is none or it is unreadable)."""
    try:
        with open(os.path.join(directory, guest.MANIFEST), encoding="utf-8") as f:
            found = json.load(f)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def write(directory: str, manifest: Manifest) -> None:
    """Record ``manifest`` (atomically)."""
    path = os.path.join(directory, guest.MANIFEST)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def current(directory: str, part: str, inputs: Manifest) -> bool:
    """Whether ``part`` ("kernel" or "initrd") exists and was built from ``inputs``."""
    name = guest.KERNEL if part == "kernel" else guest.INITRD
    if not os.path.isfile(os.path.join(directory, name)):
        return False
    return bool(read(directory).get(part) == inputs)
