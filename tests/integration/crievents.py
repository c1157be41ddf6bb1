"""``ctr events`` for the CRI integration tests (``test_cri_*.py``).

A background subscription to the lab containerd's events, parsed as they arrive.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from podshim_lab import Containerd, wait_for

if TYPE_CHECKING:
    from tests.integration.criutil import CRI_NAMESPACE, DEADLINE
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    from criutil import CRI_NAMESPACE, DEADLINE


@dataclass(frozen=True)
class Event:
    """One ``ctr events`` line: topic and the event's JSON body."""

    namespace: str
    topic: str
    body: dict[str, Any]
    line: str


class CtrEvents:
    """``ctr events`` running in the background; lines are parsed as they arrive.

    Use :meth:`prime` before triggering what you want to observe: it waits until the
    subscription demonstrably delivers events, so nothing is missed.
    """

    def __init__(self, lab: Containerd, namespace: str = CRI_NAMESPACE) -> None:
        argv = [lab.ctr_bin, "--address", lab.address, "--namespace", namespace, "events"]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="ctr-events", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            event = self._parse(line.rstrip("\n"))
            if event is not None:
                with self._lock:
                    self.events.append(event)

    @staticmethod
    def _parse(line: str) -> Event | None:
        # "<date> <time> <zone> <tz> <namespace> <topic> <json>"
        brace = line.find("{")
        head = (line[:brace] if brace >= 0 else line).split()
        if len(head) < 2 or not head[-1].startswith("/"):
            return None
        try:
            body = json.loads(line[brace:]) if brace >= 0 else {}
        except ValueError:
            body = {}
        return Event(head[-2], head[-1], body if isinstance(body, dict) else {}, line)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    def wait(
        self, pred: Callable[[Event], bool], timeout: float = DEADLINE, what: str = ""
    ) -> Event:
        def found() -> Event | None:
            return next((e for e in self.snapshot() if pred(e)), None)

        return wait_for(
            found,
            timeout=timeout,
            interval=0.1,
            message=lambda: (
                f"ctr event {what}; seen:\n" + "\n".join(e.line for e in self.snapshot()[-30:])
            ),
        )

    def prime(self, trigger: Callable[[], object], topic: str, timeout: float = DEADLINE) -> None:
        """Call ``trigger`` until an event with ``topic`` shows up (subscription live)."""
        deadline = time.monotonic() + timeout
        while True:
            start = len(self.snapshot())

            def arrived(start: int = start) -> bool:
                return any(e.topic == topic for e in self.snapshot()[start:])

            trigger()
            try:
                wait_for(arrived, timeout=10, interval=0.1, message=f"ctr event {topic}")
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=30)
        self._reader.join(timeout=30)

    def __enter__(self) -> CtrEvents:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
