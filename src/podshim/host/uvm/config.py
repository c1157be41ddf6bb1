"""The knobs of VM pods, read once per pod by ``KIND.make`` (no I/O but the environment).

For now they come from the shim's environment (containerd passes its own on to shims;
podshim's config TOML has no ``[uvm]`` table yet):

* ``PODSHIM_UVM_MEMORY_MB`` (default 256), ``PODSHIM_UVM_CPUS`` (default 1): the VM's size;
* ``PODSHIM_UVM_BOOT_TIMEOUT`` (seconds): how long ``create`` waits for the agent's
  first answer (default :data:`BOOT_TIMEOUT` by accelerator: TCG 20 s, KVM 5 s);
* ``PODSHIM_UVM_DIR``: the prepared image (default ``/var/lib/podshim/uvm``);
* ``PODSHIM_UVM_TCG_TB_MB`` (default 16): TCG's translation cache (QEMU's own default,
  up to 1 GiB, is most of an idle VM's memory once the guest has run a while).

A malformed value is refused when the pod is created (InvalidArgument naming it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from podshim import errors as errdefs
from podshim.host.uvm.guest import DEFAULT_DIR

#: seconds from QEMU's start to the agent's answer before the pod fails, by accelerator
BOOT_TIMEOUT = {"tcg": 20.0, "kvm": 5.0}
#: TCG's translation cache by default, MB: 16 keeps an idle VM ~20 MB smaller than
#: QEMU's default with no slower boot here (measured: README, "VM pods")
TCG_TB_MB = 64
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
    #: TCG's translation cache, MB (unused with KVM)
    tcg_tb_mb: int = TCG_TB_MB
    #: why the environment could not be used ("" when it could): create() refuses then
    error: str = ""

    def boot_deadline(self, accel: str) -> float:
        return self.boot_timeout if self.boot_timeout is not None else BOOT_TIMEOUT[accel]

    def check(self) -> None:
        if self.error:
            raise errdefs.InvalidArgument(self.error)


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not low <= value <= high:
        raise ValueError(f"{name}={raw!r} is outside {low:g}..{high:g}")
    return value


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """The settings of the environment (``os.environ`` by default); never raises."""
    env = os.environ if env is None else env
    try:
        timeout = env.get("PODSHIM_UVM_BOOT_TIMEOUT", "")
        return Settings(
            memory_mb=int(_number(env, "PODSHIM_UVM_MEMORY_MB", 256, 64, 1 << 20)),
            cpus=int(_number(env, "PODSHIM_UVM_CPUS", 1, 1, 64)),
            boot_timeout=_number(env, "PODSHIM_UVM_BOOT_TIMEOUT", 0, 0.1, 3600)
            if timeout
            else None,
            image_dir=env.get("PODSHIM_UVM_DIR") or DEFAULT_DIR,
            tcg_tb_mb=int(_number(env, "PODSHIM_UVM_TCG_TB_MB", TCG_TB_MB, 1, 4096)),
        )
    except ValueError as exc:
        return Settings(error=f"VM pod settings: {exc}")
