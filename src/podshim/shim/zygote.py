"""The pre-warmed parent ("zygote") that forks shim daemons: what ``start`` asks of it
(this module, standard library only) and how it works (the zygote itself is
:mod:`podshim.shim.zygote_server`).

Every pod starts a shim. Spawned fresh, each daemon pays Python's start-up and ~130 ms of
imports, and keeps ~14 MB of private memory. Forked from one parent that has already
imported everything (and frozen its objects with ``gc.freeze()``), a daemon starts at
once and shares those pages copy-on-write.

* **One per containerd instance and podshim version**: its socket is
  ``/run/podshim/z/<sha256(address//zygote-<version>)>`` (an upgraded podshim forks from
  a zygote of its own; the old one leaves once idle).
  ``start`` spawns it on first use (detached, its own session, stdio on /dev/null, the
  environment containerd gave the shim) and asks it to fork a daemon, passing the
  listening socket with SCM_RIGHTS. Any failure falls back to spawning the daemon.
* **Lifetime**: it exits when it has had no live child for ``IDLE_SECONDS``, or as soon as
  the containerd that first used it exits. Forked daemons do not depend on it: they are
  full shims in their own sessions and outlive it.
* It is single-threaded (forking is safe), reaps its children, and counts as a shim
  process in every leak check and memory figure (comm ``podshim-zygote``).
* On by default in pod scope (the launcher, ``launcher_zygote.c``, asks it itself once
  it listens; Python's ``start`` spawns it when none does): ``zygote = false`` in the
  podshim config, or ``PODSHIM_ZYGOTE=0`` in containerd's environment, turns it off.

**The exchange** (one connection per daemon): ``start`` sends one line of JSON (the
fields of :data:`REQUEST_FIELDS`, ``"v": PROTOCOL``) in one message, with the listening
socket as the only SCM_RIGHTS fd. The zygote answers one line, ``{"v": 2, "pid": N}`` or
``{"error": "..."}``. Only root peers are served (SO_PEERCRED), and ``socket`` must be the
file, directly in the shim socket directory, that the passed socket listens on (the
kernel's unix sock_diag says which file that is, see :func:`bound_file`; a kernel without
it, CONFIG_UNIX_DIAG, gets every request refused, so ``start`` spawns its daemons, and
daemons that leave their socket file to ``delete`` and ``start``, which remove stale ones).

**Exactly one daemon per socket**: the forked daemon serves only after reading
:data:`GO`, which ``start`` sends once it has the pid; then ``start`` is committed and never
falls back. A ``start`` that timed out closes the connection instead (and spawns its own
daemon): the forked daemon reads EOF and exits without serving, and a zygote that sees
the hang-up before forking does not fork at all. A daemon that waited too long for the
go shuts down its read side first (after that ``start``'s send of the go fails with
EPIPE, so ``start`` falls back) and then serves only if the go had arrived before.
"""

from __future__ import annotations

import _socket
import json
import os
import socket
import stat
import struct
import time

from podshim import __version__, rundir
from podshim.shim.flags import Flags
from podshim.shim.spawn import self_command, spawn_detached

#: version of the exchange; the daemon of a ``"v": 2`` reply waits for :data:`GO`
PROTOCOL = 2
#: the byte ``start`` sends once it has the daemon's pid: the daemon may serve
GO = b"\x01"
#: the request's fields and their JSON types (all required, no others)
REQUEST_FIELDS: dict[str, type] = {
    "v": int,
    "namespace": str,
    "id": str,
    "address": str,
    "bundle": str,
    "socket": str,
    "debug": bool,
    "containerd_pid": int,
}
#: seconds ``start`` waits for the zygote's answer (then falls back);
#: ``PODSHIM_ZYGOTE_TIMEOUT`` in the environment overrides it
TIMEOUT = 10.0
#: seconds ``start`` waits for a zygote it spawned to listen
SPAWN_WAIT = 5.0


def zygote_name(address: str) -> str:
    """The zygote's socket name: one per containerd address *and podshim version* (as a
    node daemon's), so that after an upgrade new pods are forked from a zygote of the new
    code while the old one idles out."""
    return rundir.digest(f"{address}//zygote-{__version__}")[:40]


def zygote_path(address: str) -> str:
    return os.path.join(rundir.zygote_dir(), zygote_name(address))


# -- which file a listening socket is bound to (the zygote and the daemon check it) -----
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_UDIAG_SHOW_VFS = 0x2
_UNIX_DIAG_VFS = 1
_TCP_LISTEN = 10
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie
_NO_COOKIE = (0xFFFFFFFF, 0xFFFFFFFF)


def bound_file(fd: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file the listening unix stream socket ``fd`` was bound
    to, as the kernel's sock_diag reports it (``fstat`` of a socket describes the socket,
    not its file; the file's inode stays the same however it is linked or unlinked while
    the socket lives). None when ``fd`` is no such socket, or sock_diag cannot say."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            return None
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    except OSError:
        return None
    with nl:
        nl.settimeout(2.0)
        try:
            req = _UNIX_DIAG_REQ.pack(
                socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, st.st_ino, _UDIAG_SHOW_VFS, *_NO_COOKIE
            )
            hdr = _NLMSG_HDR.pack(_NLMSG_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY, 1, 1, 0)
            nl.sendto(hdr + req, (0, 0))  # NLM_F_REQUEST, to the kernel
            data = nl.recv(8192)
        except (OSError, struct.error):
            return None
    try:
        length, kind, _, _, _ = _NLMSG_HDR.unpack_from(data)
        if kind == _NLMSG_ERROR:
            return None
        _, type_, state, _, got, _, _ = _UNIX_DIAG_MSG.unpack_from(data, _NLMSG_HDR.size)
        if got != st.st_ino or type_ != socket.SOCK_STREAM or state != _TCP_LISTEN:
            return None
        off = _NLMSG_HDR.size + _UNIX_DIAG_MSG.size
        while off + 4 <= min(length, len(data)):
            alen, atype = struct.unpack_from("=HH", data, off)
            if alen < 4:
                break
            if atype == _UNIX_DIAG_VFS and alen >= 12:
                vfs_ino, kdev = struct.unpack_from("=II", data, off + 4)
                return os.makedev(kdev >> 20, kdev & 0xFFFFF), vfs_ino  # kernel dev_t
            off += (alen + 3) & ~3
    except struct.error:
        pass
    return None


def in_socket_dir(path: str) -> bool:
    """``path`` names an entry directly in the shim socket directory (no ``..``, no ``.``)."""
    return (
        os.path.isabs(path)
        and os.path.normpath(path) == path
        and os.path.dirname(path) == os.path.normpath(os.path.abspath(rundir.sockets_dir()))
        and not os.path.basename(path).startswith(".")
    )


def is_socket_file_of(path: str, fd: int) -> bool:
    """``path`` is, directly in the shim socket directory, the socket file the listening
    socket ``fd`` is bound to: the only file a shim may remove, or a zygote fork for."""
    if not in_socket_dir(path):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and bound_file(fd) == (st.st_dev, st.st_ino)


# -- client side (runs in `start`) ------------------------------------------------------
def _timeout() -> float:
    try:
        return float(os.environ.get("PODSHIM_ZYGOTE_TIMEOUT") or TIMEOUT)
    except ValueError:
        return TIMEOUT


def _connect(path: str, timeout: float) -> socket.socket | None:
    """A connection to the zygote at ``path``; None when no zygote listens there."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None
    except BaseException:
        s.close()
        raise
    return s


def _read_line(s: socket.socket, deadline: float) -> bytes:
    buf = b""
    while b"\n" not in buf and len(buf) < 4096:
        s.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def _exchange(s: socket.socket, request: dict[str, object], fd: int, timeout: float) -> int:
    """Ask over ``s`` for a daemon serving ``fd``; returns its pid once it may serve.

    Raises:
        OSError: no daemon will serve ``fd`` (refused, or no answer within ``timeout``):
            the caller may serve it otherwise.
    """
    deadline = time.monotonic() + timeout
    socket.send_fds(s, [json.dumps(request).encode() + b"\n"], [fd])
    try:
        reply = json.loads(_read_line(s, deadline) or b"{}")
    except ValueError as exc:
        raise OSError(f"zygote: bad answer: {exc}") from None
    if not isinstance(reply, dict):
        raise OSError(f"zygote: bad answer: {reply!r}")
    pid = reply.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        raise OSError(f"zygote: {reply.get('error', 'no pid')}")
    if reply.get("v") == PROTOCOL:  # the daemon waits for this; once sent, we are committed
        s.settimeout(max(0.001, deadline - time.monotonic()))
        s.sendall(GO)  # fails (EPIPE) if the daemon gave up on us: then it never serves
    return pid  # (an older zygote's daemon serves at once)


def _spawn_zygote(flags: Flags) -> None:
    cmd = ["-address", flags.address, "-namespace", flags.namespace, "zygote"]
    spawn_detached(self_command() + cmd)


def request_fork(flags: Flags, bundle: str, sock: _socket.socket, socket_path: str) -> int:
    """Have this containerd's zygote fork a daemon serving ``sock``; returns its pid.

    Spawns the zygote when none listens. A zygote that listens but does not answer in
    time is not asked again: its daemon (if it forks one) never serves, see the module doc.

    Raises:
        OSError: no zygote daemon will serve ``sock`` (the caller spawns the daemon itself).
    """
    path = zygote_path(flags.address)
    timeout = _timeout()
    request = {
        "v": PROTOCOL,
        "namespace": flags.namespace,
        "id": flags.id,
        "address": flags.address,
        "bundle": bundle,
        "socket": socket_path,
        "debug": flags.debug,
        "containerd_pid": os.getppid(),
    }
    s = _connect(path, timeout)
    if s is None:
        _spawn_zygote(flags)
        deadline = time.monotonic() + SPAWN_WAIT
        while s is None:
            if time.monotonic() > deadline:
                raise OSError(f"zygote: nothing listens on {path}")
            time.sleep(0.01)
            s = _connect(path, timeout)
    with s:
        return _exchange(s, request, sock.fileno(), timeout)
