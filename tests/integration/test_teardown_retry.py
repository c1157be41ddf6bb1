"""A pod whose teardown cannot finish is not reported gone, and is once it can finish.

podshim's sandbox Delete answers Unavailable while the pod host cannot be torn down (it
used to log and answer success, leaving the remains behind unrecorded). containerd 1.6's
CRI learns of the sandbox's exit from Wait and deletes the task in ``handleSandboxExit``;
a Delete error leaves the sandbox READY and puts the exit into its event backoff
(retried after 1, 2, 4 ... s), and StopPodSandbox/RemovePodSandbox wait for the
sandbox to stop until their deadline. Here a child cgroup in the pod's sandbox cgroup
keeps it busy: StopPodSandbox and RemovePodSandbox fail, containerd logs the shim's
error, the task and podshim's record of the pod stay; once the child cgroup is gone a
retried Delete finishes and a retried StopPodSandbox/RemovePodSandbox succeed, leaving
nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim_lab import wait_for
from podshim_lab.cri.client import CriError

if TYPE_CHECKING:
    from tests.integration import criutil as cu
else:
    import criutil as cu

cri_lab = cu.cri_lab
cri = cu.cri

#: how long the calls that must fail may wait (CRI waits for the sandbox to stop)
SHORT = 12.0


def containerd_said(lab: cu.CriLab, *parts: str) -> bool:
    """Whether one line of containerd's log holds every one of ``parts``."""
    text = lab.lab.paths.log.read_text(errors="replace")
    return any(all(p in line for p in parts) for line in text.splitlines())


def test_stop_and_remove_fail_while_teardown_is_busy_then_succeed(cri: cu.CriLab) -> None:
    pod_id, _ = cri.pod("teardown-busy", cu.PODSHIM)
    rec = cri.pods[pod_id]
    (pids,) = [d for d in cri.task_cgroup_dirs(rec, pod_id) if "/pids/" in d]
    busy = Path(pids) / "busy"
    busy.mkdir()
    try:
        for call in (cri.cri.stop_pod, cri.cri.remove_pod):
            with pytest.raises(CriError) as err:
                call(pod_id, timeout=SHORT)
            assert err.value.code == "DEADLINE_EXCEEDED", err.value
        # containerd got the shim's error for the sandbox's Delete, naming what is busy
        wait_for(
            lambda: containerd_said(cri, "failed to stop sandbox", "teardown not finished", pids),
            timeout=cu.DEADLINE,
            interval=0.2,
            message=lambda: f"containerd to log the Delete error\n{cri.lab.log_tail(40)}",
        )
        tasks = cri.lab.ctr("task", "ls", namespace=cu.CRI_NAMESPACE).stdout
        assert pod_id in tasks, tasks  # not deleted: Delete can be retried
        assert cri.cri.pod_status(pod_id).ready  # CRI has not seen it stop
        assert cri.pins(pod_id).is_dir()  # what is left stays recorded
        assert Path(pids).is_dir()
    finally:
        busy.rmdir()
    # kubelet retries; containerd's backoff retries the Delete, which now finishes
    cri.cri.stop_pod(pod_id, timeout=cu.DEADLINE * 2)
    cri.cri.remove_pod(pod_id)
    rec.removed = True
    cri.wait_gone(pod_id)
    assert pod_id not in cri.lab.ctr("task", "ls", namespace=cu.CRI_NAMESPACE).stdout
