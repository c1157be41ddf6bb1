"""The pod network of a VM: a tap device in the pod's network namespace, joined to CRI's
``eth0`` by tc redirects both ways (as Kata does), so the guest owns the pod's IP.

:func:`setup` runs in a forked child of the shim (the shim itself never changes
namespaces; the child exits right after): it joins the pod's network namespace, reads
``eth0``'s IPv4 address, netmask, MAC and MTU (ioctls) and the default gateway
(``/proc/self/net/route``, which shows the caller's namespace), makes a persistent tap
(``/dev/net/tun``: TUNSETIFF + TUNSETPERSIST, the MTU of ``eth0``, up), reports all that
on a pipe, and then *becomes* ``tc -batch -`` (one exec for the whole set-up) reading::

    qdisc add dev eth0 ingress
    filter add dev eth0 parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev tap0
    qdisc add dev tap0 ingress
    filter add dev tap0 parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev eth0

QEMU, started later in the same namespace, attaches to the tap; the guest gets
``eth0``'s MAC on its virtio-net device and ``podshim.net=<addr>,<mask>,<gw>,<mtu>`` on
its command line (:meth:`PodNet.kernel_arg`), from which the agent sets the guest's
``eth0`` (address, MTU, up, default route) before it first answers, or powers the VM off
saying why (the pod then fails with the console's end). IPv6 addresses of the pod are
not passed on.

:func:`teardown` (and :func:`teardown_sync` for the ``delete`` action) undoes it in the
same way: the tap is deleted (its own qdisc and filter go with it) and ``eth0``'s ingress
qdisc is removed if this host made it. A namespace that is gone took its devices with it.
The namespace itself is CRI's and is never removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import json
import os
import re
import shutil
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from podshim import errors as errdefs
from podshim.linux import ns
from podshim.linux.reaper import Reaper

TAP = "tap0"
DEVICE = "eth0"

NS_GET_NSTYPE = 0xB703
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914
_SIOCGIFADDR, _SIOCGIFNETMASK = 0x8915, 0x891B
_SIOCGIFMTU, _SIOCSIFMTU = 0x8921, 0x8922
_SIOCGIFHWADDR, _SIOCGIFINDEX = 0x8927, 0x8933
_TUNSETIFF, _TUNSETPERSIST = 0x400454CA, 0x400454CB
_IFF_UP, _IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x1, 0x2, 0x1000, 0x4000
_RTF_GATEWAY = 0x2
#: tc's answers to removing what is not there (any more)
_GONE = ("Invalid handle", "Cannot find device", "No such file or directory")
#: how long a helper may take (a loaded machine: generous)
HELPER_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class PodNet:
    """The pod's IPv4 configuration, as CNI left it on ``eth0``."""

    address: str
    netmask: str
    gateway: str
    mac: str
    mtu: int

    def kernel_arg(self) -> str:
        """The kernel argument the guest agent configures its ``eth0`` from."""
        return f"podshim.net={self.address},{self.netmask},{self.gateway},{self.mtu}"


def is_netns(path: str) -> bool:
    """Whether ``path`` is (still) a network namespace file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == ns.CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def check_netns(path: str, pod_id: str) -> None:
    """InvalidArgument unless ``path`` is a network namespace that is not the host's."""
    where = f"linux.namespaces network path {path!r} of pod {pod_id}"
    if not path.startswith("/") or not is_netns(path):
        raise errdefs.InvalidArgument(f"{where}: not a network namespace")
    st = os.stat(path)
    for ref in ("/proc/1/ns/net", "/proc/self/ns/net"):
        with contextlib.suppress(OSError):
            h = os.stat(ref)
            if (h.st_dev, h.st_ino) == (st.st_dev, st.st_ino):
                raise errdefs.InvalidArgument(f"{where}: the host's network namespace")


# -- in the forked child -------------------------------------------------------------------


def _ifreq(sock: socket.socket, request: int, name: str, arg: bytes = b"") -> bytes:
    req = struct.pack("16s24s", name.encode(), arg)
    return fcntl.ioctl(sock.fileno(), request, req)[16:]


def _exists(sock: socket.socket, name: str) -> bool:
    try:
        _ifreq(sock, _SIOCGIFINDEX, name)
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return False
        raise
    return True


def _gateway(device: str) -> str:
    with open("/proc/self/net/route", encoding="ascii") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if len(cols) < 8 or cols[0] != device:
                continue
            dest, gw, flags, mask = cols[1], cols[2], int(cols[3], 16), cols[7]
            if dest == "00000000" and mask == "00000000" and flags & _RTF_GATEWAY:
                return socket.inet_ntoa(struct.pack("<I", int(gw, 16)))
    return ""


def _read_device(sock: socket.socket, device: str) -> PodNet:
    try:
        addr = socket.inet_ntoa(_ifreq(sock, _SIOCGIFADDR, device)[4:8])
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise OSError(exc.errno, f"{device} has no IPv4 address") from None
        raise OSError(exc.errno, f"{device}: {exc.strerror}") from None
    mask = socket.inet_ntoa(_ifreq(sock, _SIOCGIFNETMASK, device)[4:8])
    hw = _ifreq(sock, _SIOCGIFHWADDR, device)[2:8]
    (mtu,) = struct.unpack_from("i", _ifreq(sock, _SIOCGIFMTU, device))
    return PodNet(addr, mask, _gateway(device), ":".join(f"{b:02x}" for b in hw), mtu)


def _tun(name: str, persist: int) -> None:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        fcntl.ioctl(fd, _TUNSETPERSIST, persist)
    finally:
        os.close(fd)


def _make_tap(sock: socket.socket, tap: str, mtu: int) -> None:
    if _exists(sock, tap):
        raise OSError(errno.EEXIST, f"{tap} exists already")
    _tun(tap, 1)
    _ifreq(sock, _SIOCSIFMTU, tap, struct.pack("i", mtu))
    (flags,) = struct.unpack_from("H", _ifreq(sock, _SIOCGIFFLAGS, tap))
    _ifreq(sock, _SIOCSIFFLAGS, tap, struct.pack("H", flags | _IFF_UP))


def _setup_work(netns: str, tap: str, device: str, report: int) -> list[str] | None:
    ns.setns(netns, ns.CLONE_NEWNET)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        net = _read_device(sock, device)
        _make_tap(sock, tap, net.mtu)
    os.write(report, b"net " + json.dumps(_as_dict(net)).encode() + b"\n")
    return [_tc(), "-batch", "-"]


def _as_dict(net: PodNet) -> dict[str, object]:
    return {k: getattr(net, k) for k in PodNet.__slots__}


def _teardown_work(
    netns: str, tap: str, device: str, ingress: bool, report: int
) -> list[str] | None:
    if not is_netns(netns):
        return None  # the namespace is gone, and its devices with it
    ns.setns(netns, ns.CLONE_NEWNET)
    if tap:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            if _exists(sock, tap):
                _tun(tap, 0)  # not persistent any more: gone as its last fd closes
    if ingress:
        return [_tc(), "qdisc", "del", "dev", device, "ingress"]
    return None


def _tc() -> str:
    return shutil.which("tc", path="/usr/sbin:/sbin:/usr/bin:/bin") or "tc"


def _close_inherited(keep: tuple[int, ...]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


#: a child's work: gets the report fd, may return a command for the child to become
Work = Callable[[int], "list[str] | None"]


def _child(work: Work, report: int, stdin: int) -> NoReturn:
    """Run ``work`` (which may return a command to become), reporting a failure."""
    code = 1
    try:
        gc.disable()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)
        _close_inherited((report, stdin))
        try:
            argv = work(report)
        except BaseException as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, OSError) and exc.filename:
                why = f"{exc.filename}: {why}"
            with contextlib.suppress(OSError):
                os.write(report, b"error " + why.encode()[:3000] + b"\n")
            raise
        if argv is not None:
            os.dup2(stdin if stdin >= 0 else os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(report, 1)
            os.dup2(report, 2)
            os.execv(argv[0], argv)
        code = 0
    finally:
        os._exit(code)


def _fork(work: Work, stdin_data: bytes) -> tuple[int, int]:
    """Fork a child running ``work``; (its pid, the read end of its report pipe)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    sr, sw = os.pipe2(os.O_CLOEXEC) if stdin_data else (-1, -1)
    try:
        if stdin_data:
            os.write(sw, stdin_data)  # a few hundred bytes: fits the pipe
            os.close(sw)
            sw = -1
        pid = os.fork()
        if pid == 0:  # pragma: no cover - reports through the pipe
            _child(work, w, sr)
        return pid, r
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
        for fd in (sr, sw):
            if fd >= 0:
                os.close(fd)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = bytearray()
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            out += chunk
    os.close(fd)
    return bytes(out)


async def _run(reaper: Reaper, work: Work,
               stdin_data: bytes = b"") -> tuple[int, bytes]:  # fmt: skip
    since = reaper.mark()
    pid, r = _fork(work, stdin_data)
    exited = reaper.watch(pid, since)
    try:
        async with asyncio.timeout(HELPER_TIMEOUT):
            ex = await asyncio.shield(exited)
    except (asyncio.CancelledError, TimeoutError):
        if not exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.wait([exited])
        os.close(r)
        raise
    return ex.status, _read_all(r)


def _tc_commands(tap: str, device: str) -> bytes:
    redirect = "protocol all u32 match u8 0 0 action mirred egress redirect dev"
    return (
        f"qdisc add dev {device} ingress\n"
        f"filter add dev {device} parent ffff: {redirect} {tap}\n"
        f"qdisc add dev {tap} ingress\n"
        f"filter add dev {tap} parent ffff: {redirect} {device}\n"
    ).encode()


@dataclass(frozen=True, slots=True)
class SetupResult:
    """What :func:`setup` made: the pod's network, and whether eth0's ingress qdisc is
    ours (to remove) even when the set-up failed half-way."""

    net: PodNet | None
    ingress: bool
    error: str = ""


def _parse_setup(status: int, report: bytes) -> SetupResult:
    text = report.decode(errors="replace")
    first, _, rest = text.partition("\n")
    if first.startswith("error "):
        return SetupResult(None, False, first[6:])
    if not first.startswith("net "):
        return SetupResult(None, False, text.strip() or f"helper exited {status}")
    raw = json.loads(first[4:])
    net = PodNet(str(raw["address"]), str(raw["netmask"]), str(raw["gateway"]),
                 str(raw["mac"]), int(raw["mtu"]))  # fmt: skip
    if status == 0:
        return SetupResult(net, True)
    # tc -batch says which line failed: from the second on, eth0's ingress is ours
    m = re.search(r"Command failed -:(\d+)", rest)
    ours = m is not None and int(m.group(1)) >= 2
    return SetupResult(None, ours, f"tc: {rest.strip() or f'exited {status}'}")


async def setup(reaper: Reaper, netns: str, pod_id: str, tap: str = TAP,
                device: str = DEVICE) -> SetupResult:  # fmt: skip
    """Make the tap and the redirects in ``netns`` (see the module docstring). A result
    with an ``error`` means the set-up failed; the caller undoes it with
    :func:`teardown` (the tap may exist; ``ingress`` says whether eth0's qdisc is ours)."""
    status, report = await _run(
        reaper, lambda report: _setup_work(netns, tap, device, report), _tc_commands(tap, device)
    )
    return _parse_setup(status, report)


def _parse_teardown(status: int, report: bytes) -> list[str]:
    if status == 0:
        return []
    text = report.decode(errors="replace").strip()
    if text.startswith("error "):
        return [text[6:]]
    if any(g in text for g in _GONE):
        return []  # tc: no such qdisc or device any more
    return [f"tc qdisc del: {text or f'exited {status}'}"]


async def teardown(reaper: Reaper, netns: str, tap: str, ingress: bool,
                   device: str = DEVICE) -> list[str]:  # fmt: skip
    """Remove the tap and (if ``ingress``) eth0's ingress qdisc; returns problems."""
    status, report = await _run(
        reaper, lambda report: _teardown_work(netns, tap, device, ingress, report)
    )
    return [f"network of {netns}: {p}" for p in _parse_teardown(status, report)]


def teardown_sync(netns: str, tap: str, ingress: bool, device: str = DEVICE) -> list[str]:
    """:func:`teardown` without a reaper (the ``delete`` action): waits for its child."""
    if not is_netns(netns):
        return []
    pid, r = _fork(lambda report: _teardown_work(netns, tap, device, ingress, report), b"")
    _, wait_status = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(wait_status)
    report = _read_all(r)
    return [f"network of {netns}: {p}" for p in _parse_teardown(status, report)]
