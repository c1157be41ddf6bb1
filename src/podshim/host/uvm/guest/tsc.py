"""The host's TSC rate, which a TCG guest is told (``tsc_early_khz=``) instead of
calibrating it.

Under TCG the guest's TSC is the host's (QEMU passes ``rdtsc`` through), but the guest
kernel measures its rate against the emulated PIT, which fails now and then under TCG's
timing ("Unable to calibrate against PIT"): the guest then marks its TSC unstable and
runs on the jiffies clocksource (4 ms resolution for every timer and clock in the VM,
and a slower boot). ``podshim uvm prepare`` measures the rate once (``tscfreq.c``,
built here) and records it in ``accel.json``; VM pods pass it on. Only with an invariant
TSC (``constant_tsc`` and ``nonstop_tsc``): otherwise there is no one rate to give.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

__all__ = ["SOURCE", "host_khz", "kernel_args"]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tscfreq.c")
#: what the guest kernel may be told: a sane TSC (100 MHz .. 10 GHz)
LOW_KHZ, HIGH_KHZ = 100_000, 10_000_000


def invariant(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the host's TSC runs at one rate (the flags ``constant_tsc`` and
    ``nonstop_tsc`` of its first CPU)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    return {"constant_tsc", "nonstop_tsc"} <= flags
    except OSError:
        pass
    return False


def host_khz(cc: str = "gcc") -> tuple[int | None, str]:
    """(the host TSC's rate in kHz, "") or (None, why not)."""
    if not invariant():
        return None, "the host's TSC is not invariant (constant_tsc, nonstop_tsc)"
    compiler = shutil.which(cc)
    if compiler is None:
        return None, f"{cc} not found"
    with tempfile.TemporaryDirectory(prefix="podshim-tsc-") as tmp:
        exe = os.path.join(tmp, "tscfreq")
        try:
            subprocess.run([compiler, "-O2", "-o", exe, SOURCE], check=True,
                           capture_output=True, timeout=120)  # fmt: skip
            out = subprocess.run([exe], check=True, capture_output=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"measuring the TSC: {exc}"
    try:
        khz = int(out.strip())
    except ValueError:
        return None, f"measuring the TSC: {out[:80]!r}"
    if not LOW_KHZ <= khz <= HIGH_KHZ:
        return None, f"measuring the TSC: {khz} kHz is not plausible"
    return khz, ""


def kernel_args(accel: str, khz: object) -> tuple[str, ...]:
    """The guest kernel's TSC argument for ``accel`` and the recorded rate (none with
    KVM, whose guests get their clock from kvmclock, or without a plausible rate)."""
    if accel != "tcg" or not isinstance(khz, int) or isinstance(khz, bool):
        return ()
    if not LOW_KHZ <= khz <= HIGH_KHZ:
        return ()
    return (f"tsc_early_khz={khz}",)
