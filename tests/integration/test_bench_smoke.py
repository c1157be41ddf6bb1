"""Smoke test of ``bench/pod_lifecycle.py`` with tiny parameters (about a minute).

Runs the script as a user would (runc, podshim pod scope and the do-nothing shim, both
networks, 2 sequential pods, 2 at once, PSS at 1 and 2 pods, JSON and a plot) and checks
that every figure is there and plausible, and that the memory attribution found each
runtime's own processes: a runc.v2 pod is a shim and a pause process, the do-nothing
shim in node scope is one daemon for every pod. The ``node`` column is left out here:
podshim's node scope is still being built.

Then the same, quicker, on containerd 2.1 (``--containerd 2.1``, the build
``scripts/fetch_containerd.sh`` unpacks) with the Sandbox API columns: ``sb`` (a shim per
pod) and ``proxy`` (the bench's own ``podshim daemon``: one process for every pod).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.integration import matrix
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import matrix

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "pod_lifecycle.py"
COLUMNS = ("runc", "pod", "null")
STEPS = ("run_pod", "create_start", "pod_up", "exec_sync", "stop_remove")


@pytest.mark.timeout(400)
def test_bench_runs_and_reports_every_figure(tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    argv = [sys.executable, str(SCRIPT), "--runtimes", ",".join(COLUMNS), "--pods", "2"]
    argv += ["--bursts", "2", "--pss-counts", "1,2", "--json", "--plot", str(png)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=380, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    doc = json.loads(res.stdout)
    assert doc["meta"]["errors"] == {}
    assert doc["meta"]["columns"] == list(COLUMNS)
    summary = doc["summary"]
    assert sorted(summary) == ["host", "pod"]
    for net, s in summary.items():
        for step in STEPS:
            for c in COLUMNS:
                p50, p90 = s["steps"][step][c]["p50"], s["steps"][step][c]["p90"]
                assert 0 < p50 <= p90 < 60_000, (net, step, c, p50, p90)
                assert len(s["samples"][c][step]) == 2
        for c in COLUMNS:
            assert 0 < s["bursts"]["2"][c]["wall_s"] < 60
        for c in ("pod", "null"):
            assert doc["ratios_to_runc"][net][c]["steps"]["pod_up"]["p50"] > 0
    pss = doc["runs"][0]["pod"]["pss"]
    assert summary["host"]["pss_mb_per_pod"] == {}  # PSS on the pod network only
    for c in COLUMNS:
        for n in ("1", "2"):
            assert 0.5 < pss[c][n]["mb_per_pod"] < 200, (c, n, pss[c][n])
    assert pss["runc"]["2"]["processes"] == 4, pss["runc"]["2"]  # 2 shims, 2 pauses
    assert pss["null"]["2"]["processes"] == 1, pss["null"]["2"]  # one daemon
    assert pss["pod"]["2"]["processes"] >= 2, pss["pod"]["2"]  # a shim per pod at least
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


V2_COLUMNS = ("runc", "pod", "sb", "proxy")


def test_sandbox_api_columns_need_containerd_2() -> None:
    argv = [sys.executable, str(SCRIPT), "--runtimes", "runc,proxy"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2, res.stderr
    assert "proxy: containerd 2.x only" in res.stderr


@pytest.mark.timeout(400)
def test_bench_on_containerd_2_with_sandbox_api_columns() -> None:
    matrix.require("2.1")
    argv = [sys.executable, str(SCRIPT), "--containerd", "2.1", "--runtimes"]
    argv += [",".join(V2_COLUMNS), "--networks", "pod", "--pods", "2", "--bursts", ""]
    argv += ["--pss-counts", "1,2", "--json"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=380, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    doc = json.loads(res.stdout)
    assert doc["meta"]["errors"] == {}
    assert doc["meta"]["containerd"].startswith("2.1."), doc["meta"]["containerd"]
    steps = doc["summary"]["pod"]["steps"]
    for step in STEPS:
        for c in V2_COLUMNS:
            p50, p90 = steps[step][c]["p50"], steps[step][c]["p90"]
            assert 0 < p50 <= p90 < 60_000, (step, c, p50, p90)
    for c in ("pod", "sb", "proxy"):
        assert doc["ratios_to_runc"]["pod"][c]["steps"]["run_pod"]["p50"] > 0
    pss = doc["runs"][0]["pod"]["pss"]
    for c in V2_COLUMNS:
        for n in ("1", "2"):
            assert 0.5 < pss[c][n]["mb_per_pod"] < 200, (c, n, pss[c][n])
    assert pss["sb"]["2"]["kinds"].get("containerd-shim", 0) >= 2, pss["sb"]["2"]  # a shim each
    assert pss["proxy"]["2"]["processes"] == 1, pss["proxy"]["2"]  # the daemon, nothing per pod
