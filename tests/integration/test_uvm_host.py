"""The ``uvm`` pod host with real VMs (QEMU TCG, the prepared guest image), driven
directly (no containerd): boot in a network namespace of the test's own whose eth0 is
a veth to this machine, the guest owning the pod IP, exec in the VM through FIFOs (with
and without a terminal), Share, stats, stacks, host death by ``kill -9`` of QEMU, an
agent that never answers and a guest that dies at boot; after each, nothing is left.
Skipped until ``podshim uvm prepare`` has made the image (failing instead under
``PODSHIM_REQUIRE_UVM=1``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim import errors as errdefs
from podshim.api.cgroups.v2 import metrics_pb2 as v2pb
from podshim.cgroups import stats as cgstats
from podshim.host.control import ExecControl
from podshim.host.uvm import KIND, config, qemu, state, vmops
from podshim.host.uvm.host import UvmHost
from podshim.linux.reaper import Reaper

if TYPE_CHECKING:
    from tests.integration.vmlab import IMAGE_DIR, need_image
else:
    from vmlab import IMAGE_DIR, need_image

BUSYBOX = "/usr/bin/busybox"


@dataclass(frozen=True)
class PodNet:
    name: str
    path: str
    host_ip: str
    pod_ip: str


@contextlib.contextmanager
def _pod_netns(p2p: bool) -> Iterator[PodNet]:
    need_image()
    tag = secrets.token_hex(3)
    name, peer = f"psuvm-{tag}", f"psv{tag}"
    a, b = secrets.randbelow(50) + 200, secrets.randbelow(64) * 4  # not the labs' 10.88
    host_ip, pod_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
    if p2p:  # a /32 pod and a link-local gateway, as Calico's CNI makes them
        host_ip = "169.254.1.1"
        addrs = [["ip", "addr", "add", f"{host_ip}/32", "dev", peer],
                 ["ip", "-n", name, "addr", "add", f"{pod_ip}/32", "dev", "eth0"]]  # fmt: skip
        routes = [["ip", "route", "add", f"{pod_ip}/32", "dev", peer],
                  ["ip", "-n", name, "route", "add", f"{host_ip}/32", "dev", "eth0"],
                  ["ip", "-n", name, "route", "add", "default", "via", host_ip, "dev", "eth0"]]  # fmt: skip
    else:
        addrs = [["ip", "addr", "add", f"{host_ip}/30", "dev", peer],
                 ["ip", "-n", name, "addr", "add", f"{pod_ip}/30", "dev", "eth0"]]  # fmt: skip
        routes = [["ip", "-n", name, "route", "add", "default", "via", host_ip]]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        cmds = [
            ["ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", name],
            addrs[0],
            ["ip", "link", "set", peer, "up"],
            addrs[1],
            ["ip", "-n", name, "link", "set", "eth0", "up", "mtu", "1400"],
            *routes,
        ]
        for cmd in cmds:
            subprocess.run(cmd, check=True)
        yield PodNet(name, f"/var/run/netns/{name}", host_ip, pod_ip)
    finally:
        subprocess.run(["ip", "link", "del", peer], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def pod_net() -> Iterator[PodNet]:
    """A network namespace as CNI leaves it: eth0 (a veth whose peer is on this machine
    with .1 of a /30) holds .2, default route via .1, MTU 1400 (an overlay's)."""
    with _pod_netns(p2p=False) as net:
        yield net


@pytest.fixture
def p2p_net() -> Iterator[PodNet]:
    """The same with a /32 pod address and an off-subnet gateway (169.254.1.1)."""
    with _pod_netns(p2p=True) as net:
        yield net


@pytest.fixture(autouse=True)
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # a long path on purpose: the agent socket is reached through a directory fd
    monkeypatch.setenv("PODSHIM_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


def vm_spec(net: PodNet) -> dict[str, object]:
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    namespaces.append({"type": "network", "path": net.path})
    return {
        "hostname": "vm-pod",
        "linux": {"namespaces": namespaces, "sysctl": {"net.ipv4.ip_forward": "1"}},
    }


def run(coro: Callable[[Reaper], Awaitable[None]]) -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        try:
            await asyncio.wait_for(coro(reaper), 300)
        finally:
            reaper.stop()

    asyncio.run(main())


def settings(**kw: object) -> config.Settings:
    base = config.from_env()
    base.check()
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def in_ns(net: PodNet, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", net.name, *args], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def leftovers(net: PodNet, run_dir: str, qemu_pid: int, start: int) -> list[str]:
    found = []
    if qemu_pid and state.is_our_qemu(qemu_pid, start, run_dir):
        found.append(f"QEMU {qemu_pid}")
    links = json.loads(subprocess.run(["ip", "-n", net.name, "-j", "link"], check=True,
                                      capture_output=True, text=True).stdout)  # fmt: skip
    found += [f"link {link['ifname']}" for link in links if link["ifname"] not in ("lo", "eth0")]
    if "ingress" in in_ns(net, "tc", "qdisc", "show", "dev", "eth0"):
        found.append("eth0 ingress qdisc")
    found += [f"mount {m}" for m in vmops.mounts_under(run_dir)]
    if os.path.lexists(run_dir):
        found.append(f"run dir {run_dir}: {os.listdir(run_dir)}")
    return found


async def exec_out(host: UvmHost, tmp: Path, args: list[str], terminal: bool = False,
                   control: ExecControl | None = None) -> tuple[int, str]:  # fmt: skip
    """Run ``args`` in the VM with a stdout FIFO (and stderr to the same reader)."""
    fifo = tmp / f"out-{secrets.token_hex(3)}"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    chunks: list[bytes] = []
    loop = asyncio.get_running_loop()

    def readable() -> None:
        with contextlib.suppress(BlockingIOError):
            data = os.read(fd, 65536)
            if data:
                chunks.append(data)

    loop.add_reader(fd, readable)
    try:
        status = await host.exec_in_host(args, "", str(fifo), str(fifo), terminal, control)
        await asyncio.sleep(0.05)
        readable()
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return status, b"".join(chunks).decode(errors="replace")


def test_vm_pod(pod_net: PodNet, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello").write_text("hello from the host\n")

    async def go(reaper: Reaper) -> None:
        host = UvmHost("vmpod1", "default", vm_spec(pod_net), reaper, settings())
        await host.create()
        pid = host.init_pid
        start = state.read_record(host.run_dir).start  # type: ignore[union-attr]
        run_dir = host.run_dir
        try:
            agent = host.agent
            info = await agent.ping()
            print(f"accel {host.accel}: QEMU start to agent Ping {host.boot_seconds:.3f} s")
            # the guest owns the pod's IP, hostname and sysctls
            assert pod_net.pod_ip in (await agent.read_file("/proc/net/fib_trie")).decode()
            assert (await agent.read_file("/proc/sys/kernel/hostname")).strip() == b"vm-pod"
            assert (await agent.read_file("/proc/sys/net/ipv4/ip_forward")).strip() == b"1"
            assert (await agent.read_file("/sys/class/net/eth0/mtu")).strip() == b"1400"
            # a TSC clock (the host's rate, recorded by prepare), never 4 ms jiffies
            clock = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
            if qemu.tsc_khz(str(IMAGE_DIR)):  # prepare found an invariant TSC to pass on
                assert (await agent.read_file(clock)).strip() in (b"tsc-early", b"tsc")
            # a file and a directory shared in; exec in the VM through FIFOs
            await host.share(BUSYBOX, "/bin/busybox", True)
            await host.share(str(data), "/mnt/data", True)
            status, out = await exec_out(host, tmp_path, ["/bin/busybox", "uname", "-r"])
            assert (status, out.strip()) == (0, info.kernel) and info.kernel != os.uname().release
            status, out = await exec_out(host, tmp_path, ["/bin/busybox", "cat", "/mnt/data/hello"])
            assert (status, out) == (0, "hello from the host\n")
            status, out = await exec_out(
                host, tmp_path, ["/bin/busybox", "sh", "-c", "echo x > /mnt/data/new"]
            )
            assert status != 0 and not (data / "new").exists()  # read-only
            status, out = await exec_out(
                host, tmp_path, ["/bin/busybox", "tty"], terminal=True,
                control=ExecControl("t1", width=100, height=30),
            )  # fmt: skip
            assert status == 0 and out.strip().startswith("/dev/pts/"), out
            # the guest reaches this machine over the pod's network, and back
            status, out = await exec_out(
                host, tmp_path, ["/bin/busybox", "ping", "-c", "1", "-W", "5", pod_net.host_ip]
            )
            assert status == 0, out
            with pytest.raises(ConnectionRefusedError):  # the guest's RST: nothing listens
                socket.create_connection((pod_net.pod_ip, 9), timeout=10).close()
            # stats, stacks
            got = await host.stats()
            assert got is not None
            m = cgstats.unpack(got)
            assert isinstance(m, v2pb.Metrics)
            assert m.cpu.usage_usec > 0 and m.memory.usage > 16 << 20
            print(f"QEMU RSS {m.memory.usage >> 20} MB, PSS {m.memory.shmem >> 20} MB")
            stacks = await host.dump_stacks()
            assert "=== guest agent ===" in stacks and "=== guest tasks ===" in stacks
            assert len(stacks.split("=== guest tasks ===")[1].strip()) > 0
        finally:
            await host.close()
        assert await host.wait() in (0, 137)
        await host.close()
        assert leftovers(pod_net, run_dir, pid, start) == []

    run(go)


def test_off_subnet_gateway(p2p_net: PodNet, tmp_path: Path) -> None:
    """A /32 pod whose gateway is not on its subnet: the agent routes to the gateway on
    the link first, as CNI did in the pod's namespace."""

    async def go(reaper: Reaper) -> None:
        host = UvmHost("vmpod5", "default", vm_spec(p2p_net), reaper, settings())
        await host.create()
        try:
            routes = (await host.agent.read_file("/proc/net/route")).decode()
            assert "00000000\t0101FEA9" in routes, routes  # default via 169.254.1.1
            await host.share(BUSYBOX, "/bin/busybox", True)
            status, out = await exec_out(
                host, tmp_path, ["/bin/busybox", "ping", "-c", "1", "-W", "5", p2p_net.host_ip]
            )
            assert status == 0, out
            with pytest.raises(ConnectionRefusedError):  # the guest answers on the pod IP
                socket.create_connection((p2p_net.pod_ip, 9), timeout=10).close()
        finally:
            await host.close()

    run(go)


def test_qemu_killed_is_host_death(pod_net: PodNet) -> None:
    async def go(reaper: Reaper) -> None:
        host = UvmHost("vmpod2", "default", vm_spec(pod_net), reaper, settings())
        await host.create()
        pid, run_dir = host.init_pid, host.run_dir
        start = state.read_record(run_dir).start  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        assert await asyncio.wait_for(host.wait(), 30) == 137
        await host.close()
        assert leftovers(pod_net, run_dir, pid, start) == []

    run(go)


def _boot_failure(reaper: Reaper, net: PodNet, change: Callable[[qemu.VmConfig], qemu.VmConfig],
                  timeout: float) -> tuple[UvmHost, float]:  # fmt: skip
    def argv(cfg: qemu.VmConfig) -> list[str]:
        return qemu.qemu_argv(change(cfg))

    host = UvmHost("vmpod3", "default", vm_spec(net), reaper, settings(boot_timeout=timeout),
                   argv_factory=argv)  # fmt: skip
    return host, timeout


def test_agent_that_never_answers(pod_net: PodNet, run_root: Path) -> None:
    def elsewhere(cfg: qemu.VmConfig) -> qemu.VmConfig:
        # the agent serves on another socket: the host's never answers; the console talks
        return dataclasses.replace(cfg, agent_socket="elsewhere.sock",
                                   cmdline=(*cfg.cmdline, "loglevel=7"))  # fmt: skip

    async def go(reaper: Reaper) -> None:
        host, timeout = _boot_failure(reaper, pod_net, elsewhere, 4.0)
        loop = asyncio.get_running_loop()
        t = loop.time()
        with pytest.raises(errdefs.DeadlineExceeded) as err:
            await host.create()
        assert loop.time() - t < timeout + 15  # the deadline, and the teardown
        msg = str(err.value)
        assert "did not answer within 4 s" in msg
        assert "--- guest console (end) ---\n" in msg and "virtio" in msg, msg
        assert reaper.owned == frozenset()
        assert leftovers(pod_net, host.run_dir, 0, 0) == []

    run(go)


def test_guest_that_dies_at_boot(pod_net: PodNet) -> None:
    def no_init(cfg: qemu.VmConfig) -> qemu.VmConfig:
        return dataclasses.replace(cfg, cmdline=(*cfg.cmdline, "rdinit=/nonexistent"))

    async def go(reaper: Reaper) -> None:
        host, _ = _boot_failure(reaper, pod_net, no_init, 60.0)
        with pytest.raises(errdefs.Internal, match="QEMU exited") as err:
            await host.create()
        assert "Kernel panic" in str(err.value), str(err.value)
        assert leftovers(pod_net, host.run_dir, 0, 0) == []

    run(go)


def test_crash_cleanup_without_the_shim(pod_net: PodNet) -> None:
    """The ``delete`` action's cleanup, from the run directory's record alone (the host
    object does nothing meanwhile, as a dead shim would)."""

    async def go(reaper: Reaper) -> None:
        host = UvmHost("vmpod4", "default", vm_spec(pod_net), reaper, settings())
        await host.create()
        pid, run_dir = host.init_pid, host.run_dir
        start = state.read_record(run_dir).start  # type: ignore[union-attr]
        await host.share(BUSYBOX, "/bin/busybox", True)
        assert vmops.mounts_under(run_dir)
        assert "tap0" in in_ns(pod_net, "ip", "link")
        assert KIND.cleanup("default", "vmpod4", {}) == []  # synchronous, as `delete` runs it
        assert leftovers(pod_net, run_dir, pid, start) == []
        assert await asyncio.wait_for(host.wait(), 30) == 137
        await host.close()  # the shim's own close after that finds nothing to do
        assert KIND.cleanup("default", "vmpod4", {}) == []

    run(go)
