"""The VM pod's network set-up (tap + tc redirect) in a network namespace of the test's
own, without QEMU (root)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
from collections.abc import Awaitable, Callable, Iterator

import pytest

from podshim import errors as errdefs
from podshim.host.uvm import network
from podshim.linux.reaper import Reaper

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def run(coro: Callable[[Reaper], Awaitable[None]]) -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        try:
            await asyncio.wait_for(coro(reaper), 120)
        finally:
            reaper.stop()

    asyncio.run(main())


def ns_cmd(name: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", name, *args], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def links(name: str) -> list[str]:
    out = json.loads(subprocess.run(["ip", "-n", name, "-j", "link"], check=True,
                                    capture_output=True, text=True).stdout)  # fmt: skip
    return sorted(link["ifname"] for link in out)


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with eth0 (a veth whose peer stays inside), 10.77.0.2/24, a
    default route via 10.77.0.1 and MTU 1400."""
    name = f"psuvm-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            ["link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name", "peer0"],
            ["addr", "add", "10.77.0.2/24", "dev", "eth0"],
            ["link", "set", "eth0", "up"],
            ["link", "set", "peer0", "up"],
            ["route", "add", "default", "via", "10.77.0.1"],
        ):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_setup_reads_eth0_and_redirects_both_ways(netns: str) -> None:
    path = f"/var/run/netns/{netns}"
    mac = json.loads(subprocess.run(["ip", "-n", netns, "-j", "link", "show", "eth0"],
                                    check=True, capture_output=True, text=True).stdout)[0]["address"]  # fmt: skip

    async def go(reaper: Reaper) -> None:
        got = await network.setup(reaper, path, "p1")
        assert got.error == "" and got.ingress
        assert got.net == network.PodNet("10.77.0.2", "255.255.255.0", "10.77.0.1", mac, 1400)
        assert got.net.kernel_arg() == "podshim.net=10.77.0.2,255.255.255.0,10.77.0.1,1400"
        assert "tap0" in links(netns)
        tap = ns_cmd(netns, "ip", "-j", "link", "show", "tap0")
        assert '"mtu":1400' in tap and "UP" in tap
        assert "Redirect to device tap0" in ns_cmd(netns, "tc", "filter", "show", "dev", "eth0",
                                                   "ingress")  # fmt: skip
        assert "Redirect to device eth0" in ns_cmd(netns, "tc", "filter", "show", "dev", "tap0",
                                                   "ingress")  # fmt: skip
        again = await network.setup(reaper, path, "p1")  # a tap there already: refused
        assert again.net is None and "exists" in again.error and not again.ingress
        assert await network.teardown(reaper, path, "tap0", True) == []
        assert links(netns) == ["eth0", "lo", "peer0"]
        assert "ingress" not in ns_cmd(netns, "tc", "qdisc", "show", "dev", "eth0")
        assert await network.teardown(reaper, path, "tap0", True) == []  # nothing left: fine

    run(go)


def test_eth0_ingress_of_someone_else_is_not_taken(netns: str) -> None:
    ns_cmd(netns, "tc", "qdisc", "add", "dev", "eth0", "ingress")

    async def go(reaper: Reaper) -> None:
        got = await network.setup(reaper, f"/var/run/netns/{netns}", "p1")
        assert got.net is None and not got.ingress and "tc" in got.error
        assert await network.teardown(reaper, f"/var/run/netns/{netns}", "tap0", got.ingress) == []

    run(go)
    assert "tap0" not in links(netns)
    assert "ingress" in ns_cmd(netns, "tc", "qdisc", "show", "dev", "eth0")  # still theirs


def test_no_ipv4_on_eth0_is_an_error(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "addr", "flush", "dev", "eth0"], check=True)

    async def go(reaper: Reaper) -> None:
        got = await network.setup(reaper, f"/var/run/netns/{netns}", "p1")
        assert got.net is None and "no IPv4 address" in got.error

    run(go)
    assert "tap0" not in links(netns)


def test_sync_teardown_and_a_namespace_that_is_gone(netns: str) -> None:
    path = f"/var/run/netns/{netns}"

    async def go(reaper: Reaper) -> None:
        assert (await network.setup(reaper, path, "p1")).error == ""

    run(go)
    assert network.teardown_sync(path, "tap0", True) == []
    assert "tap0" not in links(netns)
    assert network.teardown_sync("/var/run/netns/psuvm-gone", "tap0", True) == []


def test_check_netns() -> None:
    with pytest.raises(errdefs.InvalidArgument, match="host's network namespace"):
        network.check_netns("/proc/self/ns/net", "p1")
    with pytest.raises(errdefs.InvalidArgument, match="not a network namespace"):
        network.check_netns("/proc/self/ns/ipc", "p1")
