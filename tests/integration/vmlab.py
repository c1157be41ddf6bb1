"""A CRI lab with the ``podshim-vm`` handler (``default_host = "uvm"``): one QEMU utility
VM per pod, its containers run by crun (``podshim-vm-runc``: runc) inside the guest.

The leftover checks differ from :class:`criutil.CriLab`'s: a VM pod's container pids
are the guest's, so only the shim and what runs below it on this machine (QEMU) are
remembered; a pod is gone when those processes, every mount and run-directory entry
naming the pod, and its bundles are. The module is skipped, saying why, when the guest
image has not been prepared (``podshim uvm prepare``; ``scripts/install.sh`` runs it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim import rundir
from podshim_lab import Containerd, RuntimeHandler
from podshim_lab.cleanup import unmount_under
from podshim_lab.procfs import descendants, process_table

if TYPE_CHECKING:
    from tests.integration import criutil as cu
    from tests.integration.criprocs import alive
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criutil as cu
    from criprocs import alive

VM = "podshim-vm"
#: the same with runc in the guest (its config's [uvm] table)
VM_RUNC = "podshim-vm-runc"
IMAGE_DIR = Path(os.environ.get("PODSHIM_UVM_DIR", "/var/lib/podshim/uvm"))


def need_image() -> None:
    """Skip (with the command to run) when the guest image or QEMU is missing; fail
    instead when ``PODSHIM_REQUIRE_UVM=1`` (CI prepares the image: a skip there would
    hide a broken set-up)."""
    unavailable = pytest.fail if os.environ.get("PODSHIM_REQUIRE_UVM") == "1" else pytest.skip
    missing = [p for p in ("vmlinux", "initrd") if not (IMAGE_DIR / p).is_file()]
    if missing:
        unavailable(f"no VM guest image in {IMAGE_DIR} ({', '.join(missing)}): "
                    "run `podshim uvm prepare` (scripts/install.sh does)")  # fmt: skip
    if not any(os.access(os.path.join(d, "qemu-system-x86_64"), os.X_OK)
               for d in os.environ.get("PATH", "").split(":")):  # fmt: skip
        unavailable("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


class VmLab(cu.CriLab):
    """:class:`criutil.CriLab` for VM pods (see the module doc)."""

    def remember(self, pod_id: str) -> None:
        rec = self.pods[pod_id]
        with contextlib.suppress(cu.CriError, AssertionError):
            shim = self.shim_pid(pod_id)
            table = process_table()
            for stat in [table[shim], *descendants(shim, table)] if shim in table else []:
                rec.procs.setdefault(stat.pid, stat)

    def qemu_pid(self, pod_id: str) -> int:
        """QEMU of the pod: the process below the pod's shim named qemu-system-*."""
        shim = self.shim_pid(pod_id)
        found = [s.pid for s in descendants(shim) if s.comm.startswith("qemu-system")]
        assert len(found) == 1, f"pod {pod_id}: QEMU processes below shim {shim}: {found}"
        return found[0]

    def leftovers(self, pod_id: str) -> list[str]:
        rec = self.pods[pod_id]
        found = [
            f"process {now.pid} ({now.comm}) state {now.state}"
            for now in (alive(s) for s in rec.procs.values())
            if now is not None
        ]
        found += [f"mount {m}" for m in _mounts() if pod_id in m]
        base = Path(rundir.run_dir())
        if base.is_dir():
            for root, dirs, files in os.walk(base):
                found += [f"left {root}/{n}" for n in (*dirs, *files) if pod_id in n]
        if os.path.lexists(self.shim_socket(pod_id)):
            found.append(f"shim socket {self.shim_socket(pod_id)}")
        for task_id in (pod_id, *rec.containers):
            for path in (self.bundle(task_id), self.runtime_state(rec, task_id)):
                if os.path.lexists(path):
                    found.append(f"left {path}")
        return found

    def runtime_state(self, rec: cu.PodRecord, task_id: str) -> Path:
        return self.podshim_runc_root / cu.CRI_NAMESPACE / task_id

    def force_cleanup(self, pod_id: str) -> None:
        super().force_cleanup(pod_id)
        unmount_under([Path(m) for m in _mounts() if pod_id in m])


@contextlib.contextmanager
def open_vm_lab(home: Path) -> Iterator[VmLab]:
    """containerd with the ``podshim-vm`` handler (and ``podshim``, ``runc``); every pod
    removed and checked gone at the end."""
    cu._need_busybox()
    need_image()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "vm.toml"
    lab = Containerd(
        cri=True,
        runtimes={
            cu.PODSHIM: RuntimeHandler(cu.PODSHIM_RUNTIME, {"ConfigPath": str(config)}),
            VM: RuntimeHandler(cu.PODSHIM_RUNTIME, {"ConfigPath": str(config.with_name("uvm.toml"))}),
            VM_RUNC: RuntimeHandler(
                cu.PODSHIM_RUNTIME, {"ConfigPath": str(config.with_name("uvm-runc.toml"))}
            ),
        },
        extra_path=[cu.BIN_DIR],
        cni_portmap=True,  # the host reaches pod IPs (the portmap chain's masquerade)
    )
    root = lab.state / "podshim-runc"
    cu.podshim_config(config, root)
    config.with_name("uvm.toml").write_text(
        f'runtime_root = "{root}"\nlog_level = "debug"\ndefault_host = "uvm"\n'
    )
    config.with_name("uvm-runc.toml").write_text(
        f'runtime_root = "{root}"\nlog_level = "debug"\ndefault_host = "uvm"\n'
        '[uvm]\nruntime = "runc"\n'
    )
    crilab: VmLab | None = None
    errors: list[str] = []
    try:
        lab.start()
        lab.ensure_pause()
        crilab = VmLab(lab, root, lab.ensure_busybox(namespace=cu.CRI_NAMESPACE))
        yield crilab
    finally:
        errors += cu.close_cri_lab(lab, crilab)
        assert not errors, "VM lab teardown left things behind:\n" + "\n".join(errors)
