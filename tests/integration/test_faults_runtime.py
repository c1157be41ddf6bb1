"""Fault matrix: the OCI runtime failing, podshim's state directory full, the PID init killed.

* runc fails each verb in turn (a :class:`~podshim_lab.gates.RuncGate` named as podshim's
  runtime): the CRI call that needs it returns an error carrying the runtime's message,
  the rest of the pod runs on, and once the runtime works again the same call succeeds;
* podshim's run directory (a small tmpfs: namespace pins, runtime state, sockets, the
  diag registry) is full: every call returns within its deadline (no hang), a new pod is
  refused with ENOSPC, a pod that was running keeps running, and once space is back new
  pods and containers run;
* the PID-namespace init of a shared-PID pod is SIGKILLed: every container is reported
  exited and the sandbox NOTREADY.

Each test ends with every pod removed and nothing of them left (``faultlab``'s census).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from podshim_lab import wait_for
from podshim_lab.cri.client import CriError, resources
from podshim_lab.procfs import descendants

if TYPE_CHECKING:
    from tests.integration import faultlab as fl
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import faultlab as fl

pytestmark = pytest.mark.timeout(300)

fault_lab_module = fl.fault_lab_module
fault_lab = fl.fault_lab

GATE_MESSAGE = "fails on purpose"
MIB = 1 << 20


def _error_of(call: Callable[[], object]) -> CriError:
    try:
        call()
    except CriError as exc:
        return exc
    raise AssertionError("the call succeeded although the runtime failed")


@pytest.mark.parametrize("verb", ["create", "start", "exec", "kill", "delete", "update"])
def test_runtime_failing_one_verb(fault_lab: fl.FaultLab, verb: str) -> None:
    flab = fault_lab
    pod, config = flab.pod(f"fail-{verb}", shared_pid=True)
    bystander = flab.container(pod, config, "bystander")
    if verb in ("create", "start"):
        victim = flab.create(pod, config, "victim")
        flab.runc.fail(verb, victim)
        err = _error_of(lambda: flab.cri.start_container(victim))
        flab.runc.clear()
        assert flab.container(pod, config, "second").state == "RUNNING"
    elif verb == "exec":
        flab.runc.fail("exec", bystander.id)
        err = _error_of(lambda: flab.cri.exec_sync(bystander.id, ["true"], timeout=30))
        flab.runc.clear()
        assert flab.cri.exec_sync(bystander.id, ["echo", "ok"], timeout=30).stdout == "ok\n"
    elif verb == "kill":
        victim = flab.container(pod, config, "victim").id
        flab.runc.fail("kill", victim)
        err = _error_of(lambda: flab.cri.stop_container(victim, grace=0))
        assert flab.cri.container_status(victim).state == "RUNNING"
        flab.runc.clear()
        flab.cri.stop_container(victim, grace=0)
        assert flab.wait_container(victim, "EXITED").exit_code == 137
    elif verb == "delete":
        victim = flab.container(pod, config, "victim").id
        flab.runc.fail("delete", victim)
        offset = flab.log_offset()
        stop = fl.in_thread(lambda: flab.cri.stop_container(victim, grace=0))
        wait_for(lambda: flab.runc.failures("delete"), timeout=fl.DEADLINE, message="delete")
        err = CriError("Delete", "UNKNOWN", flab.log_since(offset))  # CRI logs it and retries
        flab.runc.clear()
        assert fl.outcome(stop) == "ok"  # CRI's retry of the Delete went through
        assert flab.wait_container(victim, "EXITED").exit_code == 137
        flab.cri.remove_container(victim)
    else:
        flab.runc.fail("update", bystander.id)
        res = resources(memory_limit=64 * MIB)
        err = _error_of(lambda: flab.cri.update_resources(bystander.id, res))
        flab.runc.clear()
        flab.cri.update_resources(bystander.id, res)
    print(f"runc {verb} failing: {err}", file=sys.stderr)
    assert GATE_MESSAGE in str(err), f"the runtime's message did not reach CRI: {err}"
    # the failure stayed with the call: the pod and its other container run on
    assert flab.cri.pod_status(pod).ready
    assert flab.cri.container_status(bystander.id).state == "RUNNING"
    assert flab.cri.exec_sync(bystander.id, ["echo", "alive"], timeout=30).stdout == "alive\n"


def test_state_directory_full(fault_lab: fl.FaultLab) -> None:
    flab = fault_lab
    running, running_config = flab.pod("full-before", shared_pid=True)
    first = flab.container(running, running_config, "first")
    outcomes: dict[str, str] = {}
    filled = flab.plab.fill_run_dir()
    assert filled > 0
    try:
        config = flab.pod_config("full-during", shared_pid=True)
        outcomes["RunPodSandbox"] = fl.outcome(fl.in_thread(lambda: flab.run_pod(config)))
        outcomes["StartContainer in a running pod"] = fl.outcome(
            fl.in_thread(lambda: flab.container(running, running_config, "second"))
        )
        outcomes["ExecSync in a running pod"] = fl.outcome(
            fl.in_thread(lambda: flab.cri.exec_sync(first.id, ["true"], timeout=30))
        )
    finally:
        flab.plab.free_run_dir()
    for what, result in outcomes.items():  # each returned (outcome() fails on a hang)
        print(f"state directory full: {what}: {result}", file=sys.stderr)
    # podshim's own writes fail with the file system's error, not a hang or a crash
    assert "no space left on device" in outcomes["RunPodSandbox"].lower(), outcomes
    # the pod that was running runs on
    assert flab.cri.pod_status(running).ready
    assert flab.cri.exec_sync(first.id, ["echo", "ok"], timeout=30).stdout == "ok\n"
    # with space back, new pods and containers run
    pod, pod_config = flab.pod("full-after", shared_pid=True)
    assert flab.container(pod, pod_config, "c").state == "RUNNING"
    assert flab.container(running, running_config, "third").state == "RUNNING"


def test_pid_init_killed(fault_lab: fl.FaultLab) -> None:
    flab = fault_lab
    pod, config = flab.pod("init-kill", shared_pid=True)
    cids = [flab.container(pod, config, name).id for name in ("one", "two")]
    shim = flab.shim_pid(pod)
    inits = [s for s in descendants(shim) if s.comm == "podshim-init"]
    assert len(inits) == 1, inits
    os.kill(inits[0].pid, signal.SIGKILL)
    flab.wait_pod(pod, "NOTREADY")
    for cid in cids:
        assert flab.wait_container(cid, "EXITED").exit_code == 137
    fl.wait_gone(inits[0].pid, inits[0].starttime)
    # the node still runs pods
    again, again_config = flab.pod("init-kill-after", shared_pid=True)
    assert flab.container(again, again_config, "c").state == "RUNNING"
