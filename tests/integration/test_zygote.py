"""The zygote (on by default in pod scope; these labs set it explicitly): shims are forked
from one pre-warmed parent per containerd, which
reaps them as they exit (woken by their pidfds) and exits once it has had no child for
``PODSHIM_ZYGOTE_IDLE`` seconds, not sooner; a ``start`` that gave up on a stopped zygote
serves its socket alone, even after the zygote resumes."""

from __future__ import annotations

import contextlib
import os
import signal
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
#: how long `start` waits for the zygote's answer in the stopped-zygote test
TIMEOUT = 2.0


def _zygote_lab(**env: str) -> Iterator[Containerd]:
    lab = su.open_lab(extra_env={"PODSHIM_ZYGOTE": "1", "PODSHIM_ZYGOTE_IDLE": str(IDLE), **env})
    try:
        yield lab
    finally:
        su.close_lab(lab)


@pytest.fixture
def lab() -> Iterator[Containerd]:
    yield from _zygote_lab()


@pytest.fixture
def impatient_lab() -> Iterator[Containerd]:
    yield from _zygote_lab(PODSHIM_ZYGOTE_TIMEOUT=str(TIMEOUT))


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


def holders(lab: Containerd, link: str) -> list[int]:
    """The lab's processes with an fd on ``link`` (``socket:[inode]``)."""
    root = lab.subreaper_pid
    assert root is not None
    found = []
    for st in descendants(root):
        with contextlib.suppress(OSError):
            if link in su.fd_targets(st.pid):
                found.append(st.pid)
    return sorted(found)


@pytest.mark.timeout(300)
def test_a_stopped_zygote_never_doubles_a_shim(impatient_lab: Containerd) -> None:
    lab = impatient_lab
    with su.containers(lab) as ids:
        ids.append("s0")
        su.run_detached(lab, "s0", "sleep", "1000")  # starts the zygote
        (zygote,) = wait_for(lambda: by_comm(lab, "podshim-zygote") or None, timeout=su.DEADLINE)
        os.kill(zygote, signal.SIGSTOP)  # past start's timeout: it gives up and spawns a shim
        try:
            ids.append("s1")
            init = read_stat(su.run_detached(lab, "s1", "sleep", "1000"))
        finally:
            os.kill(zygote, signal.SIGCONT)  # the zygote finds the abandoned request
        assert init is not None
        shim = read_stat(init.ppid)
        assert shim is not None and shim.ppid != zygote, "forked although start gave up"
        link = os.readlink(f"/proc/{shim.pid}/fd/3")  # its listening socket
        assert link.startswith("socket:["), link
        ids.append("s2")  # served by the zygote, so it is past the abandoned request
        init2 = read_stat(su.run_detached(lab, "s2", "sleep", "1000"))
        assert init2 is not None
        shim2 = read_stat(init2.ppid)
        assert shim2 is not None and shim2.ppid == zygote
        # a daemon forked for the abandoned request exits at once, unserved (an idle
        # duplicate would stay a minute): well within 10 s, and for good
        wait_for(lambda: holders(lab, link) == [shim.pid], timeout=10.0,
                 message=lambda: f"only {shim.pid} on {link}: {holders(lab, link)}")  # fmt: skip
        for _ in range(20):
            assert holders(lab, link) == [shim.pid]
            time.sleep(0.1)
        assert su.task_status(lab, "s1") == "RUNNING"
