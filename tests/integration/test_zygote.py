"""The zygote (opt-in): shims are forked from one pre-warmed parent per containerd, which
reaps them as they exit (woken by their pidfds) and exits once it has had no child for
``PODSHIM_ZYGOTE_IDLE`` seconds, not sooner."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from podshim_lab import Containerd, wait_for
from podshim_lab.procfs import descendants, read_stat

if TYPE_CHECKING:
    from tests.integration import shimutil as su
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import shimutil as su

IDLE = 3.0


@pytest.fixture
def lab() -> Iterator[Containerd]:
    env = {"PODSHIM_ZYGOTE": "1", "PODSHIM_ZYGOTE_IDLE": str(IDLE)}
    lab = su.open_lab(extra_env=env)
    try:
        yield lab
    finally:
        su.close_lab(lab)


def by_comm(lab: Containerd, comm: str) -> list[int]:
    root = lab.subreaper_pid
    assert root is not None
    return [s.pid for s in descendants(root) if s.comm == comm and s.state != "Z"]


@pytest.mark.timeout(300)
def test_shims_are_forked_reaped_and_the_zygote_idles_out(lab: Containerd) -> None:
    with su.containers(lab) as ids:
        shim_of: dict[str, int] = {}
        for cid in ("z1", "z2"):
            ids.append(cid)
            init = read_stat(su.run_detached(lab, cid, "sleep", "1000"))
            assert init is not None
            shim_of[cid] = init.ppid  # each shim is its container init's subreaper
        (zygote,) = wait_for(lambda: by_comm(lab, "podshim-zygote") or None, timeout=su.DEADLINE)
        shims = by_comm(lab, "containerd-shim")
        assert sorted(shims) == sorted(shim_of.values()), (shims, shim_of)
        for pid in shims:  # forked by the zygote: its children until they exit
            st = read_stat(pid)
            assert st is not None and st.ppid == zygote, (st, zygote)
        su.remove_container(lab, "z1")
        su.wait_gone(shim_of["z1"], what="shim")  # gone *and reaped* (by the zygote)
        time.sleep(IDLE + 1)  # longer than IDLE with a child: the idle time starts later
        su.remove_container(lab, "z2")
        su.wait_gone(shim_of["z2"], what="shim")
        last_exit = time.monotonic()
        assert read_stat(zygote) is not None  # still there: it waits IDLE seconds first
        su.wait_gone(zygote, timeout=IDLE + su.DEADLINE, what="zygote")
        assert time.monotonic() - last_exit >= IDLE - 1.0
