"""Interop of podshim's ttrpc *client* with the real Go peers.

* containerd's ttrpc events service: an event we ``Forward`` must come out of a real
  ``ctr events`` subscriber, decoded by containerd's own type registry, and containerd's
  validation errors must reach us as the right error kind.
* ``containerd-shim-runc-v2``: ``Connect`` and ``State`` on the socket of a task that
  ``ctr`` started must decode to what containerd itself reports.

Every wait is a poll with a generous deadline (no fixed sleeps), so the tests stay
deterministic on a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from podshim import errors as errdefs
from podshim.api.events import task_pb2 as events_pb2_task
from podshim.api.services.ttrpc.events.v1 import events_pb2
from podshim.api.task.v2 import shim_pb2
from podshim.api.types import task_pb2 as types_pb2
from podshim.task.events import envelope_for
from podshim.ttrpc.client import Client, call_sync
from podshim_lab import Containerd, wait_for
from podshim_lab.events import forward_sync
from podshim_lab.procfs import read_stat

DEADLINE = 120.0
CALL_TIMEOUT = 30.0
NS_KEY = "containerd-namespace-ttrpc"
EVENTS_SERVICE = events_pb2.DESCRIPTOR.services_by_name["Events"].full_name
TASK_SERVICE = shim_pb2.DESCRIPTOR.services_by_name["Task"].full_name
TASK_DIR = "io.containerd.runtime.v2.task"

M = TypeVar("M", bound=Message)

# `ctr events` prints: <Go time.Time of the envelope timestamp> <namespace> <topic> <JSON>,
# e.g. "2026-11-29 00:04:29.352712526 +0000 UTC podshim-test /tasks/exit {...}".
EVENT_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? [+-]\d{4} \S+) "
    r"(?P<namespace>\S+) (?P<topic>\S+)(?: (?P<event>.*))?$"
)


def test_service_names() -> None:
    assert EVENTS_SERVICE == "containerd.services.events.ttrpc.v1.Events"
    assert TASK_SERVICE == "containerd.task.v2.Task"


# -- helpers ---------------------------------------------------------------------------


def go_fraction(nanos: int) -> str:
    """Go's ``.999999999`` layout: fractional seconds without trailing zeros."""
    digits = f"{nanos:09d}".rstrip("0")
    return f".{digits}" if digits else ""


def go_time_string(ts: timestamp_pb2.Timestamp) -> str:
    """What Go's ``time.Time.String()`` prints for a UTC protobuf timestamp."""
    base = datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{base}{go_fraction(ts.nanos)} +0000 UTC"


def go_rfc3339nano(ts: timestamp_pb2.Timestamp) -> str:
    """Go's JSON encoding of a UTC ``time.Time`` (RFC3339Nano)."""
    base = datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}{go_fraction(ts.nanos)}Z"


def timestamp(seconds: int, nanos: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def call(
    path: str,
    service: str,
    method: str,
    request: Message,
    response_type: type[M],
    *,
    namespace: str | None = None,
) -> M:
    """One unary call with our client on a fresh connection."""
    metadata = ((NS_KEY, namespace),) if namespace else ()
    return call_sync(
        path, service, method, request, response_type, metadata=metadata, timeout=CALL_TIMEOUT
    )


def call_error(
    path: str,
    service: str,
    method: str,
    request: Message,
    response_type: type[Message],
    *,
    namespace: str | None = None,
) -> errdefs.ShimError:
    """The error a call raises (fails the test if it succeeds)."""
    with pytest.raises(errdefs.ShimError) as info:
        call(path, service, method, request, response_type, namespace=namespace)
    return info.value


def forward(lab: Containerd, envelope: events_pb2.Envelope) -> None:
    forward_sync(lab.ttrpc_address, envelope, timeout=CALL_TIMEOUT)


class EventStream:
    """A running ``ctr events`` whose stdout lines are collected by a reader thread."""

    def __init__(self, lab: Containerd) -> None:
        self.lines: list[str] = []
        self.eof = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [lab.ctr_bin, "--address", lab.address, "events"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _pull(self, wait: float) -> None:
        """Move received lines to :attr:`lines`, waiting up to ``wait`` s for the first."""
        try:
            item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is None:
                self.eof = True
                return
            self.lines.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def wait_line(
        self,
        match: Callable[[str], bool],
        timeout: float,
        poke: Callable[[], None] | None = None,
    ) -> str:
        """The first collected line ``match`` accepts; call ``poke`` between polls."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            self._pull(0)
            for line in self.lines:
                if match(line):
                    return line
            if self.eof:
                raise AssertionError(f"ctr events exited ({self.proc.poll()}): {self.lines}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching ctr events line in {timeout}s: {self.lines}")
            if poke is not None:
                poke()
            self._pull(delay)
            delay = min(delay * 1.5, 0.5)

    def close(self) -> str:
        """Kill ``ctr events`` and return its stderr."""
        self.proc.kill()
        _, err = self.proc.communicate(timeout=60)
        self._reader.join(timeout=60)
        self._pull(0)
        return err


def parse_event(line: str) -> tuple[str, str, str, dict[str, object]]:
    """``(timestamp, namespace, topic, decoded event)`` of a ``ctr events`` line."""
    m = EVENT_LINE.match(line)
    assert m is not None, f"unexpected ctr events line: {line!r}"
    event = json.loads(m["event"] or "{}")
    assert isinstance(event, dict)
    return m["ts"], m["namespace"], m["topic"], event


def topic_is(topic: str, key: str, value: str) -> Callable[[str], bool]:
    def match(line: str) -> bool:
        m = EVENT_LINE.match(line)
        if m is None or m["topic"] != topic:
            return False
        return bool(json.loads(m["event"] or "{}").get(key) == value)

    return match


def subscribe(lab: Containerd, stream: EventStream, name: str) -> None:
    """Wait until ``ctr events`` is subscribed: forward probes until one shows up.

    Each probe is a ``/tasks/oom`` event for container ``name``; the forwards go on
    (gently backing off) until the subscriber prints one of them.
    """

    def poke() -> None:
        forward(lab, envelope_for(events_pb2_task.TaskOOM(container_id=name), lab.namespace))

    stream.wait_line(topic_is("/tasks/oom", "container_id", name), DEADLINE, poke)


def bundle_dir(lab: Containerd, task_id: str) -> Path:
    return lab.state / TASK_DIR / lab.namespace / task_id


def task_status(lab: Containerd, task_id: str) -> str | None:
    entry = lab.tasks().get(task_id)
    return entry[1] if entry else None


# -- (a) containerd's events service ------------------------------------------------------


def test_forward_reaches_ctr_events(containerd: Containerd) -> None:
    lab = containerd
    ns = lab.namespace
    stream = EventStream(lab)
    try:
        subscribe(lab, stream, "interop-probe")

        now = time.time_ns()
        exited_at = timestamp(now // 10**9 - 1, 123456789)
        exit_event = events_pb2_task.TaskExit(
            container_id="interop1", id="interop1", pid=4242, exit_status=137, exited_at=exited_at
        )
        envelope = events_pb2.Envelope(
            timestamp=timestamp(now // 10**9, 987654321),
            namespace=ns,
            topic="/tasks/exit",
            event=any_pb2.Any(
                type_url="containerd.events.TaskExit", value=exit_event.SerializeToString()
            ),
        )
        forward(lab, envelope)

        line = stream.wait_line(topic_is("/tasks/exit", "container_id", "interop1"), DEADLINE)
        ts, namespace, topic, event = parse_event(line)
        assert (namespace, topic) == (ns, "/tasks/exit"), line
        assert ts == go_time_string(envelope.timestamp), line
        assert event == {
            "container_id": "interop1",
            "id": "interop1",
            "pid": 4242,
            "exit_status": 137,
            "exited_at": go_rfc3339nano(exited_at),
        }, line
    finally:
        err = stream.close()
    assert "level=error" not in err, err


def test_forward_invalid_envelopes_are_rejected(containerd: Containerd) -> None:
    lab = containerd
    ns = lab.namespace
    stream = EventStream(lab)
    try:
        subscribe(lab, stream, "interop-probe")
        exit_event = events_pb2_task.TaskExit(
            container_id="rejected", id="rejected", pid=1, exit_status=1
        )

        bad_topic = envelope_for(exit_event, ns, topic="tasks/exit")
        err = call_error(
            lab.ttrpc_address,
            EVENTS_SERVICE,
            "Forward",
            events_pb2.ForwardRequest(envelope=bad_topic),
            empty_pb2.Empty,
            namespace=ns,
        )
        assert isinstance(err, errdefs.InvalidArgument), repr(err)
        assert "tasks/exit" in str(err) and "must start with '/'" in str(err), str(err)

        zero_time = envelope_for(exit_event, ns)
        zero_time.ClearField("timestamp")
        err = call_error(
            lab.ttrpc_address,
            EVENTS_SERVICE,
            "Forward",
            events_pb2.ForwardRequest(envelope=zero_time),
            empty_pb2.Empty,
            namespace=ns,
        )
        assert isinstance(err, errdefs.InvalidArgument), repr(err)

        bad_namespace = envelope_for(exit_event, "Not A Namespace!")
        err = call_error(
            lab.ttrpc_address,
            EVENTS_SERVICE,
            "Forward",
            events_pb2.ForwardRequest(envelope=bad_namespace),
            empty_pb2.Empty,
            namespace=ns,
        )
        assert isinstance(err, errdefs.InvalidArgument), repr(err)

        # Nothing rejected was published: a sentinel forwarded afterwards arrives, and
        # the single subscriber saw no trace of the rejected event before it.
        forward(lab, envelope_for(events_pb2_task.TaskOOM(container_id="sentinel"), ns))
        stream.wait_line(topic_is("/tasks/oom", "container_id", "sentinel"), DEADLINE)
        assert not [line for line in stream.lines if "rejected" in line], stream.lines
    finally:
        stream.close()


# -- (b) containerd-shim-runc-v2 ----------------------------------------------------------


def test_runc_v2_shim_connect_and_state(containerd: Containerd, busybox: str) -> None:
    lab = containerd
    tid = "t-go"
    lab.ctr("run", "-d", "--runtime", "io.containerd.runc.v2", busybox, tid, "sleep", "1000")
    removed = False
    try:
        task_pid, status = lab.tasks()[tid]
        assert status == "RUNNING"
        bundle = bundle_dir(lab, tid)
        address = (bundle / "address").read_text().strip()
        assert address.startswith("unix:///"), address
        path = address.removeprefix("unix://")
        assert Path(path).is_socket()

        connect = call(
            path, TASK_SERVICE, "Connect", shim_pb2.ConnectRequest(id=tid), shim_pb2.ConnectResponse
        )
        assert connect.task_pid == task_pid
        shim = read_stat(connect.shim_pid)
        assert shim is not None, connect
        assert shim.comm.startswith("containerd-shim") and shim.state != "Z", shim
        assert (connect.shim_pid, shim.state, shim.comm) in lab.descendants()
        init = read_stat(task_pid)
        assert init is not None and init.ppid == connect.shim_pid, (init, connect)

        state = call(
            path, TASK_SERVICE, "State", shim_pb2.StateRequest(id=tid), shim_pb2.StateResponse
        )
        assert state.status == types_pb2.RUNNING == 2
        assert state.id == tid
        assert state.pid == task_pid
        assert state.bundle == str(bundle)
        assert state.exit_status == 0 and not state.terminal and state.exec_id == ""
        for name, value in (
            ("stdin", state.stdin),
            ("stdout", state.stdout),
            ("stderr", state.stderr),
        ):
            assert value.endswith(f"/{tid}-{name}"), state

        # Concurrent calls on one connection come back matched to their stream ids.
        async def many() -> list[shim_pb2.StateResponse]:
            async with Client(path, timeout=CALL_TIMEOUT) as client:
                return await asyncio.gather(
                    *(
                        client.call(
                            TASK_SERVICE,
                            "State",
                            shim_pb2.StateRequest(id=tid),
                            shim_pb2.StateResponse,
                        )
                        for _ in range(32)
                    )
                )

        assert asyncio.run(many()) == [state] * 32

        err = call_error(
            path,
            TASK_SERVICE,
            "State",
            shim_pb2.StateRequest(id="no-such-task"),
            shim_pb2.StateResponse,
        )
        assert isinstance(err, errdefs.NotFound), repr(err)

        lab.ctr("task", "kill", "-s", "9", tid)
        wait_for(
            lambda: task_status(lab, tid) == "STOPPED",
            DEADLINE,
            message=lambda: f"{tid} STOPPED in {lab.tasks()}",
        )
        stopped = call(
            path, TASK_SERVICE, "State", shim_pb2.StateRequest(id=tid), shim_pb2.StateResponse
        )
        assert stopped.status == types_pb2.STOPPED
        assert stopped.pid == task_pid and stopped.exit_status == 137
        assert stopped.exited_at.seconds > 0

        lab.ctr("task", "rm", tid)
        lab.ctr("c", "rm", tid)
        removed = True
        assert lab.ctr("containers", "ls", "-q").stdout.split() == []
        wait_for(
            lambda: lab.descendants() == [],
            DEADLINE,
            message=lambda: f"shim exit: {lab.descendants()}",
        )
        assert not Path(path).exists()
    finally:
        if not removed:
            lab.ctr("task", "kill", "-s", "9", tid, check=False)
            lab.ctr("task", "rm", "-f", tid, check=False)
            lab.ctr("c", "rm", tid, check=False)
