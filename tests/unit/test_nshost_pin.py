"""The namespaces host makes a pod's namespaces without executing any program (root):
a forked child calls unshare(2)/sethostname(2)/mount(2)/setns(2) and writes sysctls."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest

from podshim import errors as errdefs
from podshim.linux.reaper import Reaper

from .test_nshost_live import Env, env, ino, mounts_under, read  # noqa: F401 (fixture)

ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not ROOT, reason="needs root")


class CountingReaper(Reaper):
    """A reaper that records every program it is asked to run."""

    def __init__(self) -> None:
        super().__init__()
        self.programs: list[Sequence[str]] = []

    def spawn(self, argv: Sequence[str], **kw: Any) -> Any:
        self.programs.append(list(argv))
        return super().spawn(argv, **kw)


def own_netns_spec(e: Env) -> dict[str, Any]:
    return e.spec(
        namespaces=[{"type": "ipc"}, {"type": "uts"}, {"type": "network"}],
        sysctl={"net.ipv4.ping_group_range": "0 7", "kernel.msgmax": "9000"},
        cgroupsPath="",
        resources={},
        annotations={},
    )


def test_pins_its_own_namespaces_without_running_a_program(env: Env) -> None:  # noqa: F811
    host_msgmax = read("/proc/sys/kernel/msgmax")

    async def main() -> None:
        r = CountingReaper()
        r.start()
        host = env.host(r, own_netns_spec(env))
        before = [os.readlink(f"/proc/self/ns/{k}") for k in ("net", "ipc", "uts")]
        try:
            await host.create()
            assert r.programs == []  # no unshare, nsenter, ip or sh: a forked child did it
            net = await host.namespace_path("network")
            ipc = await host.namespace_path("ipc")
            uts = await host.namespace_path("uts")
            assert net == str(env.state_dir / "net") and ipc and uts
            assert sorted(mounts_under(env.state_root)) == sorted(
                [(net, "nsfs"), (ipc, "nsfs"), (uts, "nsfs")]
            )
            for path, own in ((net, "net"), (ipc, "ipc"), (uts, "uts")):
                assert ino(path) != ino(f"/proc/self/ns/{own}")
            # the shim itself stayed where it was
            assert [os.readlink(f"/proc/self/ns/{k}") for k in ("net", "ipc", "uts")] == before

            def look(*argv: str) -> str:
                return subprocess.run(argv, check=True, capture_output=True, text=True).stdout

            assert look("nsenter", f"--uts={uts}", "hostname").strip() == "pod-host"
            assert "UP" in look("nsenter", f"--net={net}", "ip", "-o", "link", "show", "lo")
            ping = look("nsenter", f"--net={net}", "cat", "/proc/sys/net/ipv4/ping_group_range")
            assert ping.split() == ["0", "7"]
            assert look("nsenter", f"--ipc={ipc}", "cat", "/proc/sys/kernel/msgmax").strip() == (
                "9000"
            )
            assert read("/proc/sys/kernel/msgmax") == host_msgmax  # not on the host
            await host.close()
            env.assert_nothing_left()
        finally:
            await host.close()
            r.stop()

    asyncio.run(main())


def test_a_sysctl_the_kernel_refuses_is_invalid_argument_and_leaves_nothing(
    env: Env,  # noqa: F811
) -> None:
    async def main() -> None:
        r = CountingReaper()
        r.start()
        spec = env.spec(sysctl={"net.ipv4.ip_unprivileged_port_start": "not-a-number"})
        host = env.host(r, spec)
        try:
            with pytest.raises(errdefs.InvalidArgument, match="ip_unprivileged_port_start"):
                await host.create()
            assert r.programs == []
            env.assert_nothing_left()
            # CRI's network namespace is not ours: it stays, untouched
            assert os.path.exists(env.netns_path)
        finally:
            await host.close()
            r.stop()

    asyncio.run(main())
