"""Boot the prepared image once and wait for the guest agent: the accelerator probe.

``/dev/kvm`` opening fine says nothing (kvm-pvm opens, then cannot run an ordinary kernel:
QEMU spins in KVM's instruction emulator until it gives up ~90 s later), so the only
test is a boot: QEMU with ``-accel kvm``, and the agent must answer Ping before a short
deadline. QEMU is killed and reaped whatever happens, and its run directory removed.
The same boot with TCG checks the image itself.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from podshim import errors as errdefs
from podshim.host.uvm import qemu

__all__ = ["BootResult", "boot_probe", "console_tail", "kvm_usable_device", "wait_ping"]

#: what the probe's VM gets (small: it only boots)
PROBE_MEMORY_MB = 128


@dataclass(frozen=True)
class BootResult:
    ok: bool
    #: Popen to the agent's answer (ok) or to giving up
    seconds: float
    #: why not (ok=False): QEMU's exit or the deadline, with the console's end
    why: str = ""
    #: the guest kernel the agent reported
    kernel: str = ""


def kvm_usable_device() -> str | None:
    """Why KVM cannot even be tried (no /dev/kvm, no access), or None."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible"
    return None


def console_tail(path: str, limit: int = 2000) -> str:
    """The end of a console log (what a boot error quotes)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


async def wait_ping(
    socket_path: str, deadline: float, proc: subprocess.Popen[bytes] | None = None
) -> str:
    """Connect to the agent's socket and Ping until it answers or ``deadline``
    (time.monotonic()); returns the guest kernel the agent reports. DeadlineExceeded
    when it did not answer in time, Unavailable when ``proc`` exited first."""
    from podshim.host.uvm.agentclient import AgentClient

    last: Exception | None = None
    while True:
        left = deadline - time.monotonic()
        if proc is not None and proc.poll() is not None:
            raise errdefs.Unavailable(f"QEMU exited with {proc.returncode} before the agent")
        if left <= 0:
            raise errdefs.DeadlineExceeded(f"the guest agent did not answer (last: {last})")
        if not os.path.exists(socket_path):
            await asyncio.sleep(0.01)
            continue
        client = AgentClient(socket_path)
        try:
            info = await client.ping(timeout=min(left, 1.0))
            return info.kernel
        except (TimeoutError, errdefs.ShimError, OSError) as e:
            last = e
            await asyncio.sleep(0.02)
        finally:
            await client.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def boot_probe(
    kernel: str,
    initrd: str,
    accel: str,
    timeout: float,
    *,
    memory_mb: int = PROBE_MEMORY_MB,
    cmdline: tuple[str, ...] = (),
    machine: str = "microvm",
    tools: str | None = None,
) -> BootResult:
    """Boot ``kernel`` + ``initrd`` with ``accel`` and wait up to ``timeout`` s for Ping."""
    run = tempfile.mkdtemp(prefix="podshim-uvm-probe-")
    console = os.path.join(run, "console.log")
    cfg = qemu.VmConfig(
        kernel=kernel,
        initrd=initrd,
        agent_socket=os.path.join(run, "agent.sock"),
        console_log=console,
        memory_mb=memory_mb,
        accel=accel,
        cmdline=cmdline,
        machine=machine,
        tools_dir=tools,
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        qemu.qemu_argv(cfg),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own group: killed as a whole
    )
    try:
        kernel_version = asyncio.run(wait_ping(cfg.agent_socket, start + timeout, proc))
        return BootResult(True, time.monotonic() - start, kernel=kernel_version)
    except errdefs.ShimError as e:
        elapsed = time.monotonic() - start
        _stop(proc)
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        why = f"{accel}: {e} after {elapsed:.1f} s"
        if err:
            why += f"; QEMU: {err[-500:]}"
        tail = console_tail(console, 800)
        if tail:
            why += f"; console: {tail}"
        return BootResult(False, elapsed, why)
    finally:
        _stop(proc)
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(run, ignore_errors=True)
