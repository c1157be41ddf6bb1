"""The built distributions for the tests that run podshim as a user installs it.

``scripts/test.sh`` runs ``scripts/check_wheel.sh`` first, which leaves the runtime wheel
and sdist (and the lab's wheel) in ``$PODSHIM_WHEEL_DIST``, the wheel's venv in
``$PODSHIM_WHEEL_VENV`` and the ``podshim[lab]`` venv in ``$PODSHIM_WHEEL_LAB_VENV``; a
test run alone builds them itself (one ``check_wheel.sh`` run per session).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = ("PODSHIM_WHEEL_DIST", "PODSHIM_WHEEL_VENV", "PODSHIM_WHEEL_LAB_VENV")


@dataclass(frozen=True)
class Built:
    dist: Path  # podshim-X.whl, podshim-X.tar.gz, podshim_lab-X.whl
    venv: Path  # the runtime wheel alone
    lab_venv: Path  # podshim[lab]

    @property
    def wheel(self) -> Path:
        wheels = sorted(self.dist.glob("podshim-*.whl"))
        assert len(wheels) == 1, wheels
        return wheels[0]


def _complete(paths: list[Path]) -> bool:
    dist, venv, lab = paths
    return (
        any(dist.glob("podshim-*.whl"))
        and (venv / "bin" / "containerd-shim-podshim-v1").exists()
        and (lab / "bin" / "podshim").exists()
    )


def built(factory: pytest.TempPathFactory) -> Built:
    """The distributions and venvs (from the environment, else built now)."""
    given = [Path(os.environ[v]) if os.environ.get(v) else None for v in ENV]
    if all(p is not None for p in given):
        paths = [p for p in given if p is not None]
        if _complete(paths):
            return Built(*paths)
    base = factory.getbasetemp() / "wheels"
    paths = [base / "dist", base / "venv", base / "lab-venv"]
    if not _complete(paths):
        env = {**os.environ, **{v: str(p) for v, p in zip(ENV, paths, strict=True)}}
        subprocess.run(["bash", str(REPO / "scripts" / "check_wheel.sh")], check=True, env=env)
    return Built(*paths)
