"""The ``delete`` action's short answer: a bundle the shim marked deleted (it left
nothing behind) gets its DeleteResponse without any cleanup, import or lookup; a mark
next to a crash report (panic.log) still takes the full path, which relays it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from podshim.api.task.v2 import shim_pb2 as pb
from podshim.oci import bundle as files

PROBE = """
import sys
from podshim.shim.main import main
code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("podshim",) and (
    m.startswith("podshim.host") or m.startswith("podshim.diag")))
sys.stderr.write("MODULES " + ",".join(heavy) + "\\n")
sys.exit(code)
"""


def run_delete(bundle: Path, run_dir: Path) -> subprocess.CompletedProcess[bytes]:
    argv = ["-namespace", "ns", "-id", "sb", "-address", "/run/x.sock", "-bundle", str(bundle)]
    return subprocess.run(
        [sys.executable, "-c", PROBE, *argv, "delete"],
        capture_output=True, check=False, env={"PODSHIM_RUN_DIR": str(run_dir), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def sandbox_bundle(tmp: Path) -> Path:
    b = tmp / "sb"
    b.mkdir()
    ann = {"io.kubernetes.cri.container-type": "sandbox"}
    (b / files.CONFIG).write_text(json.dumps({"annotations": ann}))
    (b / files.HOST_RECORD).write_text(json.dumps({"kind": "namespaces"}))
    (b / files.INIT_PID).write_text("4242")
    return b


def test_a_marked_bundle_is_answered_without_cleanup(tmp_path: Path) -> None:
    b = sandbox_bundle(tmp_path)
    (b / files.DELETED).write_text("4242 137\n")
    res = run_delete(b, tmp_path / "run")
    assert res.returncode == 0, res.stderr
    resp = pb.DeleteResponse.FromString(res.stdout)
    assert (resp.pid, resp.exit_status) == (4242, 137) and resp.exited_at.seconds > 0
    assert b"MODULES \n" in res.stderr  # no host kind, no registry: nothing looked up


def test_without_the_mark_the_host_cleanup_runs(tmp_path: Path) -> None:
    b = sandbox_bundle(tmp_path)
    res = run_delete(b, tmp_path / "run")
    assert res.returncode == 0, res.stderr
    assert b"podshim.host.registry" in res.stderr  # the crash cleanup was consulted
    assert pb.DeleteResponse.FromString(res.stdout).pid == 4242


def test_a_crash_report_next_to_the_mark_is_still_relayed(tmp_path: Path) -> None:
    b = sandbox_bundle(tmp_path)
    (b / files.DELETED).write_text("4242 137\n")
    (b / files.PANIC).write_text("Traceback: boom\n")
    res = run_delete(b, tmp_path / "run")
    assert b"boom" in res.stderr
