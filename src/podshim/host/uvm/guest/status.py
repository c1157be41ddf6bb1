"""Is the utility VM ready on this machine? One line for ``podshim check`` and diag."""

from __future__ import annotations

import shutil

from podshim import errors as errdefs
from podshim.host.uvm import guest, qemu
from podshim.host.uvm.guest import initramfs, manifest

__all__ = ["image_status"]


def image_status(directory: str = guest.DEFAULT_DIR) -> tuple[bool, str, str]:
    """(ready, what was found, how to fix it): QEMU installed, the image prepared and
    current, the accelerator probed."""
    hint = f"{guest.PREPARE_COMMAND} (only VM pods need it)"
    if shutil.which(qemu.QEMU) is None:
        return False, f"{qemu.QEMU} not installed", f"apt-get install {qemu.QEMU_PACKAGE}"
    try:
        qemu.image_paths(directory)
    except errdefs.FailedPrecondition:
        return False, f"no guest image in {directory}", hint
    stale = [
        part
        for part, inputs in (
            ("kernel", manifest.kernel_inputs()),
            ("initrd", manifest.initrd_inputs(initramfs.RUNC)),
        )
        if not manifest.current(directory, part, inputs)
    ]
    if stale:
        return False, f"the guest {' and '.join(stale)} in {directory} is out of date", hint
    probed = qemu.read_accel(directory)
    if not probed:
        return False, f"guest image in {directory}, accelerator not probed", hint
    why = str(probed.get("why", ""))[:120]
    return True, f"guest image in {directory}, accelerator {qemu.accel(directory)} ({why})", ""
