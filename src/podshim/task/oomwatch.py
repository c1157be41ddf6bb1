"""The OOM watch of one container: watch its init's memory cgroup (:func:`memory_cgroup`,
found right after Create) and call back (the container publishes ``/tasks/oom``) for
every OOM kill in it, until the cgroup goes or the container
is deleted (:meth:`OomWatch.stop`). Runs as a job of the container's group."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from podshim import errors as errdefs
from podshim.cgroups import mode, v1, v2
from podshim.cgroups.oom import watch_oom
from podshim.jobs import JobGroup
from podshim.logs import TaskLogger


class OomWatch:
    """Watches the memory cgroup of one container's init (see the module docstring)."""

    def __init__(self, tid: str, jobs: JobGroup, log: TaskLogger, on_oom: Callable[[], None]):
        self.tid, self._jobs, self._log, self._on_oom = tid, jobs, log, on_oom
        self._path = ""
        self._task: asyncio.Task[None] | None = None

    async def start(self, path: str, pid: int) -> None:
        """Watch ``path``, the memory cgroup of the init ``pid`` ("": none found), in the
        background. Returns once the watcher is registered, so no OOM after create is
        missed."""
        self._path = path
        if not path:
            self._log.warning("no memory cgroup found for pid %d: no OOM events", pid)
            return
        self._task = self._jobs.spawn(self._run(path), name=f"container::watchOOM:{self.tid}")
        await asyncio.sleep(0)  # let it open its watcher before create returns

    async def _run(self, path: str) -> None:
        try:
            await watch_oom(path, self._oom)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no memory controller, cgroup gone, ...: no events
            self._log.warning("cannot watch %s for OOM kills: %s", path, exc)

    def _oom(self) -> None:
        self._log.warning("OOM kill in memory cgroup %s", self._path)
        self._on_oom()

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()


def memory_cgroup(pid: int) -> str:
    """The memory cgroup directory of process ``pid`` from ``/proc/<pid>/cgroup`` (the
    unified one on a cgroup v2 host), or "" when it has none or is gone."""
    try:
        if mode() == "unified":
            return v2.path_for_pid(pid)
        return v1.paths_for_pid(pid).get("memory", "")
    except (errdefs.ShimError, OSError):
        return ""
