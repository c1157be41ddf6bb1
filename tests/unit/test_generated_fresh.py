"""The committed protobuf code in src/podshim/api matches what proto/ generates.

Regenerates everything with scripts/gen_protos.py into a temporary directory and
compares it file by file, so a .proto edited without rerunning the generator fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GEN_SCRIPT = ROOT / "scripts" / "gen_protos.py"
COMMITTED = ROOT / "src" / "podshim" / "api"


def _generated_files(base: Path) -> dict[str, Path]:
    """Relative path -> file for every .py/.pyi under base (caches excluded)."""
    return {
        p.relative_to(base).as_posix(): p
        for p in sorted(base.rglob("*"))
        if p.is_file() and p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"gen_protos.py failed:\n{proc.stdout}\n{proc.stderr}"

    fresh = _generated_files(tmp_path / "podshim" / "api")
    committed = _generated_files(COMMITTED)
    assert fresh, "generator produced no files"

    hint = "run `.venv/bin/python scripts/gen_protos.py` and commit the result"
    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    assert not missing, f"generated files missing from src/podshim/api: {missing}; {hint}"
    assert not extra, f"files in src/podshim/api that the generator does not produce: {extra}"

    stale = sorted(
        rel for rel, path in fresh.items() if path.read_bytes() != committed[rel].read_bytes()
    )
    assert not stale, f"stale generated files: {stale}; {hint}"
