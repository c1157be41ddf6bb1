"""What a VM pod's host does in and about its VM besides living: exec in the guest,
stacks, Share, QEMU's stats, and removing the run directory.

* **exec** (ExecInHost): the agent spawns the process in the guest under a key of its
  own (with a terminal, on the agent's pty); its stdio is copied between the client's
  FIFOs and the agent by :class:`~podshim.host.uvm.guestio.GuestIO`, as jobs of the
  host's group; the :class:`~podshim.host.control.ExecControl` is attached while it runs
  (signals and resizes go through the agent). The host closing kills it (SIGKILL).
* **stacks** (DumpGuestStacks): the agent's own state and the guest kernel's task list.
* **share**: the host path is bind-mounted (read-only if asked: a remount) on
  ``share/shares/<n>`` of the 9p root; QEMU runs in the shim's mount namespace, so the
  guest sees it at ``GUEST_SHARE/shares/<n>``, which the agent bind-mounts on the guest
  path (made if missing).
* **stats**: QEMU's CPU time (``/proc/<pid>/stat``) and memory (``smaps_rollup``) in a
  cgroups v2 ``Metrics`` message (``cpu.usage_usec``/``user_usec``/``system_usec``;
  ``memory.usage`` = RSS, ``memory.anon`` = anonymous RSS, ``memory.file`` = the rest,
  ``memory.shmem`` = PSS of the process: QEMU's share of what it maps with others),
  the same version as the guest's container metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.api.cgroups.v2 import metrics_pb2 as v2pb
from podshim.cgroups import stats as cgstats
from podshim.host.control import ExecControl
from podshim.host.uvm import state
from podshim.host.uvm.agentapi import GUEST_SHARE, SpawnSpec
from podshim.host.uvm.guestio import GuestIO
from podshim.linux import mount

if TYPE_CHECKING:
    from podshim.host.uvm.host import UvmHost

log = logging.getLogger("podshim.host.uvm")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: how long an exited process's output may take to reach the FIFOs
OUTPUT_DRAIN_TIMEOUT = 5.0
MS_BIND, MS_RDONLY = 4096, 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _environment(extra: tuple[str, ...], terminal: bool, what: str) -> tuple[str, ...]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    if terminal:
        env["TERM"] = "xterm"
    for entry in extra:
        key, eq, value = entry.partition("=")
        if not key or not eq or "\0" in entry:
            raise errdefs.InvalidArgument(f"{what}: bad environment entry {entry!r}")
        env[key] = value
    return tuple(f"{k}={v}" for k, v in env.items())


class VmOps:
    """Exec, stacks and Share of one :class:`UvmHost`."""

    def __init__(self, host: UvmHost) -> None:
        self.host = host
        self._keys = itertools.count(1)
        self._shares = itertools.count(1)

    async def exec(self, args: list[str], stdin: str, stdout: str, stderr: str,
                   terminal: bool, control: ExecControl) -> int:  # fmt: skip
        agent = self.host.agent
        if not args:
            raise errdefs.InvalidArgument(f"{control.what}: no command")
        env = _environment(control.env, terminal, control.what)
        key = f"host-exec-{next(self._keys)}"
        io = GuestIO(agent, key, stdin, stdout, stderr, terminal)
        io.open()
        try:
            io.close_stdin()  # the client holds its own writer: its close is EOF
            want_in, want_out, want_err = io.wants
            spec = SpawnSpec(key=key, args=tuple(args), env=env, cwd=control.workdir,
                             stdin=want_in, stdout=want_out, stderr=want_err,
                             terminal=terminal, width=control.width, height=control.height)  # fmt: skip
            pid = await agent.spawn(spec)
            try:
                return await self._run(key, pid, io, control)
            finally:
                with contextlib.suppress(errdefs.ShimError):
                    await agent.release(key)
        finally:
            io.close()

    async def _run(self, key: str, pid: int, io: GuestIO, control: ExecControl) -> int:
        agent, host = self.host.agent, self.host
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()

        def later(coro: Coroutine[Any, Any, None]) -> None:
            task = loop.create_task(coro)
            pending.add(task)
            task.add_done_callback(pending.discard)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

        control.attach(pid, lambda sig: later(agent.signal(sig, key=key)),
                       lambda w, h: later(agent.resize(key, w, h)))  # fmt: skip
        log.info("pod %s: %s %s is guest pid %d", host.pod_id, control.what, key, pid)
        io.start(host.jobs)
        waiting = asyncio.ensure_future(agent.wait(key))
        closing = asyncio.ensure_future(host.closing.wait())
        try:
            await asyncio.wait({waiting, closing}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():  # the host is closing: the process goes with the VM
                with contextlib.suppress(errdefs.ShimError):
                    await agent.signal(9, key=key)
                await asyncio.wait({waiting}, timeout=OUTPUT_DRAIN_TIMEOUT)
            if not waiting.done():
                raise errdefs.Unavailable(f"{control.what}: the VM of pod {host.pod_id} closed")
            status = waiting.result()
        except BaseException:
            waiting.cancel()
            with contextlib.suppress(errdefs.ShimError, RuntimeError):
                await agent.signal(9, key=key)
            raise
        finally:
            closing.cancel()
            control.detach()
        if not await io.wait_output(OUTPUT_DRAIN_TIMEOUT):
            log.warning("pod %s: %s: output still open after exit", host.pod_id, control.what)
        log.info("pod %s: %s guest pid %d exited %d", host.pod_id, control.what, pid, status)
        return status

    async def stacks(self) -> str:
        own, tasks = await self.host.agent.stacks()
        return f"=== guest agent ===\n{own.rstrip()}\n=== guest tasks ===\n{tasks.rstrip()}\n"

    async def share(self, host_path: str, guest_path: str, read_only: bool, pid: int = 0) -> None:
        """Bind ``host_path`` into the share on the host, then into the VM at
        ``guest_path`` (with ``pid``: inside that guest process's mount namespace and root,
        a container's init)."""
        agent = self.host.agent
        if not os.path.isabs(host_path) or not os.path.isabs(guest_path):
            raise errdefs.InvalidArgument(
                f"share {host_path!r} -> {guest_path!r}: both paths must be absolute"
            )
        try:
            is_dir = os.path.isdir(host_path)
            os.stat(host_path)
        except OSError as exc:
            raise errdefs.NotFound(f"share {host_path}: {exc.strerror}") from None
        name = str(next(self._shares))
        target = os.path.join(self.host.share_dir, state.SHARES, name)
        if is_dir:
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        try:
            mount.mount("", host_path, target, ["rbind", "ro"] if read_only else ["rbind"])
            flags = MS_BIND | (MS_RDONLY if read_only else 0)
            await agent.mount(f"{GUEST_SHARE}/{state.SHARES}/{name}", guest_path,
                              flags=flags, mkdir=True, pid=pid)  # fmt: skip
        except BaseException as exc:
            with contextlib.suppress(OSError):
                mount.unmount_all(target)
                (os.rmdir if is_dir else os.unlink)(target)
            if isinstance(exc, OSError):
                raise errdefs.Internal(f"share {host_path}: {exc}") from None
            raise
        where = f"in the VM's process {pid}" if pid else "in the VM"
        log.info("pod %s: shared %s at %s %s%s", self.host.pod_id, host_path,
                 guest_path, where, " (read-only)" if read_only else "")  # fmt: skip


# -- stats -------------------------------------------------------------------------------


def _smaps_rollup(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    return out


def qemu_metrics(pid: int) -> v2pb.Metrics:
    """QEMU's CPU and memory as a cgroups v2 Metrics (see the module docstring);
    NotFound when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().decode(errors="replace").rpartition(")")[2].split()
        mem = _smaps_rollup(pid)
    except OSError:
        raise errdefs.NotFound(f"QEMU {pid} is gone") from None
    user, system = int(fields[11]), int(fields[12])  # utime, stime: stat fields 14, 15
    usec = 1_000_000 // _CLK_TCK
    rss, anon = mem.get("Rss", 0), mem.get("Anonymous", 0)
    return v2pb.Metrics(
        cpu=v2pb.CPUStat(
            usage_usec=(user + system) * usec, user_usec=user * usec, system_usec=system * usec
        ),
        memory=v2pb.MemoryStat(
            usage=rss, anon=anon, file=max(0, rss - anon), shmem=mem.get("Pss", 0)
        ),
    )


def qemu_stats(pid: int) -> any_pb2.Any | None:
    if not pid:
        return None
    try:
        return cgstats.pack(qemu_metrics(pid))
    except errdefs.NotFound:
        return None


# -- the run directory --------------------------------------------------------------------


def mounts_under(directory: str) -> list[str]:
    """Mount points strictly below ``directory``, deepest (last mounted) first."""
    real = os.path.realpath(directory)
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                mnt = line.split()[4].replace("\\040", " ")
                if mnt.startswith(real + "/"):
                    found.append(mnt)
    except OSError:
        return []
    return list(reversed(found))


def unmount_under(directory: str) -> list[str]:
    """Unmount everything below ``directory``; returns problems."""
    problems = []
    for mnt in mounts_under(directory):
        try:
            mount.unmount_all(mnt)
        except OSError as exc:
            problems.append(f"unmount {mnt}: {exc.strerror or exc}")
    left = mounts_under(directory)
    if left and not problems:
        problems.append(f"still mounted: {left}")
    return problems


def _remove_tree(path: str, dev: int, problems: list[str]) -> None:
    """Remove ``path`` (a directory) and what is in it, never crossing into another
    file system (a mount left there is reported, not emptied)."""
    try:
        entries = list(os.scandir(path))
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            problems.append(f"list {path}: {exc.strerror}")
        return
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
            if e.is_dir(follow_symlinks=False):
                if st.st_dev != dev:
                    problems.append(f"{e.path} is a mount point")
                    continue
                _remove_tree(e.path, dev, problems)
            else:
                os.unlink(e.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"remove {e.path}: {exc.strerror}")
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if not problems:
            problems.append(f"remove {path}: {exc.strerror}")


def remove_run_dir(run_dir: str, keep: bool = False) -> list[str]:
    """Unmount everything under the run directory, then (unless ``keep``: what is left
    elsewhere stays recorded in it) remove it. Returns problems."""
    if not os.path.isdir(run_dir):
        return []
    problems = unmount_under(run_dir)
    if problems or keep:
        return problems
    try:
        dev = os.stat(run_dir).st_dev
    except OSError:
        return []
    _remove_tree(run_dir, dev, problems)
    return problems
