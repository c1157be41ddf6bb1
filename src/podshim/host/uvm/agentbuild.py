"""Building the guest agent: a static C program (``agent/*.c``), the utility VM's /init.

The image builder (``podshim uvm prepare``) puts :func:`build_agent`'s binary into the
initramfs; tests build it into a temporary directory and run it with ``--listen``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from podshim import __version__
from podshim import errors as errdefs

#: the directory of the agent's C sources (package data)
AGENT_DIR = Path(__file__).resolve().parent / "agent"
#: the compiler's flags: a static, stripped binary (it runs as PID 1 of an initramfs
#: holding nothing else it could link against)
CFLAGS = ("-static", "-pthread", "-O2", "-s", "-Wall", "-Wextra", "-Wno-unused-parameter")


def agent_sources() -> list[Path]:
    """The agent's C sources and headers, sorted (the image manifest hashes them)."""
    files = sorted(p for p in AGENT_DIR.iterdir() if p.suffix in (".c", ".h"))
    if not any(p.name == "agent.c" for p in files):
        raise errdefs.FailedPrecondition(f"guest agent sources missing from {AGENT_DIR}")
    return files


def build_agent(out: str, *, cc: str = "gcc") -> str:
    """Compile the agent into ``out`` (nothing to do when ``out`` is newer than every
    source); return ``out``.

    Raises:
        FailedPrecondition: no compiler ``cc``.
        Internal: the compiler failed (its message is in the error).
    """
    sources = agent_sources()
    try:
        built = os.stat(out).st_mtime_ns
    except FileNotFoundError:
        built = -1
    if built > max(p.stat().st_mtime_ns for p in sources):
        return out
    compiler = shutil.which(cc)
    if compiler is None:
        raise errdefs.FailedPrecondition(
            f"building the guest agent needs a C compiler: {cc} not found (install gcc and "
            "libc6-dev)"
        )
    tmp = f"{out}.tmp{os.getpid()}"
    cmd = [
        compiler,
        *CFLAGS,
        f'-DAGENT_VERSION="{__version__}"',
        "-o",
        tmp,
        *(str(p) for p in sources if p.suffix == ".c"),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise errdefs.Internal(
                f"building the guest agent failed ({cc} exit {proc.returncode}): "
                f"{proc.stderr.strip()[-4000:]}"
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
