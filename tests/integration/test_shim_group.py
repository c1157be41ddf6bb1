"""Grouping (``io.containerd.podshim.v1.group``): one shim process for many containers,
exiting only after the last is deleted; and a leak loop of 50 containers through one
long-lived shim, after which nothing of theirs is left (fds, mounts, sockets, runc state,
cgroups, processes).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from podshim_lab import Containerd, WaitTimeout, wait_for
from podshim_lab.procfs import descendants, read_stat, without_zygotes

if TYPE_CHECKING:
    from tests.integration import shimutil as su
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import shimutil as su


# the fixture (shimutil): a fresh lab per test, so process and fd counts start clean
lab = su.fresh_lab


@pytest.mark.timeout(300)
def test_grouped_containers_share_one_shim_until_the_last_is_deleted(lab: Containerd) -> None:
    members = ["ga", "gb", "gc"]
    with su.containers(lab) as ids:
        pids: dict[str, int] = {}
        for cid in members:
            ids.append(cid)
            pids[cid] = su.run_detached(lab, cid, "sleep", "1000", opts=su.group_opts("g1"))

        address = "unix://" + su.socket_for(lab, "g1")
        assert {cid: su.shim_address(lab, cid) for cid in members} == dict.fromkeys(
            members, address
        )
        daemons = su.shim_daemons(lab)
        assert len(daemons) == 1, daemons
        shim = next(iter(daemons))
        shim_stat = read_stat(shim)
        assert shim_stat is not None
        # every container init hangs below that one shim (it is their subreaper)
        for cid, pid in pids.items():
            st = read_stat(pid)
            assert st is not None and st.ppid == shim, (cid, st, shim)

        for n, cid in enumerate(members):
            lab.ctr("task", "kill", "-s", "SIGKILL", cid)
            su.wait_status(lab, cid, "STOPPED")
            lab.ctr("task", "delete", cid)
            su.wait_status(lab, cid, None)
            lab.ctr("container", "rm", cid)
            rest = members[n + 1 :]
            if not rest:
                break
            # still the same single shim, still serving the others
            for other in rest:
                assert su.task_status(lab, other) == "RUNNING"
                res = lab.ctr(
                    "task", "exec", "--exec-id", f"after-{cid}", other, "echo", "ok", check=False
                )
                assert (res.returncode, res.stdout) == (0, "ok\n"), res
            assert su.alive(shim_stat), f"shim exited with {rest} still held"
            assert list(su.shim_daemons(lab)) == [shim]
            assert os.path.exists(su.socket_for(lab, "g1"))

        su.wait_gone(shim, what="group shim after its last task was deleted")
        wait_for(
            lambda: not os.path.exists(su.socket_for(lab, "g1")),
            timeout=su.DEADLINE,
            message="group socket removed",
        )
        assert su.shim_daemons(lab) == {}


@pytest.mark.timeout(300)
def test_concurrent_starts_in_one_group_share_one_shim(lab: Containerd) -> None:
    """Six ``ctr run -d`` of one group at the same time still make exactly one shim."""
    members = [f"cc{i}" for i in range(6)]
    with su.containers(lab) as ids:
        ids.extend(members)
        procs = [
            subprocess.Popen(
                su.ctr_argv(
                    lab, "run", "-d", "--runtime", su.RUNTIME, *su.group_opts("gcc"),
                    su.image(lab), cid, "sleep", "1000",
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for cid in members
        ]  # fmt: skip
        for p in procs:
            out, err = p.communicate(timeout=su.DEADLINE)
            assert p.returncode == 0, (out, err)
        for cid in members:
            su.wait_status(lab, cid, "RUNNING")
        daemons = su.shim_daemons(lab)
        assert len(daemons) == 1, daemons
        shim = next(iter(daemons))
        for cid in members:
            st = read_stat(su.task_pid(lab, cid))
            assert st is not None and st.ppid == shim, (cid, st, shim)


# -- leak loop ---------------------------------------------------------------------------

_INODE = re.compile(r"\[\d+\]")
LOOP = 50
EXEC_LOOP = 10


@dataclass(frozen=True)
class Snapshot:
    """Everything a finished container could leave behind, seen from outside."""

    fds: tuple[str, ...]  # shim fd targets, inode numbers blanked
    mounts: tuple[str, ...]
    sockets: tuple[str, ...]
    runc_dirs: tuple[str, ...]
    runc_ids: tuple[str, ...]
    cgroups: tuple[str, ...]
    processes: tuple[tuple[int, str], ...]

    def diff(self, other: Snapshot) -> str:
        lines = []
        for name in self.__dataclass_fields__:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                gone = sorted(set(a) - set(b))
                new = sorted(set(b) - set(a))
                lines.append(f"{name}: {len(a)} -> {len(b)}; removed {gone}; added {new}")
        return "\n".join(lines)


def snapshot(lab: Containerd, shim: int, group_ids: list[str]) -> Snapshot:
    fds = tuple(sorted(_INODE.sub("[]", t) for t in su.fd_targets(shim)))
    sockets = tuple(sorted(p for g in group_ids if os.path.exists(p := su.socket_for(lab, g))))
    sub = lab.subreaper_pid
    assert sub is not None
    procs = tuple(sorted((s.pid, s.comm) for s in descendants(sub) if s.pid != lab.pid))
    return Snapshot(
        fds=fds,
        mounts=tuple(su.lab_mounts(lab)),
        sockets=sockets,
        runc_dirs=tuple(sorted(su.runc_state_dirs(lab))),
        runc_ids=tuple(sorted(su.runc_ids(lab))),
        cgroups=tuple(sorted(su.lab_cgroups(lab))),
        processes=procs,
    )


def settled(lab: Containerd, shim: int, long_pid: int) -> bool:
    """Only the shim and the long-lived container's init run below the lab (and the
    zygote that forked the shim)."""
    sub = lab.subreaper_pid
    assert sub is not None
    others = {s.pid for s in without_zygotes(descendants(sub))} - {lab.pid, shim, long_pid}
    return not others


@pytest.mark.timeout(420)
def test_leak_loop_50_grouped_containers(lab: Containerd) -> None:
    names = [f"n{i}" for i in range(LOOP)]
    groups = ["g2", "long", "warm", *names]  # every socket podshim could make for them
    with su.containers(lab) as ids:
        ids.append("long")
        long_pid = su.run_detached(lab, "long", "sleep", "100000", opts=su.group_opts("g2"))
        shim = su.the_shim(lab)
        shim_stat = read_stat(shim)
        assert shim_stat is not None
        # one warm-up run, so one-time lazy allocations are not mistaken for leaks
        res = su.run(lab, "warm", "true", opts=su.group_opts("g2"))
        assert res.returncode == 0, res
        wait_for(lambda: settled(lab, shim, long_pid), timeout=su.DEADLINE, message="quiet")
        before = snapshot(lab, shim, groups)
        assert before.sockets == (su.socket_for(lab, "g2"),), before.sockets
        assert before.runc_ids == ("long",), before.runc_ids
        assert {c.split("/")[-1] for c in before.cgroups} == {"long"}, before.cgroups

        started = time.monotonic()
        data = "".join(f"stdin line {i}\n" for i in range(200))
        for i in range(EXEC_LOOP):  # execs into the long-lived container: no leak either
            res = lab.ctr("task", "exec", "--exec-id", f"c{i}", "long", "cat", input=data)
            assert res.stdout == data
            res = lab.ctr(
                "task", "exec", "--exec-id", f"s{i}", "long", "sh", "-c", "exit 2", check=False
            )
            assert res.returncode == 2, res
            res = lab.ctr("task", "exec", "--exec-id", f"m{i}", "long", "nosuchbinary", check=False)
            assert res.returncode != 0 and "nosuchbinary" in res.stderr, res
        for cid in names:
            res = su.run(lab, cid, "true", opts=su.group_opts("g2"))
            assert res.returncode == 0, (cid, res, lab.log_tail(20))
            assert su.alive(shim_stat), f"group shim died during {cid}"
        elapsed = time.monotonic() - started

        last: list[Snapshot] = []

        def same() -> bool:
            now = snapshot(lab, shim, groups)
            last[:] = [now]
            return now == before

        try:
            wait_for(same, timeout=60, interval=0.2)
        except WaitTimeout:
            pytest.fail(
                f"after {LOOP} containers and {3 * EXEC_LOOP} execs ({elapsed:.0f}s) "
                "the group shim's traces differ:\n" + before.diff(last[0]) + f"\n{lab.log_tail(30)}"
            )
        assert su.fd_count(shim) == len(before.fds)
        assert su.task_status(lab, "long") == "RUNNING"
        res = lab.ctr("task", "exec", "--exec-id", "end", "long", "echo", "alive", check=False)
        assert (res.returncode, res.stdout) == (0, "alive\n"), res
