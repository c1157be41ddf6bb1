"""Polling helpers: wait on conditions with deadlines instead of fixed sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["WaitTimeout", "wait_for"]

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A polled condition did not become true before its deadline."""


def wait_for(
    condition: Callable[[], T | None],
    timeout: float = 60.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Call ``condition`` until it returns something truthy; return that value.

    The interval grows gently (up to 0.5 s) so a loaded machine is not hammered.
    Exceptions from ``condition`` propagate.  On timeout :class:`WaitTimeout` is
    raised with ``message`` (a string or a callable evaluated lazily) and the
    last value seen.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(
                f"timed out after {timeout:.0f}s waiting for {text} (last: {value!r})"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
