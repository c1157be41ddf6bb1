"""Two containerds on one host, same namespace, same container id: neither touches the
other's container (a failed Create once ran ``runc delete --force`` on the other's).

podshim keys its runtime root and pod state by containerd instance; with a runtime root
configured to be shared anyway, a Create that finds the id taken answers AlreadyExists
and touches nothing, and the ``delete`` containerd runs after the failure neither.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim import rundir

if TYPE_CHECKING:
    from tests.integration import shimutil as su
else:
    import shimutil as su

pytestmark = pytest.mark.timeout(300)


def test_same_namespace_and_id_on_two_containerds(tmp_path: Path) -> None:
    ns = su.unique_namespace()
    a = su.open_lab(namespace=ns)
    try:
        b = su.open_lab(namespace=ns)
        try:
            pid_a = su.run_detached(a, "c1", "sleep", "3600")
            # ctr gives both the cgroup /<ns>/c1: B's is moved, or B's `kill --all`
            # would reach A's process through the shared cgroup (runc.v2's too)
            pid_b = su.run_detached(b, "c1", "sleep", "3600", opts=["--cgroup", f"/{ns}-b/c1"])
            assert pid_a != pid_b
            root_a, root_b = rundir.runtime_root(a.address), rundir.runtime_root(b.address)
            assert root_a != root_b
            assert su.runc_state_dirs(a) == su.runc_state_dirs(b) == {"c1"}
            assert rundir.pods_dir(a.address) != rundir.pods_dir(b.address)

            # a runtime root shared on purpose (podshim's config), and B has no c1 of
            # its own any more: B's Create of c1 finds A's, is refused and touches nothing
            su.remove_container(b, "c1")
            shared = tmp_path / "podshim.toml"
            shared.write_text(f'runtime_root = "{root_a}"\n')
            fail = b.ctr(
                "run", "--rm", "--runtime", su.RUNTIME, "--runtime-config-path", str(shared),
                su.image(b), "c1", "sleep", "5", check=False, timeout=120,
            )  # fmt: skip
            assert fail.returncode != 0
            assert "already" in fail.stderr and "left alone" in fail.stderr, fail.stderr
            assert su.task_status(a, "c1") == "RUNNING"
            assert su.task_pid(a, "c1") == pid_a
            assert os.path.exists(f"/proc/{pid_a}")
            assert "c1" in su.runc_state_dirs(a)
        finally:
            # both containers first: close_lab checks the namespace's cgroups, shared
            su.remove_container(b, "c1")
            su.remove_container(a, "c1")
            su.close_lab(b)
            for h in su.cgroup_hierarchies():
                for d in (h / f"{ns}-b" / "c1", h / f"{ns}-b"):
                    if d.is_dir():
                        d.rmdir()
    finally:
        su.remove_container(a, "c1")
        su.close_lab(a)
