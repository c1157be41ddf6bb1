"""The prepared guest image boots and its agent works (``podshim uvm prepare``'s output).

QEMU (TCG here) boots ``/var/lib/podshim/uvm``'s kernel and initrd with the command line
of :mod:`podshim.host.uvm.qemu`; :class:`AgentClient` talks to the real agent over the
virtio-serial port. Skipped, naming the command, when the image is not prepared (failed
under ``PODSHIM_REQUIRE_UVM=1``, as CI runs it). Also measures boot time (Popen to the
agent's answer) and QEMU's memory (PSS) of an idle VM, and prints both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim.errors import ShimError
from podshim.host.uvm import agentapi, qemu
from podshim.host.uvm.agentapi import SpawnSpec
from podshim.host.uvm.agentclient import AgentClient
from podshim.host.uvm.guest import probe

if TYPE_CHECKING:
    from tests.integration.vmlab import IMAGE_DIR, need_image
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    from vmlab import IMAGE_DIR, need_image

#: generous: other tests load the machine (an idle TCG boot takes ~0.5 s)
BOOT_DEADLINE = 30.0


@pytest.fixture(autouse=True)
def _image() -> None:
    need_image()


@dataclass
class Vm:
    proc: subprocess.Popen[bytes]
    client: AgentClient
    share: Path
    console: Path
    boot_s: float


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _start(run: Path, **kw: object) -> tuple[subprocess.Popen[bytes], qemu.VmConfig]:
    kernel, initrd, tools = qemu.image_paths(str(IMAGE_DIR))
    (run / "share").mkdir(exist_ok=True)
    cfg = qemu.VmConfig(
        kernel=kernel,
        initrd=initrd,
        tools_dir=tools,
        agent_socket=str(run / "agent.sock"),
        console_log=str(run / "console.log"),
        share_dir=str(run / "share"),
        **kw,  # type: ignore[arg-type]
    )
    proc = subprocess.Popen(
        qemu.qemu_argv(cfg),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, cfg


@contextlib.asynccontextmanager
async def booted(run: Path, **kw: object) -> AsyncIterator[Vm]:
    """A VM booted to its agent; killed (and reaped) on the way out, whatever happened."""
    start = time.monotonic()
    proc, cfg = _start(run, **kw)
    client = AgentClient(cfg.agent_socket)
    try:
        try:
            await probe.wait_ping(cfg.agent_socket, start + BOOT_DEADLINE, proc)
        except Exception as e:
            raise AssertionError(
                f"no agent: {e}; console: {probe.console_tail(cfg.console_log)}"
            ) from e
        yield Vm(proc, client, run / "share", Path(cfg.console_log), time.monotonic() - start)
    finally:
        await client.close()
        _kill(proc)


async def run_in_guest(client: AgentClient, key: str, *args: str) -> tuple[int, str]:
    """Run a guest program to its end: (status, stdout + stderr)."""
    await client.spawn(SpawnSpec(key=key, args=args, stdout=True, stderr=True))
    out = b""
    for stream in (agentapi.STDOUT, agentapi.STDERR):
        while True:
            chunk = await client.read(key, stream)
            out += chunk.data
            if chunk.eof:
                break
    status = await client.wait(key)
    await client.release(key)
    return status, out.decode(errors="replace")


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # a short path: unix socket paths are limited to 108 bytes
    d = Path(tempfile.mkdtemp(prefix="uvm-boot-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_guest(run_dir: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox-static not installed (the guest image has no shell tools)")

    async def body() -> None:
        async with booted(run_dir) as vm:
            info = await vm.client.ping()
            # uname -r of a program run in the guest: the guest kernel, not the host's
            shutil.copy(busybox, vm.share / "busybox")
            bb = f"{agentapi.GUEST_SHARE}/busybox"
            status, out = await run_in_guest(vm.client, "uname", bb, "uname", "-r")
            assert status == 0, out
            assert out.strip() == info.kernel != os.uname().release
            # a pure cgroup v2 hierarchy with the controllers runc needs
            mounts = (await vm.client.read_file("/proc/mounts")).decode()
            assert any(
                line.split()[1:3] == ["/sys/fs/cgroup", "cgroup2"] for line in mounts.splitlines()
            ), mounts
            controllers = (await vm.client.read_file("/sys/fs/cgroup/cgroup.controllers")).split()
            assert {b"memory", b"pids", b"cpu"} <= set(controllers), controllers
            # the 9p share, both ways
            (vm.share / "from-host").write_text("hello guest")
            got = await vm.client.read_file(f"{agentapi.GUEST_SHARE}/from-host")
            assert got == b"hello guest"
            await vm.client.write_file(f"{agentapi.GUEST_SHARE}/from-guest", b"hello host")
            assert (vm.share / "from-guest").read_bytes() == b"hello host"
            # runc and its libraries: links in the initramfs into the read-only tools
            # share (every VM's); it cannot be written from the guest
            status, out = await run_in_guest(vm.client, "runc", "/usr/sbin/runc", "--version")
            assert status == 0 and "runc version" in out, out
            with pytest.raises(ShimError, match=r"(?i)read-only"):
                await vm.client.write_file(f"{agentapi.GUEST_TOOLS}/usr/sbin/runc", b"x")
            # Shutdown powers the VM off: QEMU exits by itself (-no-reboot)
            await vm.client.shutdown()
            deadline = time.monotonic() + BOOT_DEADLINE
            while vm.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert vm.proc.poll() is not None, "QEMU still runs after Shutdown"

    asyncio.run(body())


def test_boot_time(run_dir: Path) -> None:
    times: list[float] = []

    async def once(i: int) -> None:
        d = run_dir / str(i)
        d.mkdir()
        async with booted(d) as vm:
            times.append(vm.boot_s)

    for i in range(5):
        asyncio.run(once(i))
    median = statistics.median(times)
    print(f"\nVM boot (Popen -> Ping answered, {qemu.accel(str(IMAGE_DIR))}): "
          f"median {median:.3f} s of {[round(t, 3) for t in times]}")  # fmt: skip
    assert median < 5.0, times  # ~0.5 s idle here; a loaded machine is slower


def _pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise AssertionError(f"no Pss in /proc/{pid}/smaps_rollup")


@pytest.mark.parametrize(
    ("memory_mb", "tb_size_mb"), [(256, None), (128, None), (128, 32), (128, 16)]
)
def test_idle_memory(run_dir: Path, memory_mb: int, tb_size_mb: int | None) -> None:
    async def body() -> int:
        async with booted(run_dir, memory_mb=memory_mb, tb_size_mb=tb_size_mb) as vm:
            await vm.client.ping()
            await asyncio.sleep(1.0)  # idle: what boot touched stays
            return _pss_kb(vm.proc.pid)

    pss = asyncio.run(body())
    print(f"\nQEMU PSS, idle VM with {memory_mb} MB, tb-size {tb_size_mb or 'default'}: "
          f"{pss / 1024:.0f} MB")  # fmt: skip
    assert pss < (memory_mb + 160) * 1024  # guest RAM touched + translation cache + QEMU
