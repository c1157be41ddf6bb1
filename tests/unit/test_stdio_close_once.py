"""A stdio pump closes its fds once: a second close would hit whatever file took the
numbers since (found under load: a pidfd, an OOM eventfd, containerd's connection)."""

from __future__ import annotations

import asyncio
import os
import stat

from podshim.task.stdio import Pump


def test_cancel_after_a_draining_eof_does_not_close_reused_numbers(tmp_path: object) -> None:
    async def main() -> None:
        src_r, src_w = os.pipe()
        fifo = os.path.join(str(tmp_path), "out")
        os.mkfifo(fifo)
        dst = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        pump = Pump(src_r, dst, close_src=True, close_dst=True, drain_dst=True)
        os.write(src_w, b"unread")  # nobody reads the FIFO: the pump waits for it to drain
        os.close(src_w)
        while not pump._drain_deadline:  # EOF seen, waiting for the FIFO to drain
            await asyncio.sleep(0.01)
        pump.cancel()  # closes src and dst ...
        assert pump.done.done()
        # ... whose numbers the process hands out again at once
        reused = [os.open(os.devnull, os.O_RDONLY) for _ in range(4)]
        try:
            assert {src_r, dst} <= set(reused)
            await asyncio.sleep(Pump.DRAIN_TIMEOUT + 0.2)  # the pending drain check runs
            for fd in reused:
                assert stat.S_ISCHR(os.fstat(fd).st_mode), f"fd {fd} was closed by the pump"
        finally:
            for fd in reused:
                os.close(fd)

    asyncio.run(asyncio.wait_for(main(), 30))
