"""OpenTelemetry through a real containerd: spans reach an OTLP/HTTP receiver run by the
test when containerd's environment names one, and nothing is imported when it does not.

The receiver is an ``http.server`` on 127.0.0.1 accepting ``POST /v1/traces`` and decoding
``ExportTraceServiceRequest`` with opentelemetry-proto's generated classes. The shim is
``containerd-shim-podshim-v1`` from this venv (on containerd's PATH) and inherits
containerd's environment, which is how the ``OTEL_*`` variables reach it.
"""

from __future__ import annotations

import gzip
import http.server
import os
import re
import secrets
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from podshim.ttrpc.client import call_sync
from podshim_lab import Containerd, RuntimeHandler, wait_for

if TYPE_CHECKING:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    from tests.integration import criutil as cu
    from tests.integration import shimutil as su
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criutil as cu
    import shimutil as su

pytestmark = pytest.mark.timeout(300)


# -- an OTLP/HTTP receiver ----------------------------------------------------------------


@dataclass(frozen=True)
class GotSpan:
    service: str
    name: str
    attrs: dict[str, str]
    error: bool


def _text(v: AnyValue) -> str:
    """An attribute's value as text (``tid`` is a string, ``exit-status`` an int)."""
    which = v.WhichOneof("value")
    return "" if which is None else str(getattr(v, which))


class Receiver(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.spans: list[GotSpan] = []
        self.bad: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"

    def add(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        req = ExportTraceServiceRequest.FromString(body)
        got: list[GotSpan] = []
        for rs in req.resource_spans:
            res = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    got.append(
                        GotSpan(
                            res.get("service.name", ""),
                            sp.name,
                            {a.key: _text(a.value) for a in sp.attributes},
                            sp.status.code == sp.status.STATUS_CODE_ERROR,
                        )
                    )
        with self.lock:
            self.spans.extend(got)

    def of(self, service: str) -> list[GotSpan]:
        with self.lock:
            return [s for s in self.spans if s.service == service]


class Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            encoding = self.headers.get("Content-Encoding", "")
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            if self.path != "/v1/traces":
                raise ValueError(f"POST {self.path}")
            self.server.add(body)
        except Exception as exc:
            with self.server.lock:
                self.server.bad.append(repr(exc))
            self.send_response(400)
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def receiver() -> Iterator[Receiver]:
    srv = Receiver()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(30)


@contextmanager
def lab_with(env: dict[str, str]) -> Iterator[Containerd]:
    lab = su.open_lab(extra_env=env)
    try:
        yield lab
    finally:
        su.close_lab(lab)


def shim_serving_lines(lab: Containerd) -> list[str]:
    """podshim's startup lines (they reach containerd's log through the log FIFO)."""
    text = lab.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if "serving on" in line and "tracing:" in line]


# -- the tests -------------------------------------------------------------------------------


def test_spans_of_a_run_an_exec_and_a_kill_reach_the_collector() -> None:
    for mod in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http"):
        pytest.importorskip(mod, reason="podshim[otel] not installed")
    service = f"podshim-it-{secrets.token_hex(3)}"
    with receiver() as srv:
        env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": srv.url, "OTEL_SERVICE_NAME": service}
        with lab_with(env) as lab, su.containers(lab) as ids:
            res = su.run(lab, "t1", "true")
            assert res.returncode == 0, res

            ids.append("t2")
            su.run_detached(lab, "t2", "sleep", "1000")
            res = lab.ctr("task", "exec", "--exec-id", "e1", "t2", "true", check=False)
            assert res.returncode == 0, res
            lab.ctr("task", "kill", "-s", "SIGKILL", "t2")
            su.wait_status(lab, "t2", "STOPPED")
            lab.ctr("task", "delete", "t2")
            su.wait_status(lab, "t2", None)

            def key(s: GotSpan) -> tuple[str, str, str | None]:
                return (s.name, s.attrs.get("tid", ""), s.attrs.get("eid"))

            want = {
                ("Create", "t1", None),
                ("Start", "t1", ""),
                ("Wait", "t1", ""),
                ("Delete", "t1", ""),
                ("container::waitExit", "t1", ""),
                ("Create", "t2", None),
                ("Start", "t2", ""),
                ("Exec", "t2", "e1"),
                ("Start", "t2", "e1"),
                ("Wait", "t2", "e1"),
                ("Delete", "t2", "e1"),
                ("container::waitExit", "t2", "e1"),
                ("Kill", "t2", ""),
                ("Delete", "t2", ""),
                ("container::waitExit", "t2", ""),
            }
            # Spans leave the shim every 5 s or when it exits (after the last Delete).
            wait_for(
                lambda: want <= {key(s) for s in srv.of(service)},
                timeout=su.DEADLINE,
                interval=0.2,
                message=lambda: (
                    f"spans {sorted(want - {key(s) for s in srv.of(service)})} "
                    f"(got {sorted({key(s) for s in srv.of(service)})}; bad: {srv.bad})\n"
                    f"{lab.log_tail(20)}"
                ),
            )
            assert any(
                f"tracing: on (OTLP/HTTP to {srv.url})" in x for x in shim_serving_lines(lab)
            )
        got = srv.of(service)
        assert not srv.bad
    rpcs = [s for s in got if s.attrs.get("rpc.system") == "ttrpc"]
    assert {s.attrs["rpc.service"] for s in rpcs} == {"containerd.task.v2.Task"}
    assert all(s.attrs["rpc.method"] == s.name for s in rpcs)
    # Every call the test made succeeded, and so did its span.
    assert not [s for s in got if key(s) in want and s.error]
    exits = {
        (s.attrs["tid"], s.attrs["eid"]): s.attrs.get("exit-status")
        for s in got
        if s.name == "container::waitExit"
    }
    assert exits == {("t1", ""): "0", ("t2", "e1"): "0", ("t2", ""): "137"}
    # No pod here: no pod-id.
    assert not [s for s in got if "pod-id" in s.attrs]


@contextmanager
def cri_lab_with(env: dict[str, str], config_dir: Path) -> Iterator[cu.CriLab]:
    """``criutil.open_cri_lab`` with ``env`` added to containerd's environment."""
    config_dir.mkdir(parents=True, exist_ok=True)
    config = config_dir / "podshim.toml"
    lab = Containerd(
        cri=True,
        runtimes={cu.PODSHIM: RuntimeHandler(cu.PODSHIM_RUNTIME, {"ConfigPath": str(config)})},
        extra_path=[cu.BIN_DIR],
        extra_env=env,
    )
    runtime_root = lab.state / "podshim-runc"
    cu.podshim_config(config, runtime_root)
    crilab: cu.CriLab | None = None
    try:
        lab.start()
        lab.ensure_pause()
        crilab = cu.CriLab(lab, runtime_root, lab.ensure_busybox(namespace=cu.CRI_NAMESPACE))
        yield crilab
    finally:
        errors = cu.close_cri_lab(lab, crilab)
        assert not errors, "CRI lab teardown left things behind:\n" + "\n".join(errors)


def test_a_cri_pod_has_sandbox_wait_spans_and_pod_id(tmp_path: Path) -> None:
    for mod in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http"):
        pytest.importorskip(mod, reason="podshim[otel] not installed")
    if not any(Path(p).is_file() for p in ("/bin/busybox", "/usr/bin/busybox")):
        pytest.skip("busybox not installed (apt-get install busybox-static)")
    service = f"podshim-cri-{secrets.token_hex(3)}"
    with receiver() as srv:
        env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": srv.url, "OTEL_SERVICE_NAME": service}
        with cri_lab_with(env, tmp_path / "cfg") as cri:
            pod_id, _ = cri.pod("traced", cu.PODSHIM)
            cid = cri.container(pod_id, "sleeper", ["sleep", "1000"]).id
            assert not cri.cleanup([pod_id])  # stop and remove: the shim exits and flushes

            def names() -> set[tuple[str, str, str]]:
                return {
                    (s.name, s.attrs.get("tid", ""), s.attrs.get("pod-id", ""))
                    for s in srv.of(service)
                }

            want = {
                ("Create", pod_id, pod_id),  # pod-id known once the sandbox exists
                ("Start", pod_id, pod_id),
                ("podSandboxTask::waitInitExit", pod_id, pod_id),
                ("podSandboxTask::waitHostExit", pod_id, pod_id),
                ("Create", cid, pod_id),
                ("Start", cid, pod_id),
                ("container::waitExit", cid, pod_id),
                ("Kill", cid, pod_id),
                ("Delete", cid, pod_id),
                ("Delete", pod_id, pod_id),
            }
            wait_for(
                lambda: want <= names(),
                timeout=su.DEADLINE,
                interval=0.2,
                message=lambda: (
                    f"spans {sorted(want - names())} (got {sorted(names())}; bad: {srv.bad})"
                ),
            )
        assert not srv.bad
    waits = [s for s in srv.of(service) if s.name.startswith("podSandboxTask::")]
    assert not [s for s in waits if s.error], waits


def shim_modules(lab: Containerd, cid: str) -> list[str]:
    """The modules the shim serving ``cid`` has imported, asked through its diag service."""
    from podshim.api.diag.v1 import diag_pb2

    resp = call_sync(
        su.shim_address(lab, cid),
        "podshim.diag.v1.Diag",
        "Stacks",
        diag_pb2.StacksRequest(),
        diag_pb2.StacksResponse,
        timeout=30,
    )
    return list(resp.modules)


def test_modules_through_diag_follow_the_environment() -> None:
    """With OTEL_* unset the shim has no opentelemetry module at all; with it set it has
    (so the check can fail). Asked through the shim's diag service."""
    pytest.importorskip("opentelemetry.sdk.trace", reason="podshim[otel] not installed")
    if any(k.startswith("OTEL_") for k in os.environ):
        pytest.skip("OTEL_* set in this environment: containerd would pass it on")
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"}
    for extra, expect in (({}, False), (env, True)):
        with lab_with(extra) as lab, su.containers(lab) as ids:
            ids.append("mods")
            su.run_detached(lab, "mods", "sleep", "1000")
            mods = shim_modules(lab, "mods")
            assert "podshim.shim.daemon" in mods
            assert any(m.startswith("opentelemetry") for m in mods) is expect, (extra, mods)


def test_off_without_otel_environment_and_nothing_imported() -> None:
    if any(k.startswith("OTEL_") for k in os.environ):
        pytest.skip("OTEL_* set in this environment: containerd would pass it on")
    with lab_with({}) as lab:
        res = su.run(lab, "off1", "true")
        assert res.returncode == 0, res
        lines: list[str] = []

        def logged() -> bool:
            lines[:] = shim_serving_lines(lab)
            return bool(lines)

        wait_for(logged, timeout=su.DEADLINE, interval=0.2, message=lambda: lab.log_tail(30))
    assert lines and all(
        re.search(r"tracing: off \(opentelemetry not imported\)", x) for x in lines
    ), lines
