"""podshim.tracing on (needs the ``otel`` extra): spans of ttrpc calls through our server
and of the sandbox's background waits (in-memory exporter), and export over OTLP/HTTP to a
receiver run by the test. The off state is in ``test_tracing_off.py``."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2

from podshim import errors as errdefs
from podshim import tracing
from podshim.api.task.v2 import shim_pb2
from podshim.linux.reaper import Reaper
from podshim.pod.sandbox import SandboxTask
from podshim.task.contract import ShimContext
from podshim.ttrpc.client import Client
from podshim.ttrpc.server import Server
from podshim.ttrpc.services import CallContext, bind
from tests.unit.fakes import RecordingPublisher

from .fakes import FakeHost

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="podshim[otel] not installed")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

TASK = "containerd.task.v2.Task"
SRC = str(Path(__file__).resolve().parents[2] / "src")


class FakeTasks:
    """A partial Task service whose handlers add spans and attributes of their own."""

    def __init__(self) -> None:
        self.released = asyncio.Event()

    async def Create(
        self, req: shim_pb2.CreateTaskRequest, ctx: CallContext
    ) -> shim_pb2.CreateTaskResponse:
        tracing.set_attribute("bundle", req.bundle)
        with tracing.span("inner", step="mount"):
            pass
        if req.id == "sandbox":
            tracing.set_default_attribute("pod-id", req.id)
        return shim_pb2.CreateTaskResponse(pid=10)

    async def Start(self, req: shim_pb2.StartRequest, ctx: CallContext) -> shim_pb2.StartResponse:
        return shim_pb2.StartResponse(pid=11)

    async def Kill(self, req: shim_pb2.KillRequest, ctx: CallContext) -> empty_pb2.Empty:
        raise errdefs.NotFound(f"task {req.id}: process already finished")

    async def State(self, req: shim_pb2.StateRequest, ctx: CallContext) -> shim_pb2.StateResponse:
        raise RuntimeError("handler bug")

    async def Wait(self, req: shim_pb2.WaitRequest, ctx: CallContext) -> shim_pb2.WaitResponse:
        await self.released.wait()
        return shim_pb2.WaitResponse(exit_status=3)

    async def Pids(self, req: shim_pb2.PidsRequest, ctx: CallContext) -> shim_pb2.PidsResponse:
        return shim_pb2.PidsResponse()


@asynccontextmanager
async def serving(tmp: Path) -> AsyncIterator[tuple[FakeTasks, Client]]:
    fake = FakeTasks()
    server = Server(
        [bind(shim_pb2.DESCRIPTOR.services_by_name["Task"], fake, partial=True)],
        interceptor=tracing.rpc_interceptor,
    )
    path = str(tmp / "s.sock")
    await server.serve_path(path)
    client = Client(path)
    try:
        yield fake, client
    finally:
        fake.released.set()
        await client.close()
        await server.shutdown(grace=0)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, every ended span kept in memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    tracing.init_with_processor(SimpleSpanProcessor(exporter), "podshim-test")
    try:
        yield exporter
    finally:
        tracing.shutdown(5.0)
        exporter.clear()


def by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for s in exporter.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


def attrs(s: ReadableSpan) -> dict[str, Any]:
    return dict(s.attributes or {})


# -- spans of ttrpc calls ---------------------------------------------------------------


def test_rpc_spans_carry_method_tid_eid_and_handler_attributes(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            await client.call(
                TASK,
                "Create",
                shim_pb2.CreateTaskRequest(id="c1", bundle="/b/c1"),
                shim_pb2.CreateTaskResponse,
            )
            await client.call(
                TASK, "Start", shim_pb2.StartRequest(id="c1", exec_id="e1"), shim_pb2.StartResponse
            )
            await client.call(TASK, "Pids", shim_pb2.PidsRequest(id="c1"), shim_pb2.PidsResponse)

    run(main)
    got = by_name(spans)
    (create,) = got["Create"]
    assert attrs(create) == {
        "rpc.system": "ttrpc",
        "rpc.service": TASK,
        "rpc.method": "Create",
        "tid": "c1",  # CreateTaskRequest has no exec_id: no eid
        "bundle": "/b/c1",
    }
    assert create.status.status_code is trace.StatusCode.UNSET
    assert create.kind is trace.SpanKind.INTERNAL
    (inner,) = got["inner"]
    assert attrs(inner) == {"step": "mount"}
    assert inner.parent is not None and create.context is not None
    assert inner.parent.span_id == create.context.span_id
    (start,) = got["Start"]
    assert (attrs(start)["tid"], attrs(start)["eid"]) == ("c1", "e1")
    (pids,) = got["Pids"]
    assert attrs(pids)["tid"] == "c1" and "eid" not in attrs(pids)
    # Each call is a trace of its own (no parent came with it).
    assert create.parent is None and start.parent is None
    assert create.resource.attributes["service.name"] == "podshim-test"


def test_error_reply_sets_error_status_and_records_the_exception(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            with pytest.raises(errdefs.NotFound):
                await client.call(TASK, "Kill", shim_pb2.KillRequest(id="gone"), empty_pb2.Empty)
            with pytest.raises(errdefs.Unknown):
                await client.call(
                    TASK, "State", shim_pb2.StateRequest(id="x"), shim_pb2.StateResponse
                )

    run(main)
    got = by_name(spans)
    (kill,) = got["Kill"]
    assert (attrs(kill)["tid"], attrs(kill)["eid"]) == ("gone", "")
    assert kill.status.status_code is trace.StatusCode.ERROR
    assert kill.status.description == "NotFound: task gone: process already finished"
    assert attrs(kill)["error.type"] == "podshim.errors.NotFound"
    (event,) = kill.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.type"] == "podshim.errors.NotFound"
    (state,) = got["State"]
    assert state.status.status_code is trace.StatusCode.ERROR
    assert attrs(state)["error.type"] == "builtins.RuntimeError"


def test_unimplemented_method_and_undecodable_payload_still_get_a_span(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            with pytest.raises(errdefs.NotImplemented):
                await client.call(TASK, "Stats", shim_pb2.StatsRequest(id="s"), empty_pb2.Empty)
            with pytest.raises(errdefs.Internal):
                await client.call_raw(TASK, "Start", b"\xff\xff\xff")
            with pytest.raises(errdefs.NotImplemented):
                await client.call_raw("no.Such", "Thing", b"")

    run(main)
    got = by_name(spans)
    assert attrs(got["Stats"][0])["tid"] == "s"
    assert got["Stats"][0].status.status_code is trace.StatusCode.ERROR
    assert "tid" not in attrs(got["Start"][0])  # not decodable: no ids, still a span
    assert got["Start"][0].status.status_code is trace.StatusCode.ERROR
    (other,) = got["no.Such/Thing"]  # not the Task service: named service/method
    assert (attrs(other)["rpc.service"], attrs(other)["rpc.method"]) == ("no.Such", "Thing")


def test_pod_id_reaches_every_later_span_and_the_current_one(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            await client.call(
                TASK, "Pids", shim_pb2.PidsRequest(id="before"), shim_pb2.PidsResponse
            )
            await client.call(
                TASK,
                "Create",
                shim_pb2.CreateTaskRequest(id="sandbox"),
                shim_pb2.CreateTaskResponse,
            )
            await client.call(TASK, "Pids", shim_pb2.PidsRequest(id="after"), shim_pb2.PidsResponse)

    run(main)
    got = by_name(spans)
    pod = {attrs(s)["tid"]: attrs(s).get("pod-id") for s in got["Pids"]}
    assert pod == {"before": None, "after": "sandbox"}
    assert attrs(got["Create"][0])["pod-id"] == "sandbox"


def test_a_traceparent_in_the_metadata_is_the_parent(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    trace_id, span_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"

    async def main() -> None:
        async with serving(tmp_path) as (_, client):
            await client.call(
                TASK,
                "Pids",
                shim_pb2.PidsRequest(id="p"),
                shim_pb2.PidsResponse,
                metadata=(("traceparent", f"00-{trace_id}-{span_id}-01"),),
            )

    run(main)
    (pids,) = spans.get_finished_spans()
    assert pids.parent is not None and pids.parent.is_remote
    assert pids.context is not None
    assert f"{pids.context.trace_id:032x}" == trace_id
    assert f"{pids.parent.span_id:016x}" == span_id


def test_waits_in_flight_end_their_span_when_answered(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (fake, client):
            wait = asyncio.create_task(
                client.call(
                    TASK, "Wait", shim_pb2.WaitRequest(id="w", exec_id="x"), shim_pb2.WaitResponse
                )
            )
            await client.call(TASK, "Pids", shim_pb2.PidsRequest(id="p"), shim_pb2.PidsResponse)
            assert [s.name for s in spans.get_finished_spans()] == ["Pids"]
            fake.released.set()
            assert (await wait).exit_status == 3

    run(main)
    (wait,) = by_name(spans)["Wait"]
    assert (attrs(wait)["tid"], attrs(wait)["eid"]) == ("w", "x")


# -- background spans -------------------------------------------------------------------


def test_root_span_starts_its_own_trace_linked_to_the_caller(
    spans: InMemorySpanExporter,
) -> None:
    async def background() -> None:
        async with tracing.span("container::waitExit", root=True, tid="c", eid=""):
            await asyncio.sleep(0)
            tracing.set_attribute("exit-status", 0)

    async def main() -> None:
        with tracing.span("Create", tid="c"):
            task = asyncio.get_running_loop().create_task(background())
        await task

    run(main)
    got = by_name(spans)
    (create,), (wait,) = got["Create"], got["container::waitExit"]
    assert wait.parent is None
    assert wait.context is not None and create.context is not None
    assert wait.context.trace_id != create.context.trace_id
    assert [link.context.span_id for link in wait.links] == [create.context.span_id]
    assert attrs(wait) == {"tid": "c", "eid": "", "exit-status": 0}


def test_cancelled_background_span_ends_without_error(spans: InMemorySpanExporter) -> None:
    async def main() -> None:
        async def forever() -> None:
            with tracing.span("podSandboxTask::waitHostExit", root=True, tid="s"):
                await asyncio.Event().wait()

        task = asyncio.get_running_loop().create_task(forever())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main)
    (s,) = spans.get_finished_spans()
    assert s.name == "podSandboxTask::waitHostExit"
    assert s.status.status_code is trace.StatusCode.UNSET
    assert s.end_time is not None


def test_sync_span_records_an_exception_and_reraises(spans: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError, match="bad"), tracing.span("sync", tid="t"):
        raise ValueError("bad")
    (s,) = spans.get_finished_spans()
    assert s.status.status_code is trace.StatusCode.ERROR
    assert s.status.description == "ValueError: bad"
    assert trace.get_current_span() is trace.INVALID_SPAN  # detached again


# -- export over OTLP/HTTP ----------------------------------------------------------------


class _Receiver(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        ok = self.path == "/v1/traces"
        if ok:
            with self.server.lock:
                self.server.bodies.append(body)
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def receiver() -> Iterator[_Receiver]:
    srv = _Receiver()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)


def test_init_from_env_exports_over_otlp_http_and_flushes_on_shutdown() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    with receiver() as srv:
        env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": srv.url, "OTEL_SERVICE_NAME": "shim-t"}
        try:
            assert tracing.init_from_env("ignored", env=env) is True
            assert tracing.describe() == f"on (OTLP/HTTP to {srv.url})"
            with tracing.span("Create", tid="c1"):
                pass
        finally:
            tracing.shutdown(30.0)  # the batch processor would wait 5 s: flush now
        assert not tracing.enabled()
        with srv.lock:
            bodies = list(srv.bodies)
    names: list[tuple[str, str, dict[str, str]]] = []
    for body in bodies:
        req = ExportTraceServiceRequest.FromString(body)
        for rs in req.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    names.append(
                        (
                            service["service.name"],
                            sp.name,
                            {a.key: a.value.string_value for a in sp.attributes},
                        )
                    )
    assert names == [("shim-t", "Create", {"tid": "c1"})]


def test_shutdown_is_bounded_when_the_collector_is_away() -> None:
    with receiver() as srv:
        url = srv.url  # a loopback port that nothing listens on once closed
    tracing.init_from_env("x", env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": url})
    with tracing.span("lost"):
        pass
    t0 = time.monotonic()
    tracing.shutdown(2.0)
    assert time.monotonic() - t0 < 15
    assert not tracing.enabled()


# -- the sandbox's background waits --------------------------------------------------------


def _sandbox(host: FakeHost) -> SandboxTask:
    async def kill_workloads(sig: int) -> None:
        pass

    ctx = ShimContext("k8s.io", Reaper(), RecordingPublisher())
    return SandboxTask(ctx, "pod1", "/b/pod1", host, 4242, kill_workloads)


def test_sandbox_waits_are_spans_with_tid_and_pod_id(spans: InMemorySpanExporter) -> None:
    async def main() -> None:
        host = FakeHost()
        await host.create()
        with tracing.span("Create", tid="pod1"):
            task = _sandbox(host)
            task.begin()
        await task.kill("", 9, False)  # the fake init exits: waitInitExit closes the task
        assert (await task.wait("")).status == 137
        await task.delete("")
        for _ in range(20):
            await asyncio.sleep(0)

    run(main)
    got = by_name(spans)
    (create,) = got["Create"]
    assert attrs(create) == {"tid": "pod1", "pod-id": "pod1"}  # known during its Create
    (init,) = got["podSandboxTask::waitInitExit"]
    assert attrs(init) == {"tid": "pod1", "pod-id": "pod1"}
    assert init.status.status_code is trace.StatusCode.UNSET
    (host,) = got["podSandboxTask::waitHostExit"]  # the host closed: the wait ended
    assert attrs(host) == {"tid": "pod1", "pod-id": "pod1"}
    assert create.context is not None
    for s in (init, host):
        assert s.parent is None
        assert [link.context.span_id for link in s.links] == [create.context.span_id]


def test_sandbox_host_death_ends_the_host_wait_span(spans: InMemorySpanExporter) -> None:
    async def main() -> None:
        host = FakeHost()
        await host.create()
        task = _sandbox(host)
        task.begin()
        host.die(137)
        assert (await task.wait("")).status == 1
        await task.delete("")
        for _ in range(20):
            await asyncio.sleep(0)

    run(main)
    got = by_name(spans)
    assert [attrs(s)["tid"] for s in got["podSandboxTask::waitHostExit"]] == ["pod1"]
    assert [attrs(s)["tid"] for s in got["podSandboxTask::waitInitExit"]] == ["pod1"]
