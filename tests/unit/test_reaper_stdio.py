"""The one reaper and the stdio pumps, with real processes, pipes and FIFOs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from podshim import errors as errdefs
from podshim.linux.reaper import Reaper, _write_all, exit_status
from podshim.task.stdio import ProcessIO, fifo_path


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


def test_exit_status_mapping() -> None:
    assert exit_status(0) == 0
    assert exit_status(3 << 8) == 3
    assert exit_status(signal.SIGKILL) == 137


def test_input_to_a_child_that_exits_unread() -> None:
    """A child that exited before reading its stdin: the small input waits in the
    writer's buffer and the broken pipe surfaces on close (flush), not write. The
    caller gets the child's status and stderr, never a BrokenPipeError."""
    r, w = os.pipe()
    os.close(r)  # the child is gone
    _write_all(open(w, "wb"), b'{"memory": {}}')  # noqa: SIM115 (it closes it; raised from close())

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        try:
            res = await reaper.run(["sh", "-c", "exec 0<&-; echo nope >&2; exit 3"], input=b"x")
            assert (res.status, res.stderr) == (3, b"nope\n")
        finally:
            reaper.stop()

    run(main)


def test_run_reports_real_exit_codes_and_output() -> None:
    async def main() -> None:
        r = Reaper()
        r.start()
        try:
            res = await r.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
            assert (res.status, res.stdout, res.stderr) == (7, b"out\n", b"err\n")
            res = await r.run(["cat"], input=b"abc")
            assert (res.status, res.stdout) == (0, b"abc")
            res = await r.run(["sh", "-c", "kill -9 $$"])
            assert res.status == 137
        finally:
            r.stop()

    run(main)


def test_exit_before_watch_is_kept_and_concurrent_runs_do_not_mix() -> None:
    async def main() -> None:
        r = Reaper()
        r.start()
        try:
            # A child whose exit is reaped before anyone watches it (like a container
            # init dying before its pid file is read).
            p = subprocess.Popen(["sh", "-c", "exit 5"])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while p.pid not in r._unclaimed and loop.time() < deadline:
                await asyncio.sleep(0.01)
            ex = await r.watch(p.pid)
            p.returncode = ex.status
            assert ex.status == 5
            results = await asyncio.gather(*(r.run(["sh", "-c", f"exit {i}"]) for i in range(20)))
            assert [x.status for x in results] == list(range(20))
        finally:
            r.stop()

    run(main)


def test_fifo_uris() -> None:
    assert fifo_path("/a/b") == "/a/b"
    assert fifo_path("fifo:///a/b") == "/a/b"
    with pytest.raises(errdefs.InvalidArgument, match="binary"):
        fifo_path("binary:///usr/bin/logger?x=1")


def fifos(tmp: Path) -> tuple[str, str, str]:
    names = []
    for n in ("in", "out", "err"):
        p = tmp / n
        os.mkfifo(p)
        names.append(str(p))
    return names[0], names[1], names[2]


def test_pipes_copy_all_output_of_a_quick_process_and_stdin_eof(tmp_path: Path) -> None:
    async def main() -> None:
        r = Reaper()
        r.start()
        stdin, stdout, stderr = fifos(tmp_path)
        # containerd's side: it holds the output readers before Create, opens stdin to write
        out_r = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
        err_r = os.open(stderr, os.O_RDONLY | os.O_NONBLOCK)
        io = ProcessIO(stdin, stdout, stderr, terminal=False)
        await io.open()
        in_w = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)
        try:
            script = "cat; head -c 200000 /dev/zero | tr '\\0' x; echo done >&2"
            proc_task = asyncio.create_task(
                r.run(
                    ["sh", "-c", script],
                    stdin=io.child_fds[0],
                    stdout=io.child_fds[1],
                    stderr=io.child_fds[2],
                )
            )
            await asyncio.sleep(0)  # the child is spawned with its fds first
            await io.started()
            os.write(in_w, b"from stdin\n")
            io.close_stdin()  # CloseIO: containerd's close is now EOF
            os.close(in_w)
            chunks: list[bytes] = []

            def drain() -> None:
                while True:
                    try:
                        data = os.read(out_r, 65536)
                    except BlockingIOError:
                        return
                    if not data:
                        return
                    chunks.append(data)

            loop = asyncio.get_running_loop()
            loop.add_reader(out_r, drain)
            res = await proc_task
            assert res.status == 0
            assert await io.wait_output(20)
            deadline = loop.time() + 20
            while sum(map(len, chunks)) < 200011 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            loop.remove_reader(out_r)
            out = b"".join(chunks)
            assert out == b"from stdin\n" + b"x" * 200000
            assert os.read(err_r, 100) == b"done\n"
        finally:
            io.close()
            os.close(out_r)
            os.close(err_r)
            r.stop()

    run(main)


def test_close_is_idempotent_and_frees_fds(tmp_path: Path) -> None:
    async def main() -> None:
        before = len(os.listdir("/proc/self/fd"))
        stdin, stdout, _ = fifos(tmp_path)
        keep = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
        for _ in range(10):
            io = ProcessIO(stdin, stdout, stdout, terminal=False)
            await io.open()
            await io.started()
            io.close()
            io.close()
        os.close(keep)
        assert len(os.listdir("/proc/self/fd")) <= before

    run(main)


def test_resize_without_terminal_is_failed_precondition() -> None:
    io = ProcessIO("", "", "", terminal=False)
    with pytest.raises(errdefs.FailedPrecondition):
        io.resize(80, 24)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="linux only")
def test_terminal_through_console_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake runtime sends a pty master over the console socket, as runc does."""
    monkeypatch.setenv("PODSHIM_RUN_DIR", str(tmp_path))

    async def main() -> None:
        _, stdout, _ = fifos(tmp_path)
        out_r = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
        io = ProcessIO("", stdout, "", terminal=True)
        await io.open()
        assert io.console_socket is not None
        sender = (
            "import os,socket,sys,pty,termios,struct,fcntl\n"
            "m,s=pty.openpty()\n"
            "c=socket.socket(socket.AF_UNIX);c.connect(sys.argv[1])\n"
            "socket.send_fds(c,[b'/dev/pts/x'],[m]);c.close();os.close(m)\n"
            "os.write(s,b'hello tty\\n')\n"
            "import time\n"
            "for _ in range(200):\n"
            "  r,c2,x,y=struct.unpack('HHHH',fcntl.ioctl(s,termios.TIOCGWINSZ,b'\\0'*8))\n"
            "  if (r,c2)==(33,99): print('resized',flush=True); break\n"
            "  time.sleep(0.05)\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", sender, io.console_socket, stdout=asyncio.subprocess.PIPE
        )
        await io.started(timeout=20)
        io.resize(99, 33)
        out, _ = await proc.communicate()
        assert b"resized" in out
        loop = asyncio.get_running_loop()
        data = b""
        deadline = loop.time() + 20
        while b"hello tty" not in data and loop.time() < deadline:
            try:
                data += os.read(out_r, 1000)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        assert b"hello tty" in data
        io.close()
        os.close(out_r)
        assert not any(tmp_path.joinpath("console").iterdir())

    run(main)


def test_output_waits_for_a_late_reader_instead_of_discarding_it(tmp_path: Path) -> None:
    """A FIFO's unread data dies with its last open fd: the pump keeps the FIFO open
    until a reader that opens late (ctr under load) has taken the output."""

    async def main() -> None:
        r = Reaper()
        r.start()
        _, stdout, _ = fifos(tmp_path)
        io = ProcessIO("", stdout, "", terminal=False)
        await io.open()
        try:
            task = asyncio.create_task(
                r.run(
                    ["sh", "-c", "echo late-reader"],
                    stdin=io.child_fds[0],
                    stdout=io.child_fds[1],
                    stderr=io.child_fds[2],
                )
            )
            await asyncio.sleep(0)
            await io.started()
            assert (await task).status == 0
            waiting = asyncio.create_task(io.wait_output(20))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # unread output: the FIFO is held open
            rd = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)  # the reader arrives late
            try:
                assert os.read(rd, 100) == b"late-reader\n"
                assert await waiting
            finally:
                os.close(rd)
        finally:
            io.close()
            r.stop()

    run(main)
