"""The few Linux system calls the standard library lacks: statfs(2) ``f_type`` and inotify.

Everything goes through libc with ``use_errno=True``; a failing call raises the
matching :class:`OSError` subclass (``FileNotFoundError`` for ``ENOENT``, ...).
eventfd needs nothing here: :func:`os.eventfd` exists since Python 3.10.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_DELETE_SELF = 0x00000400
IN_IGNORED = 0x00008000
IN_Q_OVERFLOW = 0x00004000
IN_CLOEXEC = os.O_CLOEXEC
IN_NONBLOCK = os.O_NONBLOCK

INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of name

_STATFS_BUFSIZE = 256  # struct statfs is 120 bytes on 64-bit Linux, 84/64 on 32-bit


@functools.cache
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.statfs.restype = ctypes.c_int
    lib.inotify_init1.argtypes = [ctypes.c_int]
    lib.inotify_init1.restype = ctypes.c_int
    lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    lib.inotify_add_watch.restype = ctypes.c_int
    return lib


def _raise_errno(what: str, path: str | None = None) -> None:
    err = ctypes.get_errno()
    if path is None:
        raise OSError(err, f"{what}: {os.strerror(err)}")
    raise OSError(err, f"{what}: {os.strerror(err)}", path)


def statfs_type(path: str) -> int:
    """statfs(2) ``f_type`` of the filesystem holding ``path``, as an unsigned 32-bit value.

    ``f_type`` is the first member of ``struct statfs`` on every Linux ABI; it is read as
    a C ``long`` (its type on the common 64-bit ABIs) and masked to 32 bits, which is
    where every filesystem magic number fits.
    """
    buf = ctypes.create_string_buffer(_STATFS_BUFSIZE)
    if _libc().statfs(os.fsencode(path), buf) != 0:
        _raise_errno("statfs", path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def inotify_init1(flags: int) -> int:
    """A new inotify fd (``flags``: :data:`IN_CLOEXEC` | :data:`IN_NONBLOCK`); caller closes it."""
    fd = int(_libc().inotify_init1(flags))
    if fd < 0:
        _raise_errno("inotify_init1")
    return fd


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    """Watch ``path`` on inotify ``fd`` for the events in ``mask``; returns the watch descriptor."""
    wd = int(_libc().inotify_add_watch(fd, os.fsencode(path), mask))
    if wd < 0:
        _raise_errno("inotify_add_watch", path)
    return wd


def parse_inotify_events(data: bytes) -> list[tuple[int, int]]:
    """``(wd, mask)`` of each ``struct inotify_event`` in ``data`` (names are skipped)."""
    events: list[tuple[int, int]] = []
    offset = 0
    while offset + INOTIFY_EVENT.size <= len(data):
        wd, mask, _cookie, name_len = INOTIFY_EVENT.unpack_from(data, offset)
        events.append((wd, mask))
        offset += INOTIFY_EVENT.size + name_len
    return events
