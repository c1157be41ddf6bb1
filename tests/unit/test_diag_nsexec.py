"""Exec in a namespaces pod host (``podshim.host.namespaces.nsexec``) against the real kernel: the
pod's namespaces and cgroup, FIFO stdio, a pty, signals, cancellation, the host closing.

Needs root (namespaces, bind mounts, cgroups); skipped otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim.host.control import ExecControl
from podshim.host.namespaces import nsexec
from podshim.host.namespaces.cgroup import Hierarchy
from podshim.host.namespaces.execcg import ExecCgroups
from podshim.host.namespaces.host import NamespacesHost
from podshim.linux.reaper import Reaper

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

CGROUP_PARENT = "/podshim-diag-test"
#: wait for a trapped SIGINT: a signal that arrives between two commands of a shell runs
#: its trap after the next command, so that command must be short (not one long sleep)
WAIT = "while :; do sleep 0.1; done"


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 60))


class Fifos:
    """The client side of an exec's stdio, as ``podshim diag exec`` opens it."""

    def __init__(self, d: Path) -> None:
        d.mkdir(exist_ok=True)
        self.stdin, self.stdout, self.stderr = str(d / "in"), str(d / "out"), str(d / "err")
        for p in (self.stdin, self.stdout, self.stderr):
            os.mkfifo(p)
        self.writer = os.open(self.stdin, os.O_RDWR)
        self.out = os.open(self.stdout, os.O_RDONLY | os.O_NONBLOCK)
        self.err = os.open(self.stderr, os.O_RDONLY | os.O_NONBLOCK)
        self.keep = [os.open(p, os.O_WRONLY | os.O_NONBLOCK) for p in (self.stdout, self.stderr)]
        self.got = {self.out: b"", self.err: b""}

    def read(self, fd: int) -> str:
        with contextlib.suppress(BlockingIOError):
            while data := os.read(fd, 65536):
                self.got[fd] += data
        return self.got[fd].decode(errors="replace")

    async def wait(self, text: str, fd: int | None = None, timeout: float = 30) -> str:
        fd = self.out if fd is None else fd
        async with asyncio.timeout(timeout):
            while text not in self.read(fd):
                await asyncio.sleep(0.02)
        return self.read(fd)

    def close_stdin(self) -> None:
        os.close(self.writer)


@contextlib.asynccontextmanager
async def pod_host(tmp_path: Path) -> AsyncIterator[NamespacesHost]:
    reaper = Reaper()
    reaper.start()
    pod_id = f"diag-{secrets.token_hex(4)}"
    spec = {"hostname": pod_id, "linux": {"cgroupsPath": f"{CGROUP_PARENT}/{pod_id}",
            "namespaces": [{"type": "network"}, {"type": "ipc"}, {"type": "uts"}]}}  # fmt: skip
    host = NamespacesHost(pod_id, "podshim-test", spec, reaper, state_root=str(tmp_path / "st"))
    await host.create()
    try:
        yield host
    finally:
        await host.close()
        reaper.stop()
    assert not os.path.exists(host.state_dir)
    assert not os.path.exists(f"/sys/fs/cgroup/pids{CGROUP_PARENT}/{pod_id}")


async def attached(c: ExecControl, timeout: float = 30) -> int:
    async with asyncio.timeout(timeout):
        while not c.pid:
            await asyncio.sleep(0.02)
    return c.pid


async def gone(pid: int, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while os.path.exists(f"/proc/{pid}"):
            await asyncio.sleep(0.05)


def ns_inode(link: str) -> int:
    m = re.search(r"\[(\d+)\]", link)
    assert m, link
    return int(m.group(1))


def test_exec_runs_in_the_pods_namespaces_and_cgroup(tmp_path: Path) -> None:
    script = ("hostname; readlink /proc/self/ns/net /proc/self/ns/ipc /proc/self/ns/uts; "
              "cat /proc/self/cgroup; echo to-stderr >&2; exit 7")  # fmt: skip

    async def main() -> None:
        async with pod_host(tmp_path) as host:
            io = Fifos(tmp_path / "io")
            code = await host.exec_in_host(["sh", "-c", script], "", io.stdout, io.stderr, False)
            assert code == 7
            lines = io.read(io.out).splitlines()
            assert lines[0] == host.pod_id
            for kind, link in zip(("net", "ipc", "uts"), lines[1:4], strict=True):
                pin = os.path.join(host.state_dir, kind)
                assert ns_inode(link) == os.stat(pin).st_ino, kind
                assert link != os.readlink(f"/proc/self/ns/{kind}")
            cgroups = {ln.split(":")[1]: ln.split(":", 2)[2] for ln in lines[4:]}
            for controller in ("pids", "memory", "cpu", "name=systemd"):
                # its own cgroup, below the sandbox's (under the pod's limits)
                parent, _, own = cgroups[controller].rpartition("/")
                assert parent == f"{CGROUP_PARENT}/{host.pod_id}", cgroups
                assert own.startswith("podshim-exec-"), cgroups
            assert io.read(io.err) == "to-stderr\n"

    run(main)


def test_stdin_is_forwarded_until_the_client_closes_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with pod_host(tmp_path) as host:
            io = Fifos(tmp_path / "io")
            os.write(io.writer, b"hello ")  # before the call: kept in the FIFO
            call = asyncio.create_task(host.exec_in_host(["cat"], io.stdin, io.stdout, "", False))
            await io.wait("hello")  # cat writes at once (tr would wait for EOF)
            os.write(io.writer, b"world\n")
            io.close_stdin()
            assert await call == 0
            assert io.read(io.out) == "hello world\n"

    run(main)


def test_signal_reaches_the_process_group(tmp_path: Path) -> None:
    async def main() -> None:
        async with pod_host(tmp_path) as host:
            io = Fifos(tmp_path / "io")
            c = ExecControl("sig1")
            call = asyncio.create_task(host.exec_in_host(
                ["sh", "-c", "trap 'echo got-int; exit 3' INT; echo ready; " + WAIT],
                "", io.stdout, "", False, c,
            ))  # fmt: skip
            await io.wait("ready")
            c.signal(signal.SIGINT)  # the group: sleep dies too, the trap runs at once
            assert await asyncio.wait_for(call, 20) == 3
            assert io.read(io.out) == "ready\ngot-int\n"
            with pytest.raises(errdefs.FailedPrecondition):
                c.signal(signal.SIGINT)

    run(main)


def test_cancelled_call_kills_and_leftovers_die_with_the_leader(tmp_path: Path) -> None:
    async def main() -> None:
        async with pod_host(tmp_path) as host:
            io = Fifos(tmp_path / "io")
            c = ExecControl("k1")
            call = asyncio.create_task(
                host.exec_in_host(["sleep", "300"], "", io.stdout, "", False, c)
            )
            pid = await attached(c)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await gone(pid)

            code = await host.exec_in_host(
                ["sh", "-c", "sleep 300 & echo $!"], "", io.stdout, "", False
            )
            assert code == 0
            await gone(int(io.read(io.out).split()[-1]))

    run(main)


def test_terminal_size_resize_and_ctrl_c(tmp_path: Path) -> None:
    script = ("tty; stty size; echo ready; read x; stty size; "
              "trap 'echo got-int; exit 0' INT; echo armed; " + WAIT)  # fmt: skip

    async def main() -> None:
        async with pod_host(tmp_path) as host:
            io = Fifos(tmp_path / "io")
            c = ExecControl("t1", width=100, height=40)
            call = asyncio.create_task(
                host.exec_in_host(["sh", "-c", script], io.stdin, io.stdout, "", True, c)
            )
            out = await io.wait("ready")
            assert re.search(r"/dev/pts/\d+\r\n40 100\r\n", out), out
            c.resize(120, 50)
            os.write(io.writer, b"go\r")
            await io.wait("armed")
            os.write(io.writer, b"\x03")  # a byte: the pty's line discipline makes it SIGINT
            assert await asyncio.wait_for(call, 20) == 0
            out = io.read(io.out)
            assert "50 120\r\n" in out and "got-int" in out, out

    run(main)


def test_the_host_closing_kills_a_running_exec(tmp_path: Path) -> None:
    async def main() -> None:
        async with pod_host(tmp_path) as host:
            io = Fifos(tmp_path / "io")
            c = ExecControl("h1")
            call = asyncio.create_task(
                host.exec_in_host(["sleep", "300"], "", io.stdout, "", False, c)
            )
            await attached(c)
            await host.close()  # the cgroup can go: the exec is dead by then
            assert await asyncio.wait_for(call, 20) == 128 + signal.SIGKILL
            with pytest.raises(errdefs.FailedPrecondition, match="closed"):
                await host.exec_in_host(["true"], "", "", "", False)

    run(main)


def test_bad_requests(tmp_path: Path) -> None:
    async def main() -> None:
        async with pod_host(tmp_path) as host:
            with pytest.raises(errdefs.InvalidArgument, match="no command"):
                await host.exec_in_host([], "", "", "", False)
            with pytest.raises(errdefs.InvalidArgument, match="environment"):
                await host.exec_in_host(
                    ["true"], "", "", "", False, ExecControl(env=("NOEQUALS",))
                )
            with pytest.raises(errdefs.InvalidArgument, match="cannot start"):
                await host.exec_in_host(
                    ["true"], "", "", "", False, ExecControl(workdir="/nonexistent-dir")
                )
            with pytest.raises(errdefs.InvalidArgument, match="stdio"):
                await host.exec_in_host(["true"], "", str(tmp_path / "no-fifo"), "", False)
            io = Fifos(tmp_path / "io")
            control = ExecControl(env=("GREETING=hi there",), workdir="/tmp")
            code = await host.exec_in_host(
                ["sh", "-c", 'echo "$GREETING" "$PWD" "$TERM"'], "", io.stdout, "", False, control
            )
            assert (code, io.read(io.out)) == (0, "hi there /tmp \n")  # no TERM without a tty
            assert await host.exec_in_host(["no-such-cmd"], "", "", io.stderr, False) == 127

    run(main)


def test_a_process_without_its_cgroup_never_runs(tmp_path: Path) -> None:
    """The exec's cgroup cannot be made (no parent), or made but not joined (a cpuset
    without cpus takes no task): the command never runs, nothing is left."""
    cpuset = "/sys/fs/cgroup/cpuset"
    empty = f"{cpuset}/podshim-diag-test-{secrets.token_hex(4)}"  # new: no cpus
    hier = Hierarchy(cpuset, 1, frozenset({"cpuset"}))

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        try:
            for parent, message in ((str(tmp_path / "x"), "make the cgroup"),
                                    (empty, "cannot join its cgroup")):  # fmt: skip
                cgs = ExecCgroups("p1", str(tmp_path), functools.partial(lambda p: [(hier, p)], parent))
                target = nsexec.Target("p1", reaper, cgroups=cgs)
                with pytest.raises(errdefs.Internal, match=message):
                    await nsexec.exec_in_host(
                        target, ["touch", str(tmp_path / "ran")], "", "", "", False, ExecControl()
                    )
                assert not (tmp_path / "ran").exists()
                assert cgs.live == {}
                assert not [d for d in os.listdir(empty) if d.startswith("podshim-exec-")]
        finally:
            reaper.stop()

    os.mkdir(empty)
    try:
        run(main)
    finally:
        os.rmdir(empty)
