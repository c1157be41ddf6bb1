"""Owners of background jobs: structured concurrency for a long-lived process.

Every background coroutine of podshim (a process's exit monitor, an OOM watch, a
sandbox's host watch, the event sender, the daemon's idle timer) runs as a job of one
:class:`JobGroup`. The group's owner closes it (:meth:`JobGroup.aclose`), which cancels
every job and awaits them: nothing outlives its owner. A job that fails with an
unexpected exception is reported to the group's ``on_failure`` (once per group): a pod's
group fails that pod only, the daemon's group is the crash path.

Groups nest: :meth:`JobGroup.child` makes a group owned by another (the daemon's group
holds each pod's, a pod's holds each container's). Closing a group closes its children
first; a child without a failure handler of its own reports to its parent's.

Unlike :class:`asyncio.TaskGroup`, a group is not bound to one ``async with`` block: its
owner is an object (a pod, a container, the daemon) whose lifetime spans many calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("podshim.jobs")

OnFailure = Callable[[BaseException, str], None]


async def wait_through_cancels(fut: asyncio.Future[Any], timeout: float | None = None) -> bool:
    """Wait up to ``timeout`` (None: no limit) for ``fut``, however often the caller is
    cancelled meanwhile; whether it is done. For a caller that was cancelled while a
    command it started runs: it must see the command end before it undoes the command's
    work (a call is often cancelled twice: its ttrpc deadline, then the lost connection)."""
    loop = asyncio.get_running_loop()
    end = None if timeout is None else loop.time() + timeout
    while not fut.done():
        left = None if end is None else end - loop.time()
        if left is not None and left <= 0:
            break
        try:
            await asyncio.wait({fut}, timeout=left)
        except asyncio.CancelledError:
            pass
    return fut.done()


def _log_failure(exc: BaseException, name: str) -> None:
    log.error("background job %s failed", name, exc_info=exc)


class JobGroup:
    """A set of asyncio tasks owned by one object (see the module docstring)."""

    def __init__(
        self, name: str, on_failure: OnFailure = _log_failure, parent: JobGroup | None = None
    ) -> None:
        self.name = name
        self.on_failure = on_failure
        self.parent = parent
        self._jobs: set[asyncio.Task[Any]] = set()
        self._children: set[JobGroup] = set()
        self._closed = False
        self.failed: BaseException | None = None

    def child(self, name: str, on_failure: OnFailure | None = None) -> JobGroup:
        """A group owned by this one: closed with it; its failures go to ``on_failure``,
        else to this group's handler."""
        group = JobGroup(name, on_failure or self._report, parent=self)
        if self._closed:
            group._closed = True
        else:
            self._children.add(group)
        return group

    def _report(self, exc: BaseException, name: str) -> None:
        if self.failed is None:
            self.failed = exc
            self.on_failure(exc, name)
        else:
            log.error("%s: %s failed too", self.name, name, exc_info=exc)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task[Any]:
        """Run ``coro`` as a job of this group. RuntimeError once the group is closed."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"job group {self.name} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name or None)
        self._jobs.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._jobs.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self._report(exc, f"{self.name}/{task.get_name()}")

    def __len__(self) -> int:
        """Running jobs, children's included."""
        return len(self._jobs) + sum(len(c) for c in self._children)

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Refuse new jobs, close the children, cancel every job and wait until all have
        ended. Idempotent."""
        self._closed = True
        for c in list(self._children):
            await c.aclose()
        if self.parent is not None:
            self.parent._children.discard(self)
        current = asyncio.current_task()
        while self._jobs - {current}:
            jobs = [t for t in self._jobs if t is not current]
            for t in jobs:
                t.cancel()
            await asyncio.wait(jobs)
