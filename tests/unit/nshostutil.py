"""Shared by the namespaces pod host tests (``test_nshost*.py``, ``test_nsexec_pidfd.py``)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from podshim.linux.reaper import Reaper


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 240))


async def poll(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait (generously: the machine may be loaded) until ``cond()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


class Guard:
    """``os.kill``/``os.killpg`` that record (and do not send) a signal to a pid the
    reaper reaped since the guard was made: that pid may name another process."""

    def __init__(self, reaper: Reaper, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reaper, self.mark = reaper, reaper.mark()
        self.bad: list[str] = []
        self.pidfd_signals: list[int] = []
        real_pidfd_send_signal = signal.pidfd_send_signal
        for name in ("kill", "killpg"):
            monkeypatch.setattr(os, name, self._checked(name, getattr(os, name)))

        def pidfd_send_signal(fd: int, sig: int, *a: Any) -> None:
            self.pidfd_signals.append(sig)
            real_pidfd_send_signal(fd, sig, *a)

        monkeypatch.setattr(signal, "pidfd_send_signal", pidfd_send_signal)

    def _checked(self, name: str, real: Any) -> Any:
        def call(pid: int, sig: int) -> None:
            if self.reaper.reaped_since(pid, self.mark):
                self.bad.append(f"{name}({pid}, {sig}) after {pid} was reaped")
                return
            real(pid, sig)

        return call


def pidfds() -> set[int]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                out.add(int(fd))
        except OSError:
            pass
    return out
