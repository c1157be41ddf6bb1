"""Shared by the namespaces pod host tests (``test_nshost.py``, ``test_nshost_live.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


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
