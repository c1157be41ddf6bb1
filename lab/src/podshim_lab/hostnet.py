"""Guard of the host network state a lab with host ports (``cni_portmap``) changes.

With ``Containerd(cri=True, cni_portmap=True)`` the lab's CNI network gives its private
bridge a gateway address and chains the ``portmap`` plugin, so the host reaches pods
and a pod's host port answers on the host. That touches state of the whole host:

* the ``portmap`` plugin adds nat chains (``CNI-HOSTPORT-DNAT``, ``-SETMARK``, ``-MASQ``,
  one ``CNI-DN-<hash>`` per pod) and jumps to them from ``PREROUTING``, ``OUTPUT`` and
  ``POSTROUTING``; only the per-pod chains go on DEL. With iptables-nft the ``nat`` table
  itself (and, through the plugin's DEL, ip6's) is created and never removed;
* the ``bridge`` plugin with ``isGateway`` sets ``net.ipv4.ip_forward=1`` (which also
  flips ``conf.*.forwarding`` and ``conf.all.accept_redirects``);
* ``portmap`` sets ``route_localnet`` on the lab's bridge (gone with the bridge).

:class:`HostNetGuard` takes a host-wide lock (an abstract unix socket, so two such labs
never interleave their snapshots and a dead holder frees it), checks that no address or
route of the host overlaps the lab's subnet, records iptables/ip6tables and the sysctls
before containerd starts and, at close, removes exactly the CNI chains and rules that
were not there before, drops tables that are new and empty, writes back changed
sysctls and reports whatever still differs (:meth:`leftovers`).

Not covered: a lab process killed before ``close()`` leaves these for a later run (the
subreaper's orphan cleanup only knows dirs, links and cgroups); kernel modules loaded
for nat (nf_nat, xt_addrtype, ...) stay loaded; conntrack entries of the test's
connections expire on their own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import subprocess
from pathlib import Path

from podshim_lab import netfilter
from podshim_lab.poll import WaitTimeout, wait_for

__all__ = ["LOCK_NAME", "HostNetError", "HostNetGuard"]

LOCK_NAME = b"\0podshim-lab-hostnet"
SYSCTL = Path("/proc/sys")
#: the global keys the bridge plugin's ip_forward write changes (ip_forward first: writing
#: it resets every conf.*.forwarding and conf.all.accept_redirects)
GLOBAL_KEYS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv4/conf/default/forwarding",
    "net/ipv4/conf/all/accept_redirects",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/conf/default/route_localnet",
    "net/ipv6/conf/all/forwarding",
    "net/ipv6/conf/default/forwarding",
)


class HostNetError(RuntimeError):
    """The guard could not take the lock or the lab's subnet is in use on the host."""


def read_sysctls() -> dict[str, str]:
    """The global keys and every existing interface's ``net.ipv4.conf.<if>.forwarding``."""
    keys = list(GLOBAL_KEYS)
    with contextlib.suppress(OSError):
        keys += [
            f"net/ipv4/conf/{name}/forwarding"
            for name in sorted(os.listdir(SYSCTL / "net/ipv4/conf"))
            if name not in ("all", "default")
        ]
    values: dict[str, str] = {}
    for key in keys:
        with contextlib.suppress(OSError):
            values[key] = (SYSCTL / key).read_text().strip()
    return values


def _ip_json(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(
        ["ip", "-j", "-4", *args], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    data = json.loads(out or "[]")
    return data if isinstance(data, list) else []


def subnet_conflicts(subnet: str) -> list[str]:
    """Addresses and (non-default) routes of the host inside or around ``subnet``."""
    net = ipaddress.ip_network(subnet)
    found = []
    for link in _ip_json("addr"):
        infos = link.get("addr_info")
        for info in infos if isinstance(infos, list) else []:
            local = str(info.get("local", ""))
            if local and ipaddress.ip_address(local) in net:
                found.append(f"address {local} on {link.get('ifname')}")
    for route in _ip_json("route"):
        dst = str(route.get("dst", "default"))
        if dst != "default" and ipaddress.ip_network(dst, strict=False).overlaps(net):
            found.append(f"route {dst} dev {route.get('dev')}")
    return found


class HostNetGuard:
    """See the module docstring: ``acquire()`` before containerd starts, ``restore()`` at
    close, ``leftovers()`` after."""

    def __init__(self, subnet: str, lock_timeout: float = 600.0) -> None:
        self.subnet = subnet
        self.lock_timeout = lock_timeout
        self._lock: socket.socket | None = None
        self._tables: netfilter.Snapshot | None = None
        self._sysctls: dict[str, str] = {}

    def acquire(self) -> None:
        """Take the host-wide lock, check the subnet is free, record the state."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        def bound() -> bool:
            try:
                sock.bind(LOCK_NAME)
            except OSError:
                return False
            return True

        try:
            wait_for(bound, timeout=self.lock_timeout, interval=0.2, message="the hostnet lock")
        except WaitTimeout as exc:
            sock.close()
            raise HostNetError(str(exc)) from None
        self._lock = sock
        try:
            conflicts = subnet_conflicts(self.subnet)
            if conflicts:
                raise HostNetError(f"lab subnet {self.subnet} is in use: {'; '.join(conflicts)}")
            self._tables = netfilter.snapshot()
            self._sysctls = read_sysctls()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _restore_sysctls(self) -> list[str]:
        errors = []
        now = read_sysctls()
        for key, old in self._sysctls.items():  # GLOBAL_KEYS first, ip_forward first of all
            current = now.get(key)
            if current is None or current == old:
                continue
            try:
                (SYSCTL / key).write_text(old + "\n")
            except OSError as exc:
                errors.append(f"sysctl {key}: cannot write back {old!r}: {exc}")
            now = read_sysctls()
        return errors

    def restore(self) -> list[str]:
        """Undo what CNI changed since :meth:`acquire`; release the lock; return errors
        (among them every difference that is left)."""
        if self._tables is None:
            self._release()
            return []
        try:
            errors = netfilter.undo_cni(self._tables)
            errors += self._restore_sysctls()
            errors += self.leftovers()
        finally:
            self._release()
        return errors

    def leftovers(self) -> list[str]:
        """Differences between now and the recorded state (``[]`` when restored)."""
        if self._tables is None:
            return []
        try:
            found = netfilter.differences(self._tables, netfilter.snapshot())
        except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as exc:
            found = [f"iptables: {exc}"]
        now = read_sysctls()
        found += [
            f"sysctl {key.replace('/', '.')} = {now[key]} (was {old})"
            for key, old in self._sysctls.items()
            if key in now and now[key] != old
        ]
        return found
