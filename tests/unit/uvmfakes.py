"""An in-process guest agent (``podshim.host.uvm.agentapi.AgentApi``) for unit tests.

It runs every spawned key as a real host process through the tests' one
:class:`~podshim.linux.reaper.Reaper` (pass the one the ShimContext has: only one
reaper may own SIGCHLD), holds its stdio as pipes or a pty the way the agent does,
and answers ``wait_pid`` from that reaper: with the test process made a child
subreaper, the container inits that ``runc create`` leaves behind are re-parented to
it, as they are to the agent (PID 1) in the guest. Files are the host's. So the guest
workload runs against real runc on the host with no VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import termios
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from podshim import errors as errdefs
from podshim.api.types import mount_pb2
from podshim.host.contract import WorkloadRequest
from podshim.host.uvm.agentapi import (
    CONSOLE_SOCKET_ARG,
    STDERR,
    STDOUT,
    AgentInfo,
    Chunk,
    SpawnSpec,
)
from podshim.host.uvm.workload import GuestContainer, GuestLayout, create_guest_container
from podshim.linux import mount as mounts
from podshim.linux.reaper import Child, Reaper, set_child_subreaper
from podshim.oci.runtime import RuntimeConfig
from podshim.task.contract import ShimContext

from .fakes import RecordingPublisher

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: how much WriteStdin queues before it answers ResourceExhausted
STDIN_LIMIT = 1 << 20


@dataclass
class _Stream:
    buf: bytearray = field(default_factory=bytearray)
    eof: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def end(self) -> None:
        self.eof = True
        self.changed.set()


class _Key:
    def __init__(self, spec: SpawnSpec) -> None:
        self.spec = spec
        self.child: Child | None = None
        self.streams = {STDOUT: _Stream(), STDERR: _Stream()}
        self.stdin = -1  # pipe's write end, or a dup of the pty master
        self.pending = bytearray()
        self.closing = False
        self.master = -1
        self.fds: set[int] = set()  # every fd of ours to close at release
        self.console: asyncio.Task[None] | None = None
        self.console_dir = ""


class FakeAgent:
    """See the module docstring. ``calls`` records (method, key or path) in order."""

    def __init__(self, reaper: Reaper) -> None:
        self.reaper = reaper
        self.keys: dict[str, _Key] = {}
        self.calls: list[tuple[str, str]] = []
        self.closed = False
        #: spawn raises this once when set (tests of failures)
        self.fail_spawn: errdefs.ShimError | None = None
        #: wait(key) answers only once the key's event here is set (tests of races)
        self.gates: dict[str, asyncio.Event] = {}
        self._watches: set[asyncio.Future[None]] = set()

    def _check(self) -> None:
        if self.closed:
            raise errdefs.Unavailable("agent: channel closed")

    def _key(self, key: str) -> _Key:
        self._check()
        k = self.keys.get(key)
        if k is None:
            raise errdefs.NotFound(f"agent: key {key!r}: not found")
        return k

    async def ping(self, timeout: float | None = None) -> AgentInfo:
        self._check()
        return AgentInfo("fake", os.uname().release, 0)

    # -- processes ----------------------------------------------------------------------
    async def spawn(self, spec: SpawnSpec) -> int:
        self._check()
        self.calls.append(("spawn", spec.key))
        if spec.key in self.keys:
            raise errdefs.AlreadyExists(f"agent: key {spec.key!r} in use")
        if self.fail_spawn is not None:
            exc, self.fail_spawn = self.fail_spawn, None
            raise exc
        k = _Key(spec)
        args = list(spec.args)
        child_fds: list[int] = []
        try:
            if spec.console_socket:
                k.console_dir = tempfile.mkdtemp(prefix="fakeagent-")
                path = os.path.join(k.console_dir, "c.sock")
                lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                lst.bind(path)
                lst.listen(1)
                lst.setblocking(False)
                args = [path if a == CONSOLE_SOCKET_ARG else a for a in args]
                k.console = asyncio.ensure_future(self._receive_console(k, lst))
            stdio = [subprocess.DEVNULL] * 3
            if spec.terminal:
                master, slave = os.openpty()
                child_fds.append(slave)
                stdio = [slave] * 3
                self._attach_master(k, master)
            elif spec.console_socket:
                k.streams[STDERR].end()  # STDOUT: the pty, once runc sends its master
            else:
                if spec.stdin:
                    r, w = os.pipe()
                    child_fds.append(r)
                    stdio[0] = r
                    k.stdin = w
                    k.fds.add(w)
                for n, want in ((STDOUT, spec.stdout), (STDERR, spec.stderr)):
                    if want:
                        r, w = os.pipe()
                        child_fds.append(w)
                        stdio[n] = w
                        self._read_into(k, r, k.streams[n])
                    else:
                        k.streams[n].end()
            env = dict(e.split("=", 1) for e in spec.env) if spec.env else {"PATH": PATH}
            env.setdefault("PATH", PATH)
            try:
                k.child = self.reaper.spawn(
                    args,
                    env=env,
                    cwd=spec.cwd or "/",
                    stdin=stdio[0],
                    stdout=stdio[1],
                    stderr=stdio[2],
                )
            except FileNotFoundError:
                raise errdefs.NotFound(f"agent: {args[0]}: not found") from None
            except OSError as exc:
                raise errdefs.Unknown(f"agent: {args[0]}: {exc}") from None
        except BaseException:
            self._drop(k)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        self.keys[spec.key] = k
        watch = asyncio.ensure_future(self._on_exit(k))
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)
        return k.child.pid

    async def _on_exit(self, k: _Key) -> None:
        assert k.child is not None
        await asyncio.shield(k.child.exited)
        if k.console is not None and k.master < 0:  # runc failed before sending it
            k.console.cancel()
            k.streams[STDOUT].end()

    async def _receive_console(self, k: _Key, lst: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn, _ = await loop.sock_accept(lst)
            with conn:
                conn.setblocking(True)
                _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
        finally:
            lst.close()
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(k.console_dir, "c.sock"))
                os.rmdir(k.console_dir)
        if fds:
            self._attach_master(k, fds[0])
        else:
            k.streams[STDOUT].end()

    def _attach_master(self, k: _Key, master: int) -> None:
        k.master = master
        k.fds.add(master)
        if k.spec.width or k.spec.height:
            _winsize(master, k.spec.width, k.spec.height)
        k.stdin = os.dup(master)
        k.fds.add(k.stdin)
        self._read_into(k, os.dup(master), k.streams[STDOUT])
        k.streams[STDERR].end()

    def _read_into(self, k: _Key, fd: int, s: _Stream) -> None:
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        k.fds.add(fd)

        def readable() -> None:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:  # EIO: the pty's slave side is closed
                data = b""
            if data:
                s.buf += data
                s.changed.set()
                return
            loop.remove_reader(fd)
            k.fds.discard(fd)
            os.close(fd)
            s.end()

        loop.add_reader(fd, readable)

    async def wait(self, key: str) -> int:
        k = self._key(key)
        assert k.child is not None
        status = (await asyncio.shield(k.child.exited)).status
        gate = self.gates.get(key)
        if gate is not None:
            await gate.wait()
        return status

    async def wait_pid(self, pid: int) -> int:
        self._check()
        self.calls.append(("wait_pid", str(pid)))
        return (await self.reaper.watch(pid)).status

    async def signal(self, signal: int, *, key: str = "", pid: int = 0) -> None:
        if key:
            child = self._key(key).child
            if child is None or not child.signal(signal):
                raise errdefs.NotFound(f"agent: key {key!r}: process exited")
            return
        self._check()
        try:
            os.kill(pid, signal)
        except ProcessLookupError:
            raise errdefs.NotFound(f"agent: pid {pid}: no such process") from None

    async def read(self, key: str, stream: int, max_bytes: int = 0) -> Chunk:
        k = self._key(key)
        s = k.streams[stream]
        while not s.buf and not s.eof:
            s.changed.clear()
            await s.changed.wait()
        n = max_bytes or 65536
        data = bytes(s.buf[:n])
        del s.buf[:n]
        return Chunk(data, s.eof and not s.buf)

    async def write_stdin(self, key: str, data: bytes) -> int:
        k = self._key(key)
        if k.stdin < 0 or k.closing:
            raise errdefs.FailedPrecondition(f"agent: key {key!r}: no stdin")
        if len(k.pending) >= STDIN_LIMIT:
            raise errdefs.ResourceExhausted(f"agent: key {key!r}: stdin queue full")
        was_idle = not k.pending
        k.pending += data
        if was_idle:
            asyncio.get_running_loop().add_writer(k.stdin, self._flush, k)
        return len(data)

    def _flush(self, k: _Key) -> None:
        try:
            n = os.write(k.stdin, k.pending)
        except BlockingIOError:
            return
        except OSError:  # the reader is gone: drop it
            n = len(k.pending)
        del k.pending[:n]
        if not k.pending:
            asyncio.get_running_loop().remove_writer(k.stdin)
            if k.closing:
                self._close_stdin_now(k)

    def _close_stdin_now(self, k: _Key) -> None:
        if k.stdin >= 0 and k.master < 0:  # a pty has no stdin of its own to close
            k.fds.discard(k.stdin)
            os.close(k.stdin)
            k.stdin = -1

    async def close_stdin(self, key: str) -> None:
        k = self._key(key)
        k.closing = True
        if not k.pending:
            self._close_stdin_now(k)

    async def resize(self, key: str, width: int, height: int) -> None:
        k = self._key(key)
        if k.master < 0:
            raise errdefs.FailedPrecondition(f"agent: key {key!r}: no terminal")
        _winsize(k.master, width, height)

    async def release(self, key: str) -> None:
        k = self._key(key)
        self.calls.append(("release", key))
        if k.child is not None and not k.child.exited.done():
            raise errdefs.FailedPrecondition(f"agent: key {key!r}: process still runs")
        del self.keys[key]
        self._drop(k)

    def _drop(self, k: _Key) -> None:
        loop = asyncio.get_running_loop()
        if k.console is not None:
            k.console.cancel()
        if k.stdin >= 0 and k.pending:
            loop.remove_writer(k.stdin)
        for fd in k.fds:
            loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        k.fds.clear()
        k.stdin = -1
        for s in k.streams.values():
            s.end()

    # -- files --------------------------------------------------------------------------
    async def read_file(self, path: str, max_bytes: int = 0) -> bytes:
        self._check()
        try:
            with open(path, "rb") as f:
                return f.read(max_bytes or 1 << 20)
        except (FileNotFoundError, NotADirectoryError):
            raise errdefs.NotFound(f"agent: {path}: not found") from None
        except OSError as exc:
            raise errdefs.Unknown(f"agent: {path}: {exc.strerror}") from None

    async def write_file(self, path: str, data: bytes, mkdirs: bool = False) -> None:
        self._check()
        if mkdirs:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            with open(path, "wb") as f:
                f.write(data)
        except FileNotFoundError:
            raise errdefs.NotFound(f"agent: {path}: not found") from None

    async def watch_file(self, path: str, timeout_ms: int) -> bool:
        """Polls the content (inotify on a cgroup file works only in the guest)."""
        before = await self.read_file(path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while loop.time() < deadline:
            await asyncio.sleep(0.02)
            if await self.read_file(path) != before:
                return True
        return False

    async def mount(self, source: str, target: str, fstype: str = "", flags: int = 0,
                    data: str = "", mkdir: bool = False, pid: int = 0) -> None:  # fmt: skip
        self._check()
        if pid:  # the real agent's move of a detached tree into pid's namespace
            raise errdefs.NotImplemented("fake agent: no mounts into a process's namespace")
        if mkdir:
            os.makedirs(target, exist_ok=True)
        opts = [data] if data else []
        if flags & mounts.MS_BIND:
            opts.append("bind")
        try:
            mounts.mount(fstype, source, target, opts)
        except OSError as exc:
            raise errdefs.Unknown(f"agent: {exc}") from None

    async def stacks(self) -> tuple[str, str]:
        self._check()
        return "\n".join(sorted(self.keys)), ""

    async def shutdown(self) -> None:
        self._check()
        for k in self.keys.values():
            if k.child is not None:
                k.child.signal(9)

    async def close(self) -> None:
        self.closed = True

    def leftovers(self) -> list[str]:
        """Keys not released (a test's leak check)."""
        return sorted(self.keys)


def _winsize(fd: int, width: int, height: int) -> None:
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise


# -- a test bed: real runc on the host, driven through FakeAgent ---------------------------

RUNC = shutil.which("runc")
BUSYBOX = shutil.which("busybox")
#: why the guest workload tests cannot run here ("" when they can)
SKIP = (
    "needs root" if os.geteuid() != 0 else
    "needs runc and busybox" if RUNC is None or BUSYBOX is None else ""
)  # fmt: skip
#: the pid the tests' CRI-shaped specs name as the sandbox's
SANDBOX_PID = 4242
APPLETS = ("sh", "sleep", "cat", "echo", "true", "false", "kill", "ls", "head", "wc", "stty")
_BASE_SPEC: dict[str, Any] = {}


def base_spec() -> dict[str, Any]:
    """``runc spec`` of this machine's runc (made once), CRI-shaped: the sandbox's
    network, IPC and UTS namespaces, a new PID namespace."""
    if not _BASE_SPEC:
        assert RUNC is not None
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([RUNC, "spec"], cwd=d, check=True, timeout=60)
            with open(os.path.join(d, "config.json")) as f:
                _BASE_SPEC.update(json.load(f))
        _BASE_SPEC["linux"]["namespaces"] = [
            {"type": "pid"}, {"type": "mount"},
            *({"type": t, "path": f"/proc/{SANDBOX_PID}/ns/{f}"}
              for t, f in (("network", "net"), ("ipc", "ipc"), ("uts", "uts"))),
        ]  # fmt: skip
        _BASE_SPEC["process"]["terminal"] = False
        _BASE_SPEC["hostname"] = "pod"
    return copy.deepcopy(_BASE_SPEC)


class Bed:
    """One test's pod share, runc root, cgroup parent and agent."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.share = os.path.join(tmp, "share")
        os.mkdir(self.share)
        self.tag = secrets.token_hex(4)
        self.layout = GuestLayout(runc_root=os.path.join(tmp, "runc"),
                                  cgroup_parent=f"/podshim-t-{self.tag}")  # fmt: skip
        self.reaper = Reaper()
        self.publisher = RecordingPublisher()
        self.agent = FakeAgent(self.reaper)
        self.ctx = ShimContext("ns", self.reaper, self.publisher)
        self._rootfs = ""

    def start(self) -> None:
        set_child_subreaper()
        self.reaper.start()

    def rootfs(self) -> str:
        """A busybox root filesystem (shared by the test's containers, read-only)."""
        if not self._rootfs:
            self._rootfs = os.path.join(self.tmp, "busybox")
            os.makedirs(os.path.join(self._rootfs, "bin"))
            for d in ("proc", "sys", "dev", "etc", "tmp"):
                os.mkdir(os.path.join(self._rootfs, d))
            assert BUSYBOX is not None
            shutil.copy(BUSYBOX, os.path.join(self._rootfs, "bin", "busybox"))
            with open(os.path.join(self._rootfs, "etc", "hostname"), "w"):
                pass  # a file to bind-mount onto
            for a in APPLETS:
                os.symlink("busybox", os.path.join(self._rootfs, "bin", a))
        return self._rootfs

    def bundle(self, cid: str, args: list[str], *, terminal: bool = False,
               edit: Callable[[dict[str, Any]], None] | None = None) -> tuple[str, dict[str, Any]]:  # fmt: skip
        """A bundle whose rootfs/ is the busybox root bind-mounted there (as
        containerd mounts a snapshot), with the CRI-shaped spec running ``args``."""
        bundle = os.path.join(self.tmp, "bundles", cid)
        os.makedirs(os.path.join(bundle, "rootfs"))
        spec = base_spec()
        spec["process"]["args"] = args
        spec["process"]["terminal"] = terminal
        spec["root"] = {"path": "rootfs", "readonly": True}
        if edit is not None:
            edit(spec)
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        return bundle, spec

    def request(self, cid: str, args: list[str], *, terminal: bool = False, stdin: str = "",
                stdout: str = "", stderr: str = "", rootfs: bool = True,
                edit: Callable[[dict[str, Any]], None] | None = None) -> WorkloadRequest:  # fmt: skip
        bundle, spec = self.bundle(cid, args, terminal=terminal, edit=edit)
        mounts = [mount_pb2.Mount(type="bind", source=self.rootfs(), options=["rbind", "ro"])]
        return WorkloadRequest(id=cid, bundle=bundle, spec=spec, runtime=RuntimeConfig(),
                               rootfs=mounts if rootfs else (), terminal=terminal, stdin=stdin,
                               stdout=stdout, stderr=stderr, sandbox_pid=SANDBOX_PID)  # fmt: skip

    async def create(self, req: WorkloadRequest, sandbox_spec: dict[str, Any] | None = None
                     ) -> GuestContainer:  # fmt: skip
        return await create_guest_container(
            self.ctx,
            req,
            self.agent,
            share_dir=self.share,
            guest_share=self.share,
            sandbox_spec=sandbox_spec or {},
            layout=self.layout,
        )

    def fifo(self, name: str) -> str:
        path = os.path.join(self.tmp, name)
        os.mkfifo(path)
        return path

    def topics(self) -> list[str]:
        return [t for t, _ in self.publisher.events]

    def leftovers(self) -> list[str]:
        """What a test's containers left: share entries, runc state, cgroups, keys."""
        left = [f"share/{n}" for n in os.listdir(self.share)]
        root = self.layout.runc_root
        left += [f"runc/{n}" for n in (os.listdir(root) if os.path.isdir(root) else [])]
        for d in glob.glob(f"/sys/fs/cgroup/*{self.layout.cgroup_parent}"):
            left += [f"{d}/{n}" for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))]
        left += [f"key {k}" for k in self.agent.leftovers() if "/runc/" not in k]
        return left

    async def cleanup(self) -> None:
        """Remove whatever a failed test left: runc containers, mounts, cgroups."""
        root = self.layout.runc_root
        for cid in os.listdir(root) if os.path.isdir(root) else []:
            assert RUNC is not None
            subprocess.run([RUNC, "--root", root, "delete", "--force", cid],
                           capture_output=True, timeout=60)  # fmt: skip
        for d in glob.glob(os.path.join(self.share, "*", "*")) + glob.glob(
            os.path.join(self.share, "*", "mounts", "*")
        ):
            with contextlib.suppress(OSError):
                mounts.unmount_all(d)
        for d in glob.glob(f"/sys/fs/cgroup/*{self.layout.cgroup_parent}"):
            for sub in glob.glob(os.path.join(d, "*")):
                if os.path.isdir(sub):
                    with contextlib.suppress(OSError):
                        os.rmdir(sub)
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self.reaper.stop()
