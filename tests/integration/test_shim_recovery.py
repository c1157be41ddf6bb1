"""Recovery: containerd restarted under running podshim tasks, and a podshim daemon
killed with SIGKILL while its task runs (containerd's ``delete`` path must clean up).
"""

from __future__ import annotations

import functools
import os
import signal
from typing import TYPE_CHECKING

import pytest

from podshim_lab import Containerd, wait_for
from podshim_lab.procfs import descendants, read_stat

if TYPE_CHECKING:
    from tests.integration import shimio as si
    from tests.integration import shimutil as su
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import shimio as si
    import shimutil as su

pytestmark = pytest.mark.timeout(300)


# the fixture (shimutil): a fresh lab per test, so process and fd counts start clean
lab = su.fresh_lab


def others_below_lab(lab: Containerd) -> list[tuple[int, str]]:
    """Processes below the lab's subreaper other than containerd itself."""
    sub = lab.subreaper_pid
    assert sub is not None
    return [(s.pid, s.comm) for s in descendants(sub) if s.pid != lab.pid]


def test_containerd_restart_keeps_tasks_usable(lab: Containerd) -> None:
    members = ["rs1", "rs2"]
    with su.containers(lab) as ids:
        pids = {}
        for cid in members:
            ids.append(cid)
            pids[cid] = su.run_detached(lab, cid, "sleep", "1000", opts=su.group_opts("rg"))
        shim = su.the_shim(lab)
        shim_stat = read_stat(shim)
        assert shim_stat is not None
        old = lab.pid

        lab.restart()
        assert lab.pid != old

        for cid in members:
            su.wait_status(lab, cid, "RUNNING")
            assert su.task_pid(lab, cid) == pids[cid]
        assert su.alive(shim_stat) and list(su.shim_daemons(lab)) == [shim]
        for cid in members:
            res = lab.ctr("task", "exec", "--exec-id", "post", cid, "echo", cid, check=False)
            assert (res.returncode, res.stdout) == (0, f"{cid}\n"), (res, lab.log_tail(30))
        data = "after restart\n" * 100
        res = lab.ctr("task", "exec", "--exec-id", "cat", "rs1", "cat", input=data, check=False)
        assert (res.returncode, res.stdout) == (0, data), res

        # events still reach the restarted containerd; kill and delete work
        with si.event_stream(lab) as events:
            for cid in members:
                lab.ctr("task", "kill", "-s", "SIGKILL", cid)
                su.wait_status(lab, cid, "STOPPED")
                lab.ctr("task", "delete", cid)
                su.wait_status(lab, cid, None)
            wait_for(
                lambda: all(
                    any(e.topic == "/tasks/delete" for e in events.task_events(cid))
                    for cid in members
                ),
                timeout=su.DEADLINE,
                message=lambda: f"/tasks/delete of both in {events.lines[-10:]}",
            )
            for cid in members:
                topics = [e.topic for e in events.task_events(cid)]
                assert topics == ["/tasks/exit", "/tasks/delete"], (cid, topics)
                exit_ev = events.task_events(cid)[0].payload
                assert exit_ev.get("exit_status") == 137 and exit_ev["pid"] == pids[cid]

        su.wait_gone(shim, what="shim after its tasks were deleted")
        wait_for(
            lambda: not os.path.exists(su.socket_for(lab, "rg")),
            timeout=su.DEADLINE,
            message="shim socket removed",
        )
        assert su.runc_ids(lab) == set()


def not_running(lab: Containerd, cid: str) -> bool:
    return su.task_status(lab, cid) in (None, "STOPPED")


def ended_with_exit_and_delete(events: si.EventStream, cid: str) -> bool:
    return [e.topic for e in events.task_events(cid)][-2:] == ["/tasks/exit", "/tasks/delete"]


def not_mounted(lab: Containerd, path: str) -> bool:
    return path not in su.lab_mounts(lab)


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "group-of-2"])
def test_shim_killed_with_sigkill_is_cleaned_up(lab: Containerd, grouped: bool) -> None:
    members = ["k9", "k9b"] if grouped else ["k9"]
    opts = su.group_opts("kg") if grouped else []
    sock = su.socket_for(lab, "kg" if grouped else "k9")
    with su.containers(lab) as ids:
        pids = {}
        for cid in members:
            ids.append(cid)
            pids[cid] = su.run_detached(lab, cid, "sleep", "1000", opts=opts)
        shim = su.the_shim(lab)
        rootfs = {cid: str(su.bundle_dir(lab, cid) / "rootfs") for cid in members}
        for cid in members:
            assert su.shim_address(lab, cid) == "unix://" + sock
            assert rootfs[cid] in su.lab_mounts(lab)
            assert cid in su.runc_ids(lab)
        assert os.path.exists(sock)

        with si.event_stream(lab) as events:
            os.kill(shim, signal.SIGKILL)
            su.wait_gone(shim, what="killed shim")

            # containerd notices, runs the shim's delete action and forgets the tasks
            for cid in members:
                wait_for(
                    functools.partial(not_running, lab, cid),
                    timeout=su.DEADLINE,
                    message=functools.partial(lab.log_tail, 30),
                )
                if su.task_status(lab, cid) == "STOPPED":
                    lab.ctr("task", "delete", cid)
                su.wait_status(lab, cid, None)
            for cid in members:
                wait_for(
                    functools.partial(ended_with_exit_and_delete, events, cid),
                    timeout=su.DEADLINE,
                    message=f"exit+delete events of {cid}",
                )

        for cid in members:
            su.wait_gone(pids[cid], what=f"container init of {cid}")
            assert cid not in su.runc_ids(lab), su.runc_ids(lab)
            assert cid not in su.runc_state_dirs(lab)
            wait_for(
                functools.partial(not_mounted, lab, rootfs[cid]),
                timeout=su.DEADLINE,
                message=f"{rootfs[cid]} unmounted",
            )
            assert not [c for c in su.lab_cgroups(lab) if c.endswith(f"/{cid}")]
        wait_for(
            lambda: not os.path.exists(sock),
            timeout=su.DEADLINE,
            message=f"socket {sock} removed",
        )
        wait_for(
            lambda: others_below_lab(lab) == [],
            timeout=su.DEADLINE,
            message=lambda: f"no process left below the lab: {others_below_lab(lab)}",
        )
        # the container can be removed and its id used again with a new shim
        lab.ctr("container", "rm", members[0])
        res = su.run(lab, members[0], "echo", "again", opts=opts)
        assert (res.returncode, res.stdout) == (0, "again\n"), res
