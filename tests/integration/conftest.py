"""Fixtures for integration tests against a private, real containerd (``podshim_lab``).

Every test below this directory is marked ``integration`` and skipped (with the
reason) unless we are root and containerd, ctr and runc are installed.  Each
fixture closes its instance in a ``finally`` and then asserts that nothing of it
is left: no process, mount, dir, bridge, shim socket or runc state.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from podshim_lab import Containerd

if TYPE_CHECKING:
    from tests.integration.matrix import matrix_version
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    from matrix import matrix_version

HERE = Path(__file__).resolve().parent
REQUIRED_BINARIES = ("containerd", "ctr", "runc")


def missing_requirements() -> str | None:
    """Why the integration tests cannot run here, or ``None`` if they can."""
    if os.geteuid() != 0:
        return "integration tests need root (containerd, runc, mounts)"
    missing = [name for name in REQUIRED_BINARIES if shutil.which(name) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install containerd runc)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark (and, if needed, skip) every test collected below this directory."""
    reason = missing_requirements()
    for item in items:
        if HERE not in item.path.resolve().parents:
            continue
        item.add_marker(pytest.mark.integration)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def finish(labs: list[Containerd]) -> None:
    """Close every instance (even if one fails), then assert nothing was left."""
    errors: list[str] = []
    for lab in labs:
        try:
            lab.close()
        except Exception as exc:  # report all of them, not just the first
            errors.append(f"close() failed: {exc}")
        errors += [f"{lab.paths.token}: {what}" for what in lab.leftovers()]
    assert not errors, "lab teardown left things behind:\n" + "\n".join(errors)


@pytest.fixture
def containerd_factory() -> Iterator[Callable[..., Containerd]]:
    """``make(**kwargs)`` starts a :class:`Containerd`; all are torn down afterwards."""
    labs: list[Containerd] = []

    def make(**kwargs: Any) -> Containerd:
        kwargs.setdefault("version", matrix_version())
        lab = Containerd(**kwargs)
        labs.append(lab)
        return lab.start()

    try:
        yield make
    finally:
        finish(labs)


def _lab(
    prepare: Callable[[Containerd], object] | None = None, **kwargs: Any
) -> Iterator[Containerd]:
    kwargs.setdefault("version", matrix_version())
    lab = Containerd(**kwargs)
    try:
        lab.start()
        if prepare is not None:
            prepare(lab)
        yield lab
    finally:
        finish([lab])


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    """A fresh private containerd (no CRI) for one test."""
    yield from _lab()


@pytest.fixture(scope="module")
def containerd_shared() -> Iterator[Containerd]:
    """One private containerd (no CRI) shared by a whole test module."""
    yield from _lab()


@pytest.fixture
def containerd_cri() -> Iterator[Containerd]:
    """A private containerd with CRI; its pause image is imported into ``k8s.io``."""
    yield from _lab(Containerd.ensure_pause, cri=True)


def _need_busybox() -> None:
    if not any(Path(p).is_file() for p in ("/bin/busybox", "/usr/bin/busybox")):
        pytest.skip("busybox not installed (apt-get install busybox-static)")


@pytest.fixture
def busybox(containerd: Containerd) -> str:
    """Ref of the busybox image, imported into ``containerd``'s namespace."""
    _need_busybox()
    return containerd.ensure_busybox()
