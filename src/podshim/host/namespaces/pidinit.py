"""The pod's PID-namespace init (``podshim-init``) as the ``namespaces`` host holds it.

:func:`launch` runs the launcher through the reaper; the launcher reports the init's pid
and exits, and the init is reparented to the shim (a child subreaper). The pid is read
from the launcher's report, so it may already be free again when it is read (a quick
death, reaped meanwhile). The reaper's mark is therefore taken *before* the launcher
runs: the init's exit is watched ``since`` that mark (an unclaimed exit of an earlier
holder of the pid is never taken for the init's), and the pidfd is opened only if the
reaper has not reaped the pid since the mark (:meth:`Reaper.pidfd`). Every signal goes
through that pidfd (``pidfd_send_signal``), never ``kill(2)`` by pid; the pidfd is closed
once the init's exit is reaped, or by :meth:`InitProcess.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from podshim import errors as errdefs
from podshim.linux.reaper import Exit, Reaper

log = logging.getLogger("podshim.host.namespaces.pidinit")


def _stderr(data: bytes) -> str:
    return data.decode(errors="replace").strip() or "(no output)"


class InitProcess:
    """A started init: its pid, a pidfd naming it until its exit is reaped (None once
    reaped or closed), and that exit."""

    def __init__(self, pid: int, pidfd: int | None, exited: asyncio.Future[Exit]) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.exited = exited
        exited.add_done_callback(lambda _: self.close())

    @property
    def running(self) -> bool:
        """Not reaped yet (a zombie still counts: its pid is still its own)."""
        return not self.exited.done()

    def signal(self, sig: int) -> bool:
        """Signal the init through its pidfd; False when it is gone (or reaped)."""
        fd = self.pidfd
        if fd is None or self.exited.done():
            return False
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            return False
        return True

    async def kill(self, timeout: float) -> bool:
        """SIGKILL the init and wait up to ``timeout`` s for its reap; whether it was."""
        if self.exited.done():
            return True
        self.signal(signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Close the pidfd (the init was reaped, or the host is done with it)."""
        fd, self.pidfd = self.pidfd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


async def launch(reaper: Reaper, argv: list[str], pod_id: str) -> InitProcess:
    """Run the launcher ``argv``; the init it started (see the module docstring).

    Raises:
        Internal: the launcher failed or reported no pid.
    """
    mark = reaper.mark()  # before the init can exist
    res = await reaper.run(argv)
    out = res.stdout.decode(errors="replace").strip()
    if res.status != 0 or not out.isdigit():
        # a launcher that exits 0 without a pid cannot happen unless stdout broke;
        # its init (if any) then dies with the launcher's report pipe unread
        raise errdefs.Internal(
            f"start the PID-namespace init of pod {pod_id}: {argv[0]} exited "
            f"{res.status}: {_stderr(res.stderr)} {out!r}"
        )
    pid = int(out)
    exited = reaper.watch(pid, since=mark)
    fd = reaper.pidfd(pid, mark)  # None: it already died and was reaped
    if fd is None:
        log.warning("pod %s: init %d exited before it was watched", pod_id, pid)
    return InitProcess(pid, fd, exited)
