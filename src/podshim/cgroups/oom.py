"""OOM-kill notifications for a container's memory cgroup, for ``TaskOOM`` events.

Two watchers expose one non-blocking shape: :meth:`fileno` to register with
``loop.add_reader``, :meth:`read` when it is readable, :attr:`closed` once the cgroup
is gone, :meth:`close` to release the fds (also a context manager).

* :class:`OomWatcherV1`: the cgroup v1 ``memory.oom_control`` notification. An eventfd
  and the ``memory.oom_control`` fd are written to ``cgroup.event_control``; the kernel
  then adds 1 to the eventfd on each OOM, and once more when the cgroup is removed.
* :class:`OomWatcherV2`: cgroup v2 has no such API; inotify ``IN_MODIFY`` on
  ``memory.events`` wakes us and the ``oom_kill`` counter says whether anything was
  killed (as containerd's v2 OOM watcher does).

:func:`watch_oom` drives either one on the running asyncio loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from types import TracebackType
from typing import Self

from podshim import errors as errdefs
from podshim.cgroups import _sys
from podshim.cgroups._fs import read_flat_keyed

__all__ = ["OomWatcher", "OomWatcherV1", "OomWatcherV2", "open_watcher", "watch_oom"]

log = logging.getLogger("podshim.cgroups.oom")


class _Watcher:
    """Shared fd ownership: ``close()`` is idempotent and always releases the fd."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._removed = False

    def fileno(self) -> int:
        """The fd that becomes readable when :meth:`read` has something to say."""
        if self._fd < 0:
            raise ValueError(f"OOM watcher for {self.path} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """True once the cgroup was seen removed or :meth:`close` was called."""
        return self._removed or self._fd < 0

    def close(self) -> None:
        """Release the fd; safe to call more than once."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class OomWatcherV1(_Watcher):
    """OOM notifications of the cgroup v1 memory cgroup directory ``path``.

    Raises :class:`~podshim.errors.NotFound` if ``path`` is not a memory cgroup
    (no ``memory.oom_control``); other registration failures raise :class:`OSError`.
    No fd is left open on failure.
    """

    def __init__(self, path: str) -> None:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self._register(path, efd)
        except BaseException:
            os.close(efd)
            raise
        super().__init__(path, efd)

    @staticmethod
    def _register(path: str, efd: int) -> None:
        """Ask the kernel to signal ``efd`` on OOM in ``path``."""
        try:
            ocfd = os.open(os.path.join(path, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise errdefs.NotFound(f"memory cgroup {path}: no memory.oom_control") from None
        try:
            # The kernel takes its own references; our oom_control fd can go at once.
            with open(os.path.join(path, "cgroup.event_control"), "w") as control:
                control.write(f"{efd} {ocfd}")
        except FileNotFoundError:
            raise errdefs.NotFound(f"memory cgroup {path}: removed") from None
        finally:
            os.close(ocfd)

    def read(self) -> int:
        """How many OOMs happened since the last call (0 if none), without blocking.

        The eventfd counter also counts the cgroup's removal; if
        ``memory.oom_control`` is gone the watcher marks itself :attr:`closed` and that
        one count is not reported as an OOM.
        """
        if self.closed:
            return 0
        try:
            count = int.from_bytes(os.read(self._fd, 8), "little")
        except BlockingIOError:
            return 0
        if not os.path.exists(os.path.join(self.path, "memory.oom_control")):
            self._removed = True
            return max(count - 1, 0)
        return count


class OomWatcherV2(_Watcher):
    """OOM kills in the cgroup v2 directory ``path``, from ``memory.events`` ``oom_kill``.

    OOM kills before construction are not reported. Raises
    :class:`~podshim.errors.NotFound` if ``path`` has no ``memory.events`` (no memory
    controller there, or no such cgroup); no fd is left open on failure.
    """

    def __init__(self, path: str) -> None:
        fd = _sys.inotify_init1(_sys.IN_CLOEXEC | _sys.IN_NONBLOCK)
        events = os.path.join(path, "memory.events")
        try:
            try:
                self._wd = _sys.inotify_add_watch(fd, events, _sys.IN_MODIFY | _sys.IN_DELETE_SELF)
            except FileNotFoundError:
                raise errdefs.NotFound(f"cgroup {path}: no memory.events") from None
            counters = read_flat_keyed(events)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(path, fd)
        self._oom_kill = 0 if counters is None else counters.get("oom_kill", 0)
        if counters is None:
            self._removed = True

    def read(self) -> int:
        """How many processes were OOM-killed since the last call (0 if none), without
        blocking; marks the watcher :attr:`closed` when ``memory.events`` is gone."""
        if self.closed:
            return 0
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            data = b""
        for wd, mask in _sys.parse_inotify_events(data):
            if wd == self._wd and mask & (_sys.IN_IGNORED | _sys.IN_DELETE_SELF):
                self._removed = True
        counters = read_flat_keyed(os.path.join(self.path, "memory.events"))
        if counters is None:
            self._removed = True
            return 0
        current = counters.get("oom_kill")
        if current is None:  # not a complete memory.events: keep the baseline
            return 0
        count, self._oom_kill = max(current - self._oom_kill, 0), current
        return count


OomWatcher = OomWatcherV1 | OomWatcherV2


def open_watcher(path: str) -> OomWatcher:
    """The watcher matching the memory cgroup directory ``path``: v2 if it has
    ``memory.events``, else v1. :class:`~podshim.errors.NotFound` if it is neither."""
    if os.path.exists(os.path.join(path, "memory.events")):
        return OomWatcherV2(path)
    return OomWatcherV1(path)


async def watch_oom(
    path: str,
    on_oom: Callable[[], None],
    *,
    recheck_interval: float = 5.0,
) -> None:
    """Call ``on_oom()`` after each OOM in memory cgroup ``path``, until the cgroup goes.

    ``on_oom`` is called once per wake-up that saw at least one OOM (bursts coalesce,
    as in containerd); an exception from it is logged and watching goes on. Returns
    when the cgroup is removed: the watcher reports it, or (a safety net for kernels
    that do not signal removal) ``path`` is found missing every ``recheck_interval``
    seconds. Cancellation propagates. The fds are always closed. Raises
    :class:`~podshim.errors.NotFound` at once if ``path`` is not a memory cgroup.
    """
    loop = asyncio.get_running_loop()
    with open_watcher(path) as watcher:
        ready = asyncio.Event()
        fd = watcher.fileno()
        loop.add_reader(fd, ready.set)
        try:
            while not watcher.closed:
                try:
                    await asyncio.wait_for(ready.wait(), recheck_interval)
                except TimeoutError:
                    if not os.path.isdir(path):
                        return
                    continue
                ready.clear()
                count = _read(watcher)
                if count is None:
                    return
                if count > 0:
                    try:
                        on_oom()
                    except Exception:
                        log.exception("OOM callback for %s failed", path)
        finally:
            loop.remove_reader(fd)


def _read(watcher: OomWatcher) -> int | None:
    """``watcher.read()``, or ``None`` if the cgroup vanished in the middle of it."""
    try:
        return watcher.read()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV):
            return None
        raise
