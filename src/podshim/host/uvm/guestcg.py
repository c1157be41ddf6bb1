"""A guest container's cgroup (cgroup v2 in the VM), read through the agent: its
metrics (:func:`read_metrics`, the host's own v2 parser on copies of the files) and
its OOM kills (:class:`GuestOomWatch`: ``memory.events``'s ``oom_kill`` count grows)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable

from podshim import errors as errdefs
from podshim.api.cgroups.v2 import metrics_pb2 as v2pb
from podshim.cgroups import v2
from podshim.cgroups._fs import parse_flat_keyed
from podshim.host.uvm.agentapi import AgentApi
from podshim.jobs import JobGroup
from podshim.logs import TaskLogger

#: the files :func:`podshim.cgroups.v2.read_metrics` reads (hugetlb and rdma: none in
#: the guest)
FILES = (
    "pids.current", "pids.max", "cpu.stat", "memory.current", "memory.max", "memory.stat",
    "memory.swap.current", "memory.swap.max", "memory.events", "io.stat",
)  # fmt: skip
#: how long one watch of memory.events waits before the count is read again anyway
WATCH_MS = 10_000


async def read_metrics(agent: AgentApi, path: str) -> v2pb.Metrics:
    """The metrics of the guest cgroup directory ``path``; NotFound when it is gone."""
    texts: dict[str, bytes] = {}
    for name in FILES:
        try:
            texts[name] = await agent.read_file(f"{path}/{name}")
        except errdefs.NotFound:
            continue
    if not texts:
        raise errdefs.NotFound(f"guest cgroup {path}: no such cgroup")
    with tempfile.TemporaryDirectory(prefix="podshim-gcg-") as copy:
        for name, data in texts.items():
            with open(os.path.join(copy, name), "wb") as f:
                f.write(data)
        return v2.read_metrics(copy)


def oom_kills(text: bytes) -> int:
    return parse_flat_keyed(text.decode(errors="replace")).get("oom_kill", 0)


class GuestOomWatch:
    """Calls ``on_oom`` for every OOM kill in the guest cgroup ``path`` until stopped
    or the cgroup goes (a job of the container's group)."""

    def __init__(
        self, agent: AgentApi, path: str, jobs: JobGroup, log: TaskLogger,
        on_oom: Callable[[], None],
    ) -> None:  # fmt: skip
        self.agent, self.path, self._jobs, self._log, self._on_oom = agent, path, jobs, log, on_oom
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the count now (kills before this are not reported) and watch on."""
        events = f"{self.path}/memory.events"
        try:
            seen = oom_kills(await self.agent.read_file(events))
        except errdefs.ShimError as exc:
            self._log.warning("cannot watch %s for OOM kills: %s", events, exc)
            return
        self._task = self._jobs.spawn(self._run(events, seen), f"watchOOM:{self.path}")

    async def _run(self, events: str, seen: int) -> None:
        try:
            while True:
                await self.agent.watch_file(events, WATCH_MS)
                count = oom_kills(await self.agent.read_file(events))
                for _ in range(max(0, count - seen)):
                    self._log.warning("OOM kill in guest cgroup %s", self.path)
                    self._on_oom()
                seen = max(seen, count)
        except errdefs.ShimError as exc:  # the cgroup (or the VM) is gone
            self._log.debug("OOM watch of %s ends: %s", self.path, exc)

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
