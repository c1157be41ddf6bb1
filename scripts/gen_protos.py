"""Regenerate the Python code for every .proto under proto/.

Usage: python scripts/gen_protos.py [--out DIR]

The generated modules land in src/ (or DIR) next to their package path, e.g.
proto/podshim/api/task/v2/shim.proto -> src/podshim/api/task/v2/shim_pb2.py(+.pyi).
tests/unit/test_generated_fresh.py regenerates into a temporary directory and fails
when the committed code differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # dev-only dependency

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_DIR)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        *files,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    # Every directory holding generated code becomes a package.
    for rel in {Path(f).parent for f in files}:
        d = out / rel
        while d != out and d.is_relative_to(out / "podshim" / "api"):
            init = d / "__init__.py"
            if not init.exists():
                init.write_text("")
            d = d.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "src")
    ns = ap.parse_args(argv)
    generate(ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
