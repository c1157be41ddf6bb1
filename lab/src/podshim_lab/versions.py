"""Which containerd a lab instance runs: the system package (1.6 on Debian 12) or a
newer build unpacked by ``scripts/fetch_containerd.sh`` (1.7, 2.1), never installed.

A :class:`ContainerdBuild` names the directory holding ``containerd``, ``ctr`` and
``containerd-shim-runc-v2`` of one package (``None``: the ones on PATH) and the
``config.toml`` dialect it reads (``version = 2`` up to 1.7, ``version = 3`` from 2.0).
The integration tests choose one with the environment variable :data:`ENV_VERSION`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE_DIR",
    "DEFAULT_VERSION",
    "ENV_CACHE",
    "ENV_VERSION",
    "VERSIONS",
    "ContainerdBuild",
    "resolve",
]

#: the test matrix selector, e.g. ``PODSHIM_CONTAINERD=2.1``
ENV_VERSION = "PODSHIM_CONTAINERD"
#: where ``scripts/fetch_containerd.sh`` unpacks (same variable, same default there)
ENV_CACHE = "PODSHIM_CONTAINERD_CACHE"
CACHE_DIR = "/var/cache/podshim-containerd"
DEFAULT_VERSION = "1.6"
#: short version -> config dialect; 1.6 is the system package
VERSIONS = {"1.6": 2, "1.7": 2, "2.1": 3}


@dataclass(frozen=True)
class ContainerdBuild:
    """One containerd build: its binaries' directory (``None``: PATH) and dialect."""

    version: str
    bin_dir: Path | None
    config_version: int

    def binary(self, name: str) -> str:
        """The path (or, for the system build, the bare name) of one of its binaries."""
        return name if self.bin_dir is None else str(self.bin_dir / name)

    def missing(self) -> str | None:
        """Why this build cannot run here, or ``None``."""
        if self.bin_dir is None:
            return None
        for name in ("containerd", "ctr", "containerd-shim-runc-v2"):
            if not os.access(self.bin_dir / name, os.X_OK):
                return f"containerd {self.version}: no {self.bin_dir / name} (scripts/fetch_containerd.sh)"
        return None


def cache_dir() -> Path:
    """Where the unpacked builds live."""
    return Path(os.environ.get(ENV_CACHE) or CACHE_DIR)


def resolve(version: str | None = None, binary_dir: Path | str | None = None) -> ContainerdBuild:
    """The build for ``version`` (default: ``$PODSHIM_CONTAINERD``, else 1.6).

    ``binary_dir`` overrides where the binaries are (the dialect still follows
    ``version``: any 2.x reads ``version = 3``).
    """
    name = version or os.environ.get(ENV_VERSION) or DEFAULT_VERSION
    major = name.split(".", 1)[0]
    if name not in VERSIONS and major not in ("1", "2"):
        raise ValueError(f"unknown containerd version {name!r} (known: {', '.join(VERSIONS)})")
    dialect = VERSIONS.get(name, 3 if major == "2" else 2)
    if binary_dir is not None:
        return ContainerdBuild(name, Path(binary_dir), dialect)
    if name == DEFAULT_VERSION:
        return ContainerdBuild(name, None, dialect)
    if name not in VERSIONS:
        raise ValueError(f"containerd {name}: give binary_dir (known: {', '.join(VERSIONS)})")
    return ContainerdBuild(name, cache_dir() / name / "usr" / "bin", dialect)
