"""Task events forwarded to a fake containerd Events service over a real unix socket."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from podshim import errors as errdefs
from podshim.api.events import task_pb2
from podshim.api.services.ttrpc.events.v1 import events_pb2
from podshim.service.publisher import ForwardPublisher, publisher_from_env
from podshim.task.events import (
    EVENTS_SERVICE,
    TOPICS,
    NullPublisher,
    Publisher,
    envelope_for,
    topic_for,
)
from podshim.ttrpc.server import Server
from podshim.ttrpc.services import CallContext, bind
from tests.unit.fakes import RecordingPublisher

NS = "k8s.io"
DEADLINE = 20.0  # generous: conditions are polled, never assumed after a fixed sleep


class FakeEvents:
    """containerd's Events service: records what Forward receives."""

    def __init__(self) -> None:
        self.envelopes: list[events_pb2.Envelope] = []
        self.namespaces: list[str | None] = []
        self.received_at: list[int] = []
        self.reject_topic: str | None = None
        self.hang_once: set[str] = set()  # container ids whose first Forward hangs

    async def Forward(self, req: events_pb2.ForwardRequest, ctx: CallContext) -> empty_pb2.Empty:
        env = req.envelope
        if env.topic == self.reject_topic:
            raise errdefs.InvalidArgument(f"topic {env.topic!r}: rejected")
        cid = decode(env).container_id  # type: ignore[attr-defined]
        if cid in self.hang_once:
            self.hang_once.discard(cid)
            await asyncio.sleep(3600)  # ended by the call's deadline
        self.envelopes.append(env)
        self.namespaces.append(ctx.get("containerd-namespace-ttrpc"))
        self.received_at.append(time.time_ns())
        return empty_pb2.Empty()

    def ids(self) -> list[str]:
        return [decode(e).container_id for e in self.envelopes]  # type: ignore[attr-defined]


_BY_NAME: dict[str, type[Message]] = {cls.DESCRIPTOR.full_name: cls for cls in TOPICS}


def decode(env: events_pb2.Envelope) -> Message:
    msg = _BY_NAME[env.event.type_url]()
    msg.ParseFromString(env.event.value)
    return msg


async def start_server(path: str, fake: FakeEvents) -> Server:
    server = Server([bind(events_pb2.DESCRIPTOR.services_by_name["Events"], fake, partial=True)])
    await server.serve_path(path)
    return server


async def stop_server(server: Server, path: str) -> None:
    await server.shutdown(grace=0)
    Path(path).unlink(missing_ok=True)


async def until(cond: Callable[[], bool], timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.005)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    """Run ``coro()`` with a hard deadline, in the main task (no wrapper task)."""

    async def guarded() -> None:
        async with asyncio.timeout(60):
            await coro()

    asyncio.run(guarded())


def fast(
    path: str, *, maxlen: int = 2048, retry_for: float = 120.0, call_timeout: float = 5.0
) -> ForwardPublisher:
    """A publisher with short retry backoff (0.02 s doubling to 0.1 s)."""
    return ForwardPublisher(
        path,
        NS,
        maxlen=maxlen,
        retry_for=retry_for,
        call_timeout=call_timeout,
        backoff_initial=0.02,
        backoff_max=0.1,
    )


def starts(n: int, prefix: str = "c") -> list[task_pb2.TaskStart]:
    return [task_pb2.TaskStart(container_id=f"{prefix}{i}", pid=1000 + i) for i in range(n)]


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    """A socket path in tmp_path, or in a short temporary directory if that is too long."""
    path = str(tmp_path / "ev.sock")
    if len(path) < 100:
        yield path
        return
    base = tempfile.mkdtemp(prefix="podshim-ev-")
    try:
        yield os.path.join(base, "ev.sock")
    finally:
        shutil.rmtree(base)


def test_topics_cover_every_task_event() -> None:
    names = {
        m.name for m in task_pb2.DESCRIPTOR.message_types_by_name.values() if m.name != "TaskIO"
    }
    assert {cls.DESCRIPTOR.name for cls in TOPICS} == names
    assert TOPICS[task_pb2.TaskExecAdded] == "/tasks/exec-added"
    assert TOPICS[task_pb2.TaskCheckpointed] == "/tasks/checkpointed"
    assert all(t.startswith("/tasks/") for t in TOPICS.values())
    assert topic_for(task_pb2.TaskIO()) is None
    assert EVENTS_SERVICE == "containerd.services.events.ttrpc.v1.Events"


def test_envelope_type_url_is_bare_and_timestamp_never_zero() -> None:
    env = envelope_for(task_pb2.TaskOOM(container_id="x"), NS, now_ns=0)
    assert env.event.type_url == "containerd.events.TaskOOM"
    assert env.topic == "/tasks/oom"
    assert env.timestamp.ToNanoseconds() > 0
    with pytest.raises(TypeError):
        envelope_for(task_pb2.TaskIO(), NS)


def test_burst_of_500_arrives_in_order(sock: str) -> None:
    async def main() -> None:
        fake = FakeEvents()
        server = await start_server(sock, fake)
        pub = ForwardPublisher(sock, NS)
        for ev in starts(500):
            pub.publish(ev)
        assert await pub.flush(DEADLINE)
        assert fake.ids() == [f"c{i}" for i in range(500)]
        assert pub.stats.delivered == 500 and pub.pending == 0
        await pub.close(1)
        await stop_server(server, sock)

    run(main)


def test_envelope_fields_and_metadata(sock: str) -> None:
    async def main() -> None:
        fake = FakeEvents()
        server = await start_server(sock, fake)
        pub = ForwardPublisher(sock, "ns-one")
        exit_ev = task_pb2.TaskExit(container_id="c", id="e1", pid=42, exit_status=137)
        exit_ev.exited_at.FromNanoseconds(123_456_789)
        before = time.time_ns()
        pub.publish(exit_ev)
        after = time.time_ns()
        exit_ev.exit_status = 1  # changes after publish are not seen
        await until(lambda: len(fake.envelopes) == 1)
        env = fake.envelopes[0]
        assert env.namespace == "ns-one"
        assert env.topic == "/tasks/exit"
        assert env.event.type_url == "containerd.events.TaskExit"
        got = task_pb2.TaskExit.FromString(env.event.value)
        assert (got.container_id, got.id, got.pid, got.exit_status) == ("c", "e1", 42, 137)
        assert got.exited_at.ToNanoseconds() == 123_456_789
        ts = env.timestamp.ToNanoseconds()
        assert ts != 0 and before <= ts <= after  # the time publish() was called
        assert fake.namespaces == ["ns-one"]
        await pub.close(1)
        await stop_server(server, sock)

    run(main)


def test_survives_server_restart(sock: str) -> None:
    async def main() -> None:
        fake = FakeEvents()
        server = await start_server(sock, fake)
        pub = fast(sock)
        events = starts(30)
        for ev in events[:5]:
            pub.publish(ev)
        assert await pub.flush(DEADLINE)
        await stop_server(server, sock)  # containerd goes away; the connection breaks
        for ev in events[5:]:
            pub.publish(ev)
        await until(lambda: pub.stats.retries >= 1)
        await asyncio.sleep(0.5)  # stay down a while (not needed for correctness)
        server = await start_server(sock, fake)  # "restarted" containerd, same path
        assert await pub.flush(DEADLINE)
        assert fake.ids() == [f"c{i}" for i in range(30)]  # in order, exactly once
        assert pub.stats.delivered == 30
        assert pub.stats.overflowed == pub.stats.expired == pub.stats.rejected == 0
        await pub.close(1)
        await stop_server(server, sock)

    run(main)


def test_full_queue_drops_oldest(sock: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        fake = FakeEvents()
        pub = fast(sock, maxlen=10)
        events = starts(25)
        pub.publish(events[0])
        await until(lambda: pub.stats.retries >= 1)  # event 0 is being retried
        for ev in events[1:]:
            pub.publish(ev)
        assert pub.pending == 10
        assert pub.stats.overflowed == 15
        server = await start_server(sock, fake)
        await until(lambda: len(fake.envelopes) >= 10)
        assert await pub.flush(DEADLINE)
        assert fake.ids() == [f"c{i}" for i in range(15, 25)]
        await pub.close(1)
        await stop_server(server, sock)

    with caplog.at_level(logging.WARNING, logger="podshim.task.events"):
        run(main)
    assert "queue full (10)" in caplog.text  # rate-limited: one line for the burst
    assert sum("queue full" in r.getMessage() for r in caplog.records) == 1


def test_rejected_event_is_dropped_alone(sock: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        fake = FakeEvents()
        fake.reject_topic = "/tasks/oom"
        server = await start_server(sock, fake)
        pub = fast(sock)
        pub.publish(task_pb2.TaskCreate(container_id="a"))
        pub.publish(task_pb2.TaskOOM(container_id="b"))
        pub.publish(task_pb2.TaskStart(container_id="c"))
        pub.publish(task_pb2.TaskOOM(container_id="d"))
        pub.publish(task_pb2.TaskExit(container_id="e"))
        assert await pub.flush(DEADLINE)
        assert fake.ids() == ["a", "c", "e"]
        assert [e.topic for e in fake.envelopes] == ["/tasks/create", "/tasks/start", "/tasks/exit"]
        assert pub.stats.rejected == 2 and pub.stats.retries == 0
        await pub.close(1)
        await stop_server(server, sock)

    with caplog.at_level(logging.ERROR, logger="podshim.task.events"):
        run(main)
    assert sum("rejected /tasks/oom" in r.getMessage() for r in caplog.records) == 2


def test_retry_gives_up_after_retry_for(sock: str) -> None:
    async def main() -> None:
        fake = FakeEvents()
        pub = fast(sock, retry_for=0.3)
        pub.publish(task_pb2.TaskStart(container_id="lost"))
        await until(lambda: pub.stats.expired == 1)
        server = await start_server(sock, fake)
        pub.publish(task_pb2.TaskStart(container_id="kept"))
        assert await pub.flush(DEADLINE)
        assert fake.ids() == ["kept"]
        await pub.close(1)
        await stop_server(server, sock)

    run(main)


def test_deadline_exceeded_reconnects_and_resends(sock: str) -> None:
    async def main() -> None:
        fake = FakeEvents()
        fake.hang_once.add("c1")
        server = await start_server(sock, fake)
        pub = fast(sock, call_timeout=0.2)
        for ev in starts(4):
            pub.publish(ev)
        assert await pub.flush(DEADLINE)
        assert fake.ids() == ["c0", "c1", "c2", "c3"]
        assert pub.stats.retries == 1
        await pub.close(1)
        await stop_server(server, sock)

    run(main)


def test_flush_true_when_delivered_false_on_timeout(sock: str) -> None:
    async def main() -> None:
        fake = FakeEvents()
        pub = fast(sock)
        assert await pub.flush(0.01)  # nothing queued
        pub.publish(task_pb2.TaskPaused(container_id="p"))
        assert not await pub.flush(0.2)  # server down
        assert pub.pending == 1
        server = await start_server(sock, fake)
        assert await pub.flush(DEADLINE)
        assert fake.ids() == ["p"] and pub.pending == 0
        await pub.close(1)
        await stop_server(server, sock)

    run(main)


def test_close_stops_the_task(sock: str) -> None:
    async def main() -> None:
        fake = FakeEvents()
        server = await start_server(sock, fake)
        pub = ForwardPublisher(sock, NS)
        pub.publish(task_pb2.TaskResumed(container_id="r"))
        await pub.close(DEADLINE)
        assert fake.ids() == ["r"]
        pub.publish(task_pb2.TaskResumed(container_id="late"))  # dropped, no new task
        assert pub.stats.discarded == 1
        await stop_server(server, sock)
        await asyncio.sleep(0)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main)


def test_close_with_server_down_discards_and_stops(sock: str) -> None:
    async def main() -> None:
        pub = fast(sock)
        for ev in starts(3):
            pub.publish(ev)
        await pub.close(0.2)
        assert pub.stats.discarded == 3 and pub.pending == 0
        assert await pub.flush(0.01)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main)


def test_constructor_does_no_io_and_explicit_start(sock: str) -> None:
    pub = ForwardPublisher(sock, NS)  # no loop, no socket: fine
    pub.publish(task_pb2.TaskStart(container_id="early"))  # queued; no loop to send yet
    assert pub.pending == 1

    async def main() -> None:
        fake = FakeEvents()
        server = await start_server(sock, fake)
        pub.start()
        pub.start()  # idempotent
        assert await pub.flush(DEADLINE)
        assert fake.ids() == ["early"]
        await pub.close(1)
        await stop_server(server, sock)

    run(main)


def test_publish_from_another_thread(sock: str) -> None:
    async def main() -> None:
        fake = FakeEvents()
        server = await start_server(sock, fake)
        pub = ForwardPublisher(sock, NS)
        pub.start()

        def publish_all() -> None:
            for ev in starts(20, "t"):
                pub.publish(ev)

        th = threading.Thread(target=publish_all)
        th.start()
        await asyncio.to_thread(th.join)
        await until(lambda: len(fake.envelopes) == 20)
        assert fake.ids() == [f"t{i}" for i in range(20)]
        await pub.close(1)
        await stop_server(server, sock)

    run(main)


def test_publish_never_raises_on_unknown_event(caplog: pytest.LogCaptureFixture) -> None:
    pub = ForwardPublisher("/nonexistent.sock", NS)
    with caplog.at_level(logging.ERROR, logger="podshim.task.events"):
        pub.publish(task_pb2.TaskIO())
    assert pub.pending == 0
    assert "TaskIO" in caplog.text


def test_recording_and_null_publishers() -> None:
    async def main() -> None:
        rec = RecordingPublisher()
        pubs: list[Publisher] = [rec, NullPublisher(), ForwardPublisher("/x.sock", NS)]
        assert pubs
        ev = task_pb2.TaskExecAdded(container_id="c", exec_id="e")
        rec.publish(ev)
        ev.exec_id = "changed"
        rec.publish(task_pb2.TaskDelete(container_id="c"))
        assert rec.topics == ["/tasks/exec-added", "/tasks/delete"]
        assert rec.events[0][1] == task_pb2.TaskExecAdded(container_id="c", exec_id="e")
        with pytest.raises(TypeError):
            rec.publish(task_pb2.TaskIO())
        assert await rec.flush(0)
        await rec.close(0)
        rec.publish(task_pb2.TaskOOM(container_id="c"))
        assert len(rec.events) == 2
        null = NullPublisher()
        null.publish(ev)
        assert await null.flush(0)
        await null.close(0)

    run(main)


def test_publisher_from_env() -> None:
    assert isinstance(publisher_from_env(NS, {}), NullPublisher)
    pub = publisher_from_env(NS, {"TTRPC_ADDRESS": "/run/x/containerd.sock.ttrpc"}, maxlen=7)
    assert isinstance(pub, ForwardPublisher)
    assert (pub.address, pub.namespace, pub.maxlen) == ("/run/x/containerd.sock.ttrpc", NS, 7)
