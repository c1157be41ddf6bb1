"""mount(2)/umount2(2) through ctypes, for the task rootfs (``Create.rootfs``)."""

from __future__ import annotations

import ctypes
import os

from podshim import errors as errdefs
from podshim import mountinfo

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# option -> (flags to set, flags to clear)
_FLAGS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0),
    "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0),
    "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0),
    "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0),
    "noatime": (MS_NOATIME, 0),
    "nodiratime": (MS_NODIRATIME, 0),
    "bind": (MS_BIND, 0),
    "rbind": (MS_BIND | MS_REC, 0),
    "defaults": (0, 0),
}

_libc = ctypes.CDLL(None, use_errno=True)


def parse_options(options: list[str]) -> tuple[int, str]:
    """Split mount options into mount(2) flags and the filesystem data string."""
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAGS:
            on, off = _FLAGS[opt]
            flags = (flags | on) & ~off
        else:
            data.append(opt)
    return flags, ",".join(data)


def mount(fstype: str, source: str, target: str, options: list[str]) -> None:
    flags, data = parse_options(options)
    if len(data) >= 4096:
        raise errdefs.InvalidArgument(f"mount options for {target} exceed one page")
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source} on {target}: {os.strerror(err)}")
    if flags & MS_BIND and flags & MS_RDONLY:  # a bind mount ignores ro until remounted
        rc = _libc.mount(None, target.encode(), None, flags | MS_REMOUNT, None)
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"remount {target} ro: {os.strerror(err)}")


def unmount(target: str, detach_fallback: bool = True) -> None:
    """Unmount ``target``; with ``detach_fallback``, a busy mount is lazily detached.
    A target that is not a mount point is not an error."""
    if _libc.umount2(target.encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (22, 2):  # EINVAL: not mounted; ENOENT: gone
        return
    if detach_fallback and _libc.umount2(target.encode(), MNT_DETACH) == 0:
        return
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


def unmount_all(target: str) -> None:
    """Unmount everything stacked on ``target`` (at most a few layers): umount2 until the
    kernel says it is no mount point (EINVAL) or gone (ENOENT), a busy layer lazily
    detached. No mountinfo is read: with many pods it is long, and this runs for every
    pin of every pod's teardown."""
    raw = target.encode()
    for _ in range(16):
        if _libc.umount2(raw, 0) == 0:
            continue
        err = ctypes.get_errno()
        if err in (22, 2):  # EINVAL: not (any more) a mount point; ENOENT: gone
            return
        if _libc.umount2(raw, MNT_DETACH) != 0:
            raise OSError(err, f"umount {target}: {os.strerror(err)}")
    if is_mountpoint(target):
        raise OSError(16, f"umount {target}: still mounted after 16 layers")


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    try:
        return any(m.mountpoint == real for m in mountinfo.read())
    except OSError:
        return os.path.ismount(path)
