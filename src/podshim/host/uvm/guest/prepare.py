"""``podshim uvm prepare``: make the guest image current, then probe the accelerator.

Nothing happens (in well under a second) when ``vmlinux``, ``initrd`` and ``accel.json``
exist and the manifest's inputs are the current ones. Otherwise only what is stale is
rebuilt: the kernel (minutes) when its fragment, patches or source changed, the initrd
(a second) when the agent's sources, runc or podshim changed. After a rebuild the image
is booted once with TCG (it must reach the agent: a broken image fails here, not in a pod)
and once with KVM if ``/dev/kvm`` is there, with a short deadline; ``accel.json``
records which accelerator VM pods use. One ``prepare`` at a time per directory (a lock).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

from podshim import errors as errdefs
from podshim.host.uvm import guest, qemu
from podshim.host.uvm.guest import initramfs, kernel, manifest, probe, stock, tsc

__all__ = ["KVM_PROBE_TIMEOUT", "TCG_PROBE_TIMEOUT", "prepare", "probe_accel"]

#: the agent must answer a KVM boot this fast (TCG boots in ~0.5 s here)
KVM_PROBE_TIMEOUT = 5.0
#: the TCG boot that checks the image (generous: the machine may be loaded, and a stock
#: kernel takes seconds)
TCG_PROBE_TIMEOUT = 60.0

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(f"podshim uvm prepare: {line}", file=sys.stderr, flush=True)


def _build_agent(out: str) -> None:
    try:
        from podshim.host.uvm import agentbuild
    except ImportError as e:  # not in this version of podshim yet
        raise errdefs.FailedPrecondition(f"the guest agent's builder is missing: {e}") from e
    agentbuild.build_agent(out)


def _write_json(path: str, value: dict[str, object]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def qemu_accel_current(directory: str) -> bool:
    """Whether accel.json is there and of this version (it says what became of the TSC)."""
    rec = qemu.read_accel(directory)  # {} when missing or unreadable
    return "tsc_khz" in rec or "tsc_why" in rec


def probe_accel(directory: str, log: Log, machine: str = "microvm") -> dict[str, object]:
    """Boot the image (TCG, then KVM if there is a /dev/kvm) and record accel.json.

    Internal (with the console's end) when even TCG does not reach the agent.
    """
    vmlinux = os.path.join(directory, guest.KERNEL)
    initrd = os.path.join(directory, guest.INITRD)
    tools = os.path.realpath(os.path.join(directory, guest.TOOLS))
    khz, why = tsc.host_khz()
    log(f"host TSC: {khz} kHz" if khz else f"host TSC: not passed on ({why})")
    tcg = probe.boot_probe(
        vmlinux, initrd, "tcg", TCG_PROBE_TIMEOUT, machine=machine, tools=tools,
        cmdline=tsc.kernel_args("tcg", khz),
    )  # fmt: skip
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record: dict[str, object] = {"probed": now, "machine": machine}
    record.update({"tsc_khz": khz} if khz else {"tsc_why": why})
    if not tcg.ok:
        record.update(accel="tcg", why=f"the image does not boot: {tcg.why}", tcg_ok=False)
        _write_json(os.path.join(directory, guest.ACCEL), record)
        raise errdefs.Internal(f"the guest image does not reach its agent: {tcg.why}")
    log(f"TCG boot: the agent answered after {tcg.seconds:.2f} s (guest kernel {tcg.kernel})")
    record.update(tcg_ok=True, tcg_boot_s=round(tcg.seconds, 3), guest_kernel=tcg.kernel)
    unusable = probe.kvm_usable_device()
    if unusable is not None:
        record.update(accel="tcg", why=unusable)
    else:
        kvm = probe.boot_probe(
            vmlinux, initrd, "kvm", KVM_PROBE_TIMEOUT, machine=machine, tools=tools
        )
        if kvm.ok:
            record.update(accel="kvm", why="a KVM boot reached the agent", kvm_boot_s=kvm.seconds)
        else:
            record.update(accel="tcg", why=f"/dev/kvm cannot boot the guest: {kvm.why}")
    log(f"accelerator: {record['accel']} ({record['why'][:200]})")  # type: ignore[index]
    _write_json(os.path.join(directory, guest.ACCEL), record)
    return record


def prepare(
    directory: str = guest.DEFAULT_DIR,
    *,
    force: bool = False,
    do_probe: bool = True,
    stock_kernel: bool = False,
    log: Log = _stderr,
) -> bool:
    """Make the image in ``directory`` current; True when something was (re)built.
    ``stock_kernel``: Debian's kernel and its modules (:mod:`.stock`) instead of ours."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_locked(directory, force, do_probe, stock_kernel, log)


def _copy(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp.{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _prepare_locked(
    directory: str, force: bool, do_probe: bool, stock_kernel: bool, log: Log
) -> bool:
    sk = stock.fetch(directory, log) if stock_kernel else None
    modules = stock.module_order(sk.modules) if sk else []
    if sk is None:
        kin = manifest.kernel_inputs()
        iin = manifest.initrd_inputs(initramfs.RUNC)
    else:
        kin = manifest.stock_kernel_inputs(sk.vmlinuz)
        extra = {
            "release": sk.release,
            "modules": modules,
            "modload": guest.sha256_file(stock.LOADER_SOURCE),
        }
        iin = manifest.initrd_inputs(initramfs.RUNC, extra)
    kernel_ok = not force and manifest.current(directory, "kernel", kin)
    initrd_ok = (
        not force
        and manifest.current(directory, "initrd", iin)
        and os.path.isdir(os.path.join(directory, guest.TOOLS))
    )
    accel_path = os.path.join(directory, guest.ACCEL)
    probed = qemu_accel_current(directory)
    if kernel_ok and initrd_ok and (probed or not do_probe):
        log(f"the image in {directory} is current: nothing to do")
        return False
    record = manifest.read(directory)
    if not kernel_ok or not initrd_ok:
        try:
            os.unlink(accel_path)  # the probe's verdict was about the old image
        except FileNotFoundError:
            pass
    if not kernel_ok:
        out = os.path.join(directory, guest.KERNEL)
        if sk is not None:
            _copy(sk.vmlinuz, out)
            log(f"guest kernel: Debian's {sk.release}")
        else:
            start = time.monotonic()
            kernel.build_kernel(out, directory, log=log)
            log(f"guest kernel built in {time.monotonic() - start:.0f} s")
        record["kernel"] = kin
        manifest.write(directory, record)
    if not initrd_ok:
        with tempfile.TemporaryDirectory(prefix="podshim-agent-") as tmp:
            agent = os.path.join(tmp, "init")
            _build_agent(agent)
            out = os.path.join(directory, guest.INITRD)
            tools = os.path.join(directory, guest.TOOLS)
            if sk is None:
                size = initramfs.build_initrd(out, agent, tools=tools)
            else:
                loader = os.path.join(tmp, "modload")
                stock.build_loader(loader)
                where = f"/usr/lib/modules/{sk.release}"
                size = initramfs.build_initrd(
                    out,
                    agent,
                    extra=[(f"{where}/{m}", os.path.join(sk.modules, m)) for m in modules],
                    loader=loader,
                    tools=tools,
                    files=[
                        (stock.MODULE_LIST, "".join(f"{where}/{m}\n" for m in modules).encode())
                    ],
                )
        log(f"initrd written ({size // 1024} KiB)")
        record["initrd"] = iin
        manifest.write(directory, record)
    if do_probe:
        probe_accel(directory, log, "microvm" if sk is None else "q35")
    return True
