"""Streams for the podshim integration tests (``test_shim_*.py``): ``ctr events`` in
the background, a pty for ``ctr -t``, and direct ttrpc calls to a shim's socket.

The lab itself, ``ctr`` and the host-side checks are in ``shimutil``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import secrets
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from google.protobuf.message import Message

from podshim.ttrpc.client import call_sync
from podshim_lab import Containerd, wait_for

if TYPE_CHECKING:
    from tests.integration.shimutil import DEADLINE
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    from shimutil import DEADLINE

M = TypeVar("M", bound=Message)

TASK_SERVICE = "containerd.task.v2.Task"


# -- ctr events ----------------------------------------------------------------------------


class Event(NamedTuple):
    namespace: str
    topic: str
    payload: dict[str, Any]


def parse_event(line: str) -> Event | None:
    """``2026-11-29 00:05:11.70 +0000 UTC <ns> <topic> <json>`` -> Event."""
    parts = line.rstrip("\n").split(" ", 6)
    if len(parts) < 6 or not parts[5].startswith("/"):
        return None
    payload: dict[str, Any] = {}
    if len(parts) == 7 and parts[6].strip():
        try:
            value = json.loads(parts[6])
        except ValueError:
            value = {}
        if isinstance(value, dict):
            payload = value
    return Event(parts[4], parts[5], payload)


class EventStream:
    """``ctr events`` running in the background; lines collected by a thread."""

    def __init__(self, lab: Containerd) -> None:
        self.lab = lab
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [lab.ctr_bin, "--address", lab.address, "events"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self._lines.append(line)

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def events(self) -> list[Event]:
        return [e for e in map(parse_event, self.lines) if e is not None]

    def sync(self) -> None:
        """Block until the subscription is live: publish marker events (a namespace
        label) until one shows up; events published before that may have been missed."""
        end = time.monotonic() + DEADLINE
        while True:
            token = secrets.token_hex(4)
            self.lab.ctr("namespaces", "label", self.lab.namespace, f"podshim-test-marker={token}")
            try:
                wait_for(functools.partial(self.seen, token), timeout=2.0)
                return
            except AssertionError:
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise AssertionError(
                        f"ctr events never showed a marker: {self.lines[-5:]}"
                    ) from None

    def seen(self, text: str) -> bool:
        """True once some line contains ``text``."""
        return any(text in line for line in self.lines)

    def task_events(self, cid: str) -> list[Event]:
        """This container's ``/tasks/...`` events, in arrival order."""
        return [
            e
            for e in self.events()
            if e.topic.startswith("/tasks/") and e.payload.get("container_id") == cid
        ]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def event_stream(lab: Containerd) -> Iterator[EventStream]:
    stream = EventStream(lab)
    try:
        stream.sync()
        yield stream
    finally:
        stream.close()


# -- a pty for ctr -t ----------------------------------------------------------------------


@dataclass
class PtyResult:
    status: int
    output: str
    raw: bytes = field(repr=False, default=b"")


class PtyProcess:
    """Run ``argv`` with a fresh pty (of size rows x cols, set *before* it starts) as
    its stdin/stdout/stderr, collecting everything it writes."""

    def __init__(self, argv: Sequence[str], rows: int, cols: int) -> None:
        self.master, slave = os.openpty()
        try:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            self.proc = subprocess.Popen(
                list(argv),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                close_fds=True,
            )
        except BaseException:
            os.close(self.master)
            raise
        finally:
            os.close(slave)
        self.raw = b""

    def _pump(self, timeout: float) -> tuple[bool, bool]:
        """Read what arrives within ``timeout``: (still open, got data)."""
        r, _, _ = select.select([self.master], [], [], timeout)
        if not r:
            return True, False
        try:
            data = os.read(self.master, 65536)
        except OSError as exc:
            if exc.errno == errno.EIO:  # every slave fd closed
                return False, False
            raise
        self.raw += data
        return bool(data), bool(data)

    @property
    def text(self) -> str:
        return self.raw.decode(errors="replace").replace("\r", "")

    def wait_output(self, needle: str, timeout: float = DEADLINE) -> None:
        end = time.monotonic() + timeout
        while needle not in self.text:
            if time.monotonic() > end:
                raise AssertionError(f"{needle!r} not seen in pty output {self.text!r}")
            is_open, _ = self._pump(0.2)
            if not is_open and self.proc.poll() is not None:
                raise AssertionError(f"{needle!r} not seen before exit: {self.text!r}")

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = DEADLINE) -> PtyResult:
        end = time.monotonic() + timeout
        while True:
            is_open, got = self._pump(0.2)
            if self.proc.poll() is not None and (not is_open or not got):
                break
            if time.monotonic() > end:
                self.kill()
                raise AssertionError(f"{self.proc.args!r} still running: {self.text!r}")
        while is_open:  # drain what is still buffered
            is_open, got = self._pump(0.2)
            is_open = is_open and got
        assert self.proc.returncode is not None
        return PtyResult(self.proc.returncode, self.text, self.raw)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def close(self) -> None:
        self.kill()
        with contextlib.suppress(OSError):
            os.close(self.master)


def run_in_pty(argv: Sequence[str], rows: int, cols: int, timeout: float = DEADLINE) -> PtyResult:
    p = PtyProcess(argv, rows, cols)
    try:
        return p.wait(timeout)
    finally:
        p.close()


#: sh snippet: wait (up to ~20 s) until the pty has a size, then print it as size=R C
#: (ctr sets the task's pty size with ResizePty right *after* Start, so it may come late)
PRINT_SIZE = (
    'i=0; s=""; while [ $i -lt 200 ]; do s=$(stty size 2>/dev/null); '
    '[ -n "$s" ] && break; i=$((i+1)); sleep 0.1; done; echo "size=$s"'
)


# -- direct ttrpc to a shim ------------------------------------------------------------


def shim_call(
    address: str, method: str, request: Message, response_type: type[M], timeout: float = 30.0
) -> M:
    """One ``containerd.task.v2.Task`` call on the shim socket ``address``."""
    return call_sync(address, TASK_SERVICE, method, request, response_type, timeout=timeout)
