"""The utility VM's guest image: kernel, initramfs and ``podshim uvm prepare``.

The image lives in one directory (:data:`DEFAULT_DIR`, ``/var/lib/podshim/uvm``):

* ``vmlinux``: a PVH-bootable guest kernel built from Debian's ``linux-source-6.1`` with
  ``allnoconfig`` + ``kernel.config`` (this package) and the patches in ``patches/``
  (:mod:`.kernel`); QEMU's microvm machine boots it directly.
* ``initrd``: an uncompressed newc cpio written by Python (:mod:`.initramfs`): the guest
  agent as ``/init``, runc and its shared libraries, the directories the agent mounts on.
* ``manifest.json``: what the two were built from (:mod:`.manifest`); ``prepare`` rebuilds
  only what is stale.
* ``accel.json``: the boot probe's verdict, ``kvm`` or ``tcg`` (:mod:`.prepare`).

This module is light (standard library only): :mod:`podshim.host.uvm.qemu` and
``podshim check`` import it.
"""

from __future__ import annotations

import hashlib
import os

#: where ``podshim uvm prepare`` puts the image
DEFAULT_DIR = "/var/lib/podshim/uvm"
KERNEL = "vmlinux"
INITRD = "initrd"
#: a symlink to the current guest tools directory (``tools-<hash>``: runc, its libraries,
#: busybox), which every VM mounts read-only over 9p
TOOLS = "tools"
MANIFEST = "manifest.json"
ACCEL = "accel.json"
#: the command that makes a missing or stale image, as error messages name it
PREPARE_COMMAND = "podshim uvm prepare"
#: Debian's kernel source package and its tarball
KERNEL_SOURCE_PACKAGE = "linux-source-6.1"
KERNEL_SOURCE = "/usr/src/linux-source-6.1.tar.xz"
#: this package's data: the config fragment and the patches (applied in name order)
HERE = os.path.dirname(os.path.abspath(__file__))
FRAGMENT = os.path.join(HERE, "kernel.config")
PATCHES = os.path.join(HERE, "patches")


def patch_files() -> list[str]:
    """The kernel patches of this package, in the order they are applied."""
    return sorted(os.path.join(PATCHES, n) for n in os.listdir(PATCHES) if n.endswith(".patch"))


def sha256_file(path: str) -> str:
    """The hex SHA-256 of a file's contents (the manifest's inputs, the tools' names)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
