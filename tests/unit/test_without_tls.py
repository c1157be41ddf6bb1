"""Serving processes keep OpenSSL out (asyncio would load it for nothing) unless
tracing may need it."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import json, sys
from podshim.shim.main import without_tls
kept_out = without_tls({env})
import asyncio  # imports ssl when it can
loop = asyncio.new_event_loop(); loop.close()  # and still works without it
print(json.dumps([kept_out, sys.modules.get("ssl") is not None, "_ssl" in sys.modules]))
"""


@pytest.mark.parametrize(
    ("env", "want"),
    [({}, [True, False, False]), ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://x"}, [False, True, True])],
)
def test_ssl_is_kept_out_unless_tracing_may_use_it(env: dict[str, str], want: list[bool]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(env=env)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(want).lower().replace("'", '"')
