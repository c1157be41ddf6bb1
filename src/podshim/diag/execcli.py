"""``podshim diag exec [-t] POD -- CMD...``: the client side of ExecInHost.

stdio goes through FIFOs in a private temporary directory, as hcsshim's shimdiag uses
local pipes: this side opens every FIFO *before* the call (stdin for writing, stdout and
stderr for reading, each with a writer of its own so the shim arriving late is not EOF)
and copies between them and the local stdio in threads. When the call returns, the
shim has closed its writers after the last byte: dropping ours makes the readers see
EOF once everything was printed.

With ``-t`` the remote process gets a terminal. When the local stdin is a terminal it
is put in raw mode: every key, Ctrl-C included, is a byte for the remote terminal, and
SIGWINCH is forwarded as ResizeExecInHost. Without raw mode, Ctrl-C (SIGINT) is
forwarded as SignalExecInHost(SIGINT). Any other way this command dies closes its
connection, and the shim SIGKILLs the remote process; SIGTERM and SIGHUP do so too,
after restoring the terminal. The exit status is the remote process's (128+signal when
it was killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import signal
import struct
import tempfile
import termios
import threading
import time
import tty as ttymod
from collections.abc import Callable
from typing import TYPE_CHECKING

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from podshim.api.diag.v1 import diag_pb2 as pb
from podshim.diag.service import SERVICE
from podshim.ttrpc.client import Client

if TYPE_CHECKING:
    from podshim.diag.registry import Entry

#: how long the output threads may take to print what is left once the call returned
OUTPUT_JOIN_TIMEOUT = 10.0
#: deadline of a signal or resize call
CONTROL_TIMEOUT = 10.0


def exec_in_pod(entry: Entry, command: list[str], *, tty: bool) -> int:
    """Run ``command`` in the pod of ``entry``'s shim; returns its exit status."""
    raw = tty and os.isatty(0)
    with tempfile.TemporaryDirectory(prefix="podshim-diag-") as tmp:
        stdio = LocalStdio(tmp, tty)
        saved = termios.tcgetattr(0) if raw else None
        try:
            if raw:
                ttymod.setraw(0)
            return asyncio.run(_exec(entry, command, stdio, tty=tty, raw=raw))
        finally:
            stdio.finish()
            if saved is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)


def window_size(fd: int) -> tuple[int, int]:
    """(width, height) of the terminal on ``fd``, (0, 0) when it is none."""
    try:
        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return 0, 0
    rows, cols, _, _ = struct.unpack("HHHH", packed)
    return cols, rows


async def _exec(
    entry: Entry, command: list[str], stdio: LocalStdio, *, tty: bool, raw: bool
) -> int:
    exec_id = f"diag-{secrets.token_hex(6)}"
    width, height = window_size(0) if tty else (0, 0)
    env = [f"TERM={os.environ.get('TERM') or 'xterm'}"] if tty else []
    req = pb.ExecInHostRequest(args=command, terminal=tty, stdin=stdio.stdin, stdout=stdio.stdout,
                               stderr=stdio.stderr, env=env, exec_id=exec_id,
                               width=width, height=height)  # fmt: skip
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    async with Client(entry.socket) as client:

        async def control(method: str, message: Message) -> None:
            with contextlib.suppress(Exception):  # not started yet, or already gone
                await client.call(
                    SERVICE, method, message, empty_pb2.Empty, timeout=CONTROL_TIMEOUT
                )

        def forward(method: str, make: Callable[[], Message]) -> None:
            task = loop.create_task(control(method, make()))
            pending.add(task)
            task.add_done_callback(pending.discard)

        watched: list[int] = []
        if not raw:
            interrupt = pb.SignalExecInHostRequest(exec_id=exec_id, signal=signal.SIGINT)
            loop.add_signal_handler(signal.SIGINT, forward, "SignalExecInHost", lambda: interrupt)
            watched.append(signal.SIGINT)
        if tty and raw:

            def resize() -> Message:
                w, h = window_size(0)
                return pb.ResizeExecInHostRequest(exec_id=exec_id, width=w, height=h)

            loop.add_signal_handler(signal.SIGWINCH, forward, "ResizeExecInHost", resize)
            watched.append(signal.SIGWINCH)
        call = asyncio.ensure_future(client.call(SERVICE, "ExecInHost", req, pb.ExecInHostResponse))
        ended_by: list[int] = []

        def end(sig: int) -> None:  # leave cleanly (terminal restored); the shim kills
            ended_by.append(sig)
            call.cancel()

        for stopper in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(stopper, end, stopper)
            watched.append(stopper)
        try:
            resp = await call
        except asyncio.CancelledError:
            if not ended_by:
                raise
            return 128 + ended_by[0]
        finally:
            for sig in watched:
                loop.remove_signal_handler(sig)
            for task in list(pending):
                task.cancel()
    return resp.exit_code


class LocalStdio:
    """The FIFOs of one exec and the threads copying them to and from our stdio."""

    def __init__(self, directory: str, tty: bool) -> None:
        self.stdin = os.path.join(directory, "stdin")
        self.stdout = os.path.join(directory, "stdout")
        self.stderr = "" if tty else os.path.join(directory, "stderr")
        self._keep: list[int] = []  # our own writers on the output FIFOs
        self._readers: list[threading.Thread] = []
        self._closing = threading.Event()
        os.mkfifo(self.stdin, 0o600)
        fd = os.open(self.stdin, os.O_RDWR | os.O_CLOEXEC)
        self._thread(self._copy_stdin, fd)
        for path, out in ((self.stdout, 1), (self.stderr, 2)):
            if path:
                os.mkfifo(path, 0o600)
                r = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self._keep.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
                os.set_blocking(r, True)
                self._readers.append(self._thread(_copy_out, r, out))

    @staticmethod
    def _thread(target: Callable[..., None], *args: int) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True)  # never holds up exit
        t.start()
        return t

    def _copy_stdin(self, fifo: int) -> None:
        """Our stdin into the FIFO; at EOF close it once the shim has read what we
        wrote (closing the last fd of a FIFO nobody opened yet would drop the data)."""
        try:
            while data := os.read(0, 65536):
                _write_all(fifo, data)
            while _unread(fifo) and not self._closing.is_set():
                time.sleep(0.02)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.close(fifo)

    def finish(self) -> None:
        """The call returned: let the readers reach EOF and print what is left."""
        self._closing.set()
        for fd in self._keep:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._keep.clear()
        deadline = time.monotonic() + OUTPUT_JOIN_TIMEOUT
        for t in self._readers:
            t.join(max(0.0, deadline - time.monotonic()))


def _copy_out(src: int, dst: int) -> None:
    try:
        while data := os.read(src, 65536):
            _write_all(dst, data)
    except OSError:
        pass
    finally:
        os.close(src)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unread(fd: int) -> int:
    """Bytes waiting in the pipe behind ``fd`` (FIONREAD)."""
    packed = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", packed)[0])
