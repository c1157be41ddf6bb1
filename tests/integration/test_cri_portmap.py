"""critest's "runtime should support port mapping with host port and container port"
(``kubernetes-sigs/cri-tools`` ``pkg/validate/networking.go``), on podshim and on runc.

A pod maps a free host port H to container port C; a busybox ``nc`` server in it
answers each connection with a line made of what it read and the pod's hostname. The
host connects to ``127.0.0.1:H`` (as critest does) and to its own non-loopback address
on H, and checks the bytes that come back; once the pod is removed, H is refused again.

The module's lab is the two-handler CRI lab of ``criutil`` with ``cni_portmap=True``:
its bridge has a gateway address and its CNI network chains the ``portmap`` plugin,
under ``podshim_lab.hostnet``'s guard, so the lab's teardown check (``leftovers()``)
also asserts the host's iptables/ip6tables and forwarding sysctls are as they were.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim_lab import netfilter, wait_for
from podshim_lab.cri.client import api

if TYPE_CHECKING:
    from tests.integration import criutil as cu
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criutil as cu

cri = cu.cri
HANDLERS = pytest.mark.parametrize("handler", [cu.PODSHIM, cu.RUNC])
CONTAINER_PORT = 8080
#: the server: for each connection, read a line and answer "pong-<line>-<hostname>"
ANSWER = 'read line; echo "pong-$line-$(hostname)"'
SERVE = (
    f"printf '#!/bin/sh\\n%s\\n' '{ANSWER}' > /answer && chmod +x /answer && "
    f"exec nc -ll -p {CONTAINER_PORT} -e /answer"
)


@pytest.fixture(scope="module")
def cri_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cu.CriLab]:
    """``criutil.cri_lab`` with ``cni_portmap=True`` (host ports answer on the host)."""
    if not any(Path(p).is_file() for p in ("/bin/busybox", "/usr/bin/busybox")):
        pytest.skip("busybox not installed (apt-get install busybox-static)")
    lab, crilab = cu.open_cri_lab(tmp_path_factory.mktemp("podshim-portmap"), cni_portmap=True)
    try:
        yield crilab
    finally:
        errors = cu.close_cri_lab(lab, crilab)
        assert not errors, "CRI lab teardown left things behind:\n" + "\n".join(errors)


def free_port() -> int:
    """A TCP port nothing on the host listens on right now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def host_address(lab_subnet: str) -> str | None:
    """A global IPv4 address of the host outside the lab's subnet (None if it has none)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    prefix = lab_subnet.rsplit(".", 1)[0] + "."
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            local = str(info.get("local", ""))
            if local and not local.startswith(prefix):
                return local
    return None


def exchange(host: str, port: int, line: str) -> bytes | None:
    """Connect, send ``line``, read to EOF; ``None`` if the connection failed."""
    try:
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(line.encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(4096):
                chunks.append(chunk)
    except OSError:
        return None
    return b"".join(chunks)


def refused(host: str, port: int) -> bool:
    """True if a connection to ``host:port`` is refused (nothing answers there)."""
    try:
        with socket.create_connection((host, port), timeout=10):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def check_answer(host: str, port: int, hostname: str) -> None:
    """Poll until ``host:port`` answers a fresh line as the pod's server does (it may
    still be starting); fail with the last answer."""
    line = secrets.token_hex(6)
    expected = f"pong-{line}-{hostname}\n".encode()
    last: list[bytes | None] = [None]

    def got() -> bool:
        last[0] = exchange(host, port, line)
        return last[0] == expected

    wait_for(
        got,
        timeout=cu.DEADLINE,
        interval=0.2,
        message=lambda: f"{host}:{port} to answer {expected!r} (last: {last[0]!r})",
    )


def wait_refused(host: str, port: int) -> None:
    wait_for(
        lambda: refused(host, port),
        timeout=cu.DEADLINE,
        interval=0.2,
        message=f"{host}:{port} to be refused",
    )


def dnat_chains() -> list[str]:
    """The per-pod chains of the portmap plugin in the host's nat table."""
    nat = netfilter.snapshot()["ipv4"].get("nat")
    return [c for c in (nat.chains if nat else {}) if c.startswith("CNI-DN-")]


@HANDLERS
def test_port_mapping_with_host_port(cri: cu.CriLab, handler: str) -> None:
    host_port = free_port()
    assert refused("127.0.0.1", host_port), f"port {host_port} answers before the pod exists"
    chains_before = dnat_chains()
    hostname = f"pm-{secrets.token_hex(3)}"
    config = cri.pod_config("portmap", pid_mode="POD", hostname=hostname)
    config.port_mappings.add(protocol=api.TCP, container_port=CONTAINER_PORT, host_port=host_port)
    pod = cri.run_pod(config, handler)
    cri.container(pod, "server", ["sh", "-c", SERVE])
    assert len(dnat_chains()) == len(chains_before) + 1, "portmap made no DNAT chain"

    # the host reaches the pod's IP through the lab bridge's gateway address
    pod_ip = cri.cri.pod_status(pod).ip
    assert pod_ip, cri.cri.pod_status(pod).raw
    check_answer(pod_ip, CONTAINER_PORT, hostname)
    # the host port, on loopback (as critest checks) and on the host's own address
    addresses = ["127.0.0.1", *filter(None, [host_address(cri.lab.paths.subnet)])]
    for address in addresses:
        check_answer(address, host_port, hostname)

    cri.cri.stop_pod(pod)
    cri.cri.remove_pod(pod)
    cri.pods[pod].removed = True
    cri.wait_gone(pod)
    assert dnat_chains() == chains_before
    for address in addresses:
        wait_refused(address, host_port)
