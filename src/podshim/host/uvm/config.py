"""The knobs of VM pods, read once per pod by ``KIND.make`` (no I/O but the environment).

Each comes from the ``[uvm]`` table of the handler's podshim config TOML, else from the
shim's environment (containerd passes its own on to shims), else its default:

======================  =========================  ========================================
``[uvm]`` key           environment                meaning (default)
======================  =========================  ========================================
``memory_mb``           ``PODSHIM_UVM_MEMORY_MB``  the VM's RAM, MB (256)
``cpus``                ``PODSHIM_UVM_CPUS``       its vCPUs (1)
``boot_timeout``        ``PODSHIM_UVM_BOOT_TIMEOUT``  seconds ``create`` waits for the
                                                   agent's first answer (BOOT_TIMEOUT)
``image_dir``           ``PODSHIM_UVM_DIR``        the prepared image (/var/lib/podshim/uvm)
``runtime``             ``PODSHIM_UVM_RUNTIME``    the guest's OCI runtime: ``crun`` or
                                                   ``runc`` (crun; both are in the guest
                                                   tools, whose cgroups are pure v2)
``tcg_tb_mb``           ``PODSHIM_UVM_TCG_TB_MB``  TCG's translation cache, MB (QEMU's own
                                                   default, up to 1 GiB, would be most of
                                                   a VM's memory): TCG_TB_MB of the runtime
======================  =========================  ========================================

A malformed value or an unknown key is refused when the pod is created (InvalidArgument
naming it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from podshim import errors as errdefs
from podshim.host.uvm.guest import DEFAULT_DIR

#: seconds from QEMU's start to the agent's answer before the pod fails, by accelerator
BOOT_TIMEOUT = {"tcg": 20.0, "kvm": 5.0}
#: the guest's OCI runtimes (their names are the commands the agent runs)
RUNTIMES = ("crun", "runc")
#: TCG's translation cache by default, MB, by guest runtime: crun (C) runs well in
#: 16; runc (Go, ~9 MB of code its every command runs through) thrashes a cache smaller
#: than 64 (create 1.1 s at 32, 1.4 s at 16). Measured: README, "VM pods".
TCG_TB_MB = {"crun": 16, "runc": 64}
#: how long close() lets the guest power off before QEMU is killed
STOP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Settings:
    memory_mb: int = 256
    cpus: int = 1
    #: None: by accelerator (BOOT_TIMEOUT)
    boot_timeout: float | None = None
    stop_timeout: float = STOP_TIMEOUT
    image_dir: str = DEFAULT_DIR
    #: the OCI runtime in the guest (RUNTIMES)
    runtime: str = "crun"
    #: TCG's translation cache, MB (unused with KVM); None: TCG_TB_MB[runtime]
    tcg_tb_mb: int | None = None
    #: why the environment could not be used ("" when it could): create() refuses then
    error: str = ""

    def boot_deadline(self, accel: str) -> float:
        return self.boot_timeout if self.boot_timeout is not None else BOOT_TIMEOUT[accel]

    @property
    def tb_size_mb(self) -> int:
        return self.tcg_tb_mb if self.tcg_tb_mb is not None else TCG_TB_MB[self.runtime]

    def check(self) -> None:
        if self.error:
            raise errdefs.InvalidArgument(self.error)


#: the ``[uvm]`` keys: (environment variable, low, high); None: not a number
_KEYS: dict[str, tuple[str, float, float] | None] = {
    "memory_mb": ("PODSHIM_UVM_MEMORY_MB", 64, 1 << 20),
    "cpus": ("PODSHIM_UVM_CPUS", 1, 64),
    "boot_timeout": ("PODSHIM_UVM_BOOT_TIMEOUT", 0.1, 3600),
    "tcg_tb_mb": ("PODSHIM_UVM_TCG_TB_MB", 1, 4096),
    "image_dir": None,
    "runtime": None,
}


def _number(key: str, raw: object, low: float, high: float) -> float | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ValueError(f"{key}={raw!r} is not a number")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not a number") from None
    if not low <= value <= high:
        raise ValueError(f"{key}={raw!r} is outside {low:g}..{high:g}")
    return value


def from_env(
    env: Mapping[str, str] | None = None, table: Mapping[str, object] | None = None
) -> Settings:
    """The settings of the ``[uvm]`` ``table`` over the environment (``os.environ`` by
    default); never raises (a bad value makes :meth:`Settings.check` raise)."""
    env = os.environ if env is None else env
    table = table or {}
    try:
        unknown = sorted(set(table) - set(_KEYS))
        if unknown:
            raise ValueError(f"unknown [uvm] keys {unknown}: want some of {sorted(_KEYS)}")
        nums: dict[str, float | None] = {}
        for key, limits in _KEYS.items():
            if limits is None:
                continue
            var, low, high = limits
            if key in table:
                nums[key] = _number(f"[uvm] {key}", table[key], low, high)
            else:
                nums[key] = _number(var, env.get(var, ""), low, high)
        memory, cpus, tb = nums["memory_mb"], nums["cpus"], nums["tcg_tb_mb"]
        return Settings(
            memory_mb=int(memory) if memory is not None else 256,
            cpus=int(cpus) if cpus is not None else 1,
            boot_timeout=nums["boot_timeout"],
            image_dir=_text(table, "image_dir", env, "PODSHIM_UVM_DIR") or DEFAULT_DIR,
            runtime=_runtime(table, env),
            tcg_tb_mb=int(tb) if tb is not None else None,
        )
    except ValueError as exc:
        return Settings(error=f"VM pod settings: {exc}")


def _text(table: Mapping[str, object], key: str, env: Mapping[str, str], var: str) -> str:
    if key not in table:
        return env.get(var, "")
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"[uvm] {key}={value!r} is not a non-empty string")
    return value


def _runtime(table: Mapping[str, object], env: Mapping[str, str]) -> str:
    raw = _text(table, "runtime", env, "PODSHIM_UVM_RUNTIME") or RUNTIMES[0]
    if raw not in RUNTIMES:
        raise ValueError(f"runtime {raw!r}: want one of {', '.join(RUNTIMES)}")
    return raw
