"""podshim.tracing while off (needs no opentelemetry): the ``OTEL_*`` switch, the shared
no-op, and a fresh interpreter using the daemon's modules, a ttrpc call through our server
and every tracing entry point without importing any opentelemetry module."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from podshim import tracing

TASK = "containerd.task.v2.Task"
SRC = str(Path(__file__).resolve().parents[2] / "src")


# -- the switch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({}, None),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_EXPORTER": "otlp"}, None),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:1/t"}, "http://h:1/t"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318/"}, "http://h:4318/v1/traces"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/v1/traces",
            },
            "http://t:9/v1/traces",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h", "OTEL_TRACES_EXPORTER": "none"}, None),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h", "OTEL_TRACES_EXPORTER": "otlp"},
            "http://h/v1/traces",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h", "OTEL_TRACES_EXPORTER": "zipkin"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h", "OTEL_SDK_DISABLED": "TRUE"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, None),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            "http://h/v1/traces",
        ),
    ],
)
def test_wanted_reads_the_standard_environment(env: dict[str, str], endpoint: str | None) -> None:
    assert tracing.wanted(env) == endpoint


def test_off_is_a_shared_noop_usable_with_and_async_with() -> None:
    assert not tracing.enabled()
    assert tracing.init_from_env("x", env={}) is False
    s = tracing.span("a", tid="t")
    assert s is tracing.span("b") is tracing.rpc_span(TASK, "Create", b"", ())
    with s:
        tracing.set_attribute("k", "v")

    async def main() -> None:
        async with tracing.span("c"):
            pass

    asyncio.run(main())
    tracing.shutdown(0.1)  # harmless when off


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = SRC
    return env


def test_off_imports_no_opentelemetry_module(tmp_path: Path) -> None:
    """In a fresh interpreter with no OTEL_* variable: the daemon's modules, a ttrpc call
    through our server and every tracing entry point leave no opentelemetry module."""
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys
        from podshim import tracing
        import podshim.shim.daemon, podshim.pod.sandbox, podshim.task.container
        from podshim.api.task.v2 import shim_pb2
        from podshim.ttrpc.client import Client
        from podshim.ttrpc.server import Server
        from podshim.ttrpc.services import bind

        class Fake:
            async def Pids(self, req, ctx):
                tracing.set_attribute("k", "v")
                tracing.set_default_attribute("pod-id", "p")
                with tracing.span("inner", tid=req.id):
                    pass
                return shim_pb2.PidsResponse()

        async def main():
            server = Server([bind(shim_pb2.DESCRIPTOR.services_by_name["Task"], Fake(), partial=True)])
            await server.serve_path({str(tmp_path / "s.sock")!r})
            client = Client({str(tmp_path / "s.sock")!r})
            await client.call("{TASK}", "Pids", shim_pb2.PidsRequest(id="t"), shim_pb2.PidsResponse)
            async with tracing.span("x", root=True):
                pass
            await client.close()
            await server.shutdown(grace=0)

        on = tracing.init_from_env("podshim")
        asyncio.run(main())
        tracing.shutdown(1.0)
        print(json.dumps({{
            "on": on,
            "describe": tracing.describe(),
            "otel": sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"),
        }}))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"on": False, "describe": "off (opentelemetry not imported)", "otel": []}


def test_the_start_action_never_imports_tracing() -> None:
    script = (
        "import sys, podshim.shim.main, podshim.shim.start; "
        "print(sorted(m for m in sys.modules if 'tracing' in m or 'opentelemetry' in m))"
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
