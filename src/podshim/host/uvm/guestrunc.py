"""runc in the guest, run through the agent: one command line per call, its errors
mapped as :class:`podshim.oci.runc.Runc` maps them on the host.

Every command is spawned under a key of its own (``<cid>/runc/<n>``), waited for and
released. runc logs as JSON into the container's share directory (``runc.log``), so its
error is read on the host side (:func:`podshim.oci.runc.last_error`). A caller cancelled
while runc works gets its CancelledError only once runc has finished (as
``Reaper.run``'s "wait"): a half-done create, start, exec, kill or delete cannot be
undone, a finished one can.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from podshim import errors as errdefs
from podshim.host.uvm.agentapi import STDERR, STDOUT, AgentApi, SpawnSpec
from podshim.jobs import wait_through_cancels
from podshim.oci.runc import last_error, runtime_error

#: how long a cancelled command is let finish before it is killed
CANCEL_GRACE = 30.0
LOG = "runc.log"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    stdout: bytes
    stderr: bytes


async def _read_all(agent: AgentApi, key: str, stream: int) -> bytes:
    out = bytearray()
    while True:
        chunk = await agent.read(key, stream)
        out += chunk.data
        if chunk.eof:
            return bytes(out)


class GuestRunc:
    """runc for one container: ``runc --root <root> --log <guest dir>/runc.log``."""

    def __init__(
        self, agent: AgentApi, binary: str, root: str, host_dir: str, guest_dir: str, cid: str
    ) -> None:
        self.agent, self.binary, self.root = agent, binary, root
        self.host_dir, self.guest_dir, self.cid = host_dir, guest_dir, cid
        self._n = 0

    def argv(self, args: Sequence[str]) -> tuple[str, ...]:
        log = f"{self.guest_dir}/{LOG}"
        return (self.binary, "--root", self.root, "--log", log, "--log-format", "json", *args)

    def log_size(self) -> int:
        try:
            return os.stat(os.path.join(self.host_dir, LOG)).st_size
        except OSError:
            return 0

    def error(self, args: Sequence[str], status: int, stderr: bytes, offset: int) -> Exception:
        """The error kind of a failed ``runc <args>`` (its message from the runtime's
        log), as the host's driver maps it."""
        detail = last_error(os.path.join(self.host_dir, LOG), offset)
        detail = detail or stderr.decode(errors="replace").strip() or f"exit status {status}"
        return runtime_error(posixpath.basename(self.binary), args, detail)

    def key(self, what: str) -> str:
        self._n += 1
        return f"{self.cid}/runc/{what}-{self._n}"

    async def run(self, args: Sequence[str]) -> bytes:
        """Run ``runc <args>`` to its end; its stdout. A failure raises its error kind."""
        offset = self.log_size()
        out = await self.finish(SpawnSpec(self.key(args[0]), self.argv(args),
                                          stdout=True, stderr=True))  # fmt: skip
        if out.status != 0:
            raise self.error(args, out.status, out.stderr, offset)
        return out.stdout

    async def finish(self, spec: SpawnSpec, release: bool = True) -> Outcome:
        """Spawn ``spec``, wait for its end and (``release``) read what it captured and
        release its key; its status and output. Without ``release`` the key stays (runc
        create and exec: its stdio are the container process's now). Cancelled (however
        often), the command is let finish first, killed after CANCEL_GRACE."""
        await self.agent.spawn(spec)
        job = asyncio.ensure_future(self._outcome(spec) if release else self._status(spec))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:  # however often: the undo must see the command end
            if not await wait_through_cancels(job, CANCEL_GRACE):
                with contextlib.suppress(errdefs.ShimError, asyncio.CancelledError):
                    await self.agent.signal(9, key=spec.key)
                await wait_through_cancels(job)
            raise

    async def _status(self, spec: SpawnSpec) -> Outcome:
        return Outcome(await self.agent.wait(spec.key), b"", b"")

    async def _outcome(self, spec: SpawnSpec) -> Outcome:
        try:
            out, err = await asyncio.gather(
                _read_all(self.agent, spec.key, STDOUT) if spec.stdout else _none(),
                _read_all(self.agent, spec.key, STDERR) if spec.stderr else _none(),
            )
            status = await self.agent.wait(spec.key)
        finally:
            with contextlib.suppress(errdefs.ShimError):
                await self.agent.release(spec.key)
        return Outcome(status, out, err)


async def _none() -> bytes:
    return b""
