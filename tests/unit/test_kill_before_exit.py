"""An init's /tasks/exit waits for a Kill of it still in flight: containerd's CRI deletes
the task on that event, closing the connection the Kill's answer is due on, and then
StopContainer failed with "ttrpc: closed" (seen under load in the churn and the bench)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from podshim.linux.reaper import Reaper

from .fakeoci import FakeOci
from .fakes import RecordingPublisher
from .test_pidfd import Env, run


class SlowKill(FakeOci):
    """Signals at once, then (like a runtime on a loaded machine) takes a while to exit."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.release = asyncio.Event()

    async def kill(self, cid: str, signal: int, all_: bool = False) -> None:
        await super().kill(cid, signal, all_)
        await self.release.wait()


def test_the_exit_is_published_after_the_kill_that_caused_it_is_answered(
    tmp_path: Path,
) -> None:
    env = Env(tmp_path, ["sleep", "1000"])
    env.oci = SlowKill(env.oci.cfg)

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        c = env.container(reaper)
        pub = c.ctx.publisher
        assert isinstance(pub, RecordingPublisher) and isinstance(env.oci, SlowKill)
        await c.create()
        pid = await c.start("")
        kill = asyncio.ensure_future(c.kill("", 9, False))
        while os.path.exists(f"/proc/{pid}"):  # killed and reaped
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert "/tasks/exit" not in pub.topics, "exit published while the Kill is unanswered"
        env.oci.release.set()
        await kill
        assert (await c.wait("")).status == 137
        for _ in range(100):
            if "/tasks/exit" in pub.topics:
                break
            await asyncio.sleep(0.01)
        assert pub.topics.count("/tasks/exit") == 1
        await c.delete("")
        reaper.stop()

    try:
        run(main)
    finally:
        env.close()


