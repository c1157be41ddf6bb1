"""A process's stdio: containerd's FIFOs on one side, pipes or a pty on the other.

Like containerd's runc shim, podshim never hands containerd's FIFOs to the container.
The container gets pipes (or a pty slave); the shim pumps

* stdin FIFO -> pipe (or pty master), closing the pipe on EOF, and
* pipe (or pty master) -> stdout/stderr FIFOs.

FIFO rules (see the protocol brief, gotcha 6): output FIFOs are opened O_RDWR (never
blocks, and a reader of our own keeps writes from failing while containerd restarts);
the stdin FIFO is opened O_RDONLY|O_NONBLOCK plus a writer of our own, so a missing
client never looks like EOF; CloseIO drops that writer so containerd's close is EOF.
When the process exits, :meth:`ProcessIO.wait_output` waits until every byte it wrote
reached the FIFOs, so quick processes lose no output.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
import termios

from podshim import errors as errdefs
from podshim import rundir

log = logging.getLogger("podshim.stdio")

CHUNK = 32 * 1024


def fifo_path(uri: str) -> str:
    """Plain paths and ``fifo://`` URIs name a FIFO; ``file://`` a file (output only);
    other schemes (``binary://``) are refused."""
    if "://" not in uri:
        return uri
    from urllib.parse import urlparse  # only for URIs (urllib loads ipaddress: memory)

    u = urlparse(uri)
    if u.scheme in ("fifo", "file"):
        return u.path
    raise errdefs.InvalidArgument(f"unsupported stdio URI scheme {u.scheme!r} in {uri!r}")


class Pump:
    """Copies ``src`` to ``dst`` on the event loop until EOF (or EIO, a pty's EOF).

    Both fds are made non-blocking. ``close_dst`` closes the destination at EOF (stdin
    pipes: that is how the process sees EOF). Output that cannot be written because the
    reader went away is dropped, never raised.
    """

    #: how long an output FIFO may hold unread bytes at EOF before it is closed anyway
    DRAIN_TIMEOUT = 2.0

    def __init__(
        self, src: int, dst: int, *, close_src: bool, close_dst: bool, drain_dst: bool = False
    ) -> None:
        self.src, self.dst = src, dst
        self._close_src, self._close_dst = close_src, close_dst
        self._drain_dst = drain_dst
        self._drain_deadline = 0.0
        self._finished = False
        self._buf = b""
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        os.set_blocking(src, False)
        os.set_blocking(dst, False)
        self._loop.add_reader(src, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.src, CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                log.debug("stdio read fd %d: %s", self.src, exc)
            data = b""
        if not data:
            self._eof()
            return
        self._buf = data
        self._loop.remove_reader(self.src)
        self._flush()

    def _flush(self) -> None:
        while self._buf:
            try:
                n = os.write(self.dst, self._buf)
            except BlockingIOError:
                self._loop.add_writer(self.dst, self._writable)
                return
            except OSError as exc:  # reader gone (EPIPE): drop the output
                log.debug("stdio write fd %d: %s", self.dst, exc)
                n = len(self._buf)
            self._buf = self._buf[n:]
        if not self.done.done():
            self._loop.add_reader(self.src, self._readable)

    def _writable(self) -> None:
        self._loop.remove_writer(self.dst)
        self._flush()

    def _eof(self) -> None:
        """The source is done. An output FIFO we opened O_RDWR is closed only once its
        reader took what is in it: closing the last open fd of a FIFO discards unread
        data, and a client whose reader is slow to open (``ctr`` under load) would lose
        the tail of a quick process's output."""
        self._loop.remove_reader(self.src)
        if self._drain_dst and self._buf == b"":
            self._drain_deadline = self._loop.time() + self.DRAIN_TIMEOUT
            self._wait_drained()
        else:
            self._finish()

    def _wait_drained(self) -> None:
        try:
            unread = struct.unpack("i", fcntl.ioctl(self.dst, termios.FIONREAD, b"\0" * 4))[0]
        except OSError:
            unread = 0
        if unread and self._loop.time() < self._drain_deadline and not self.done.done():
            self._loop.call_later(0.005, self._wait_drained)
        else:
            self._finish()

    def _finish(self) -> None:
        """Once only: a second close of the same numbers would close whatever file the
        process opened under them since (a pidfd, an OOM eventfd, another FIFO)."""
        if self._finished:
            return
        self._finished = True
        self._loop.remove_reader(self.src)
        self._loop.remove_writer(self.dst)
        if self._close_src:
            _close(self.src)
        if self._close_dst:
            _close(self.dst)
        if not self.done.done():
            self.done.set_result(None)

    def cancel(self) -> None:
        """Stop pumping now and close what this pump owns."""
        self._finish()


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _open_output(uri: str) -> int:
    path = fifo_path(uri)
    if uri.startswith("file://"):  # ctr --log-uri file:///...: append to a file
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


class ProcessIO:
    """The stdio of one process (a container init or an exec).

    Use: ``io = ProcessIO(stdin, stdout, stderr, terminal)``; ``await io.open()``; give
    ``io.child_fds`` (and ``io.console_socket`` for a terminal) to the runtime; after it
    returns call ``await io.started()``; on exit ``await io.wait_output(timeout)``;
    finally ``io.close()``.
    """

    def __init__(self, stdin: str, stdout: str, stderr: str, terminal: bool) -> None:
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.terminal = terminal
        self.child_fds: tuple[int, int, int] = (-1, -1, -1)
        self.console_socket: str | None = None
        self._owned: list[int] = []  # fds closed by close()
        self._child_ends: list[int] = []  # closed once the runtime has them
        self._stdin_keep = -1  # our own writer on the stdin FIFO
        self._pumps: list[Pump] = []
        self._out_pumps: list[Pump] = []
        self._master = -1
        self._console_dir: str | None = None
        self._console_listener: socket.socket | None = None
        #: with a terminal: the stdin FIFO and the output, opened before the runtime runs
        self._tty_in = -1
        self._tty_out = -1

    async def open(self) -> None:
        """Open the FIFOs and create the pipes (or the console socket). A FIFO or file
        that cannot be opened is InvalidArgument naming it."""
        try:
            if self.terminal:
                # opened now, as without a terminal: a bad path fails before the runtime runs
                if self.stdin:
                    self._tty_in = self._fifo_in()
                if self.stdout:
                    self._tty_out = _open_output(self.stdout)
                    self._owned.append(self._tty_out)
                self._open_console_socket()
            else:
                self._open_pipes()
        except OSError as exc:
            self.close()
            where = exc.filename or "stdio"
            raise errdefs.InvalidArgument(f"stdio: open {where}: {exc.strerror or exc}") from None
        except BaseException:
            self.close()
            raise

    def _fifo_in(self) -> int:
        path = fifo_path(self.stdin)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._owned.append(fd)
        self._stdin_keep = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        return fd

    def _pump_out(self, src: int, uri: str, dst: int = -1) -> None:
        """Pump ``src`` into the output ``uri`` (``dst``: it, opened already). The pump
        owns its own FIFO fd and closes it at EOF: containerd (CRI's ExecSync) waits for
        the FIFO's EOF, so no writer may outlive the process's output."""
        fifo = not uri.startswith("file://")
        if dst < 0:
            dst = _open_output(uri)
        pump = Pump(src, dst, close_src=True, close_dst=True, drain_dst=fifo)
        self._pumps.append(pump)
        self._out_pumps.append(pump)

    def _open_pipes(self) -> None:
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._child_ends.append(devnull)
        fds = [devnull, devnull, devnull]
        if self.stdin:
            src = self._fifo_in()
            r, w = os.pipe()
            self._child_ends.append(r)
            fds[0] = r
            self._pumps.append(Pump(src, w, close_src=False, close_dst=True))
        for i, uri in ((1, self.stdout), (2, self.stderr)):
            if not uri:
                continue
            r, w = os.pipe()
            self._child_ends.append(w)
            fds[i] = w
            self._pump_out(r, uri)
        self.child_fds = (fds[0], fds[1], fds[2])

    def _open_console_socket(self) -> None:
        import tempfile  # only with a terminal

        self._console_dir = tempfile.mkdtemp(prefix="pty", dir=_console_base())
        path = os.path.join(self._console_dir, "c.sock")
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(path)
        lst.listen(1)
        lst.setblocking(False)
        self._console_listener = lst
        self.console_socket = path
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._child_ends.append(devnull)
        self.child_fds = (devnull, devnull, devnull)

    async def started(self, timeout: float = 30.0) -> None:
        """The runtime has started the process: drop our copies of its ends, and for
        a terminal receive the pty master and start pumping."""
        for fd in self._child_ends:
            _close(fd)
        self._child_ends.clear()
        if not self.terminal:
            return
        assert self._console_listener is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                conn, _ = await loop.sock_accept(self._console_listener)
        except TimeoutError:
            raise errdefs.DeadlineExceeded(
                f"the runtime sent no pty master on the console socket in {timeout:.0f}s"
            ) from None
        with conn:
            conn.setblocking(True)
            conn.settimeout(timeout)
            _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
        if not fds:
            raise errdefs.Unknown("runtime sent no pty master on the console socket")
        self._master = fds[0]
        self._owned.append(self._master)
        self._cleanup_console_socket()
        if self._tty_in >= 0:
            self._pumps.append(
                Pump(self._tty_in, os.dup(self._master), close_src=False, close_dst=True)
            )
        if self._tty_out >= 0:
            out, self._tty_out = self._tty_out, -1
            self._owned.remove(out)  # the pump owns it now
            self._pump_out(os.dup(self._master), self.stdout, out)

    def _cleanup_console_socket(self) -> None:
        if self._console_listener is not None:
            self._console_listener.close()
            self._console_listener = None
        if self._console_dir is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._console_dir, "c.sock"))
                os.rmdir(self._console_dir)
            self._console_dir = None

    def close_stdin(self) -> None:
        """CloseIO: from now on containerd closing its stdin FIFO writer is EOF."""
        if self._stdin_keep >= 0:
            _close(self._stdin_keep)
            self._stdin_keep = -1

    def resize(self, width: int, height: int) -> None:
        """ResizePty: set the pty's window size."""
        if self._master < 0:
            raise errdefs.FailedPrecondition("process has no terminal")
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def wait_output(self, timeout: float) -> bool:
        """Wait until all output reached the FIFOs (EOF on every output pipe). False when
        something (e.g. a daemonized grandchild) still holds a pipe after ``timeout``."""
        futs = [p.done for p in self._out_pumps]
        if not futs:
            return True
        done, _ = await asyncio.wait(futs, timeout=timeout)
        return len(done) == len(futs)

    def close(self) -> None:
        """Stop every pump and close every fd this object opened. Idempotent."""
        for p in self._pumps:
            p.cancel()
        self._pumps.clear()
        self._out_pumps.clear()
        for fd in self._child_ends + self._owned:
            _close(fd)
        self._child_ends.clear()
        self._owned.clear()
        self.close_stdin()
        self._master = -1
        self._cleanup_console_socket()


def _console_base() -> str:
    base = rundir.console_dir()
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base
