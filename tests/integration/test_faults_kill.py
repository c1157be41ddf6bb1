"""Fault matrix: a pod's shim SIGKILLed while a call is in flight.

The call is caught at an exact point, never by sleeping: a gate (:mod:`podshim_lab.gates`)
standing in for runc blocks in the verb the test targets (``create`` and ``start`` of
CRI's StartContainer, ``exec`` of ExecSync, ``delete`` after StopContainer), or the
pin gate blocks the sandbox's host start (RunPodSandbox) in its forked namespace maker. The blocked call's
parent is the shim that made it: the test SIGKILLs exactly that process, waits for the
CRI call to return, and only then lets the blocked call go on, so the runtime call
outlives its shim and containerd's cleanup (the worst order; a slow runc on a loaded node
does that).

Each test ends with the pod cleanly reported exited (sandbox NOTREADY, every container
EXITED) or, when the kill hit RunPodSandbox, with the pod refused; then removal must
leave nothing (the fixture's census, see ``faultlab``).
"""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import Future
from typing import TYPE_CHECKING

import pytest

from podshim_lab.cri.client import api
from podshim_lab.procfs import read_stat

if TYPE_CHECKING:
    from tests.integration import faultlab as fl
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import faultlab as fl

pytestmark = pytest.mark.timeout(300)

fault_lab_module = fl.fault_lab_module
fault_lab = fl.fault_lab


def _kill_the_caller(flab: fl.FaultLab, ppid: int, expected: int | None) -> None:
    stat = read_stat(ppid)
    assert stat is not None and stat.comm.startswith("containerd-shim"), stat
    if expected is not None:
        assert ppid == expected, f"the blocked call's parent {ppid} is not the pod's shim"
    os.kill(ppid, signal.SIGKILL)


def _reported_exited(flab: fl.FaultLab, pod: str) -> None:
    flab.wait_pod(pod, "NOTREADY")
    for c in flab.cri.list_containers(pod):
        if c.state != api.CONTAINER_EXITED:
            flab.wait_container(c.id, "EXITED")


@pytest.mark.parametrize("verb", ["create", "start", "exec", "delete"])
def test_shim_sigkill_during_a_runtime_call(fault_lab: fl.FaultLab, verb: str) -> None:
    flab = fault_lab
    pod, config = flab.pod(f"kill-{verb}", shared_pid=True)
    bystander = flab.container(pod, config, "bystander")
    shim = flab.shim_pid(pod)
    call: Future[object]
    if verb == "exec":
        flab.runc.block("exec", bystander.id)
        call = fl.in_thread(lambda: flab.cri.exec_sync(bystander.id, ["true"], timeout=60))
    elif verb == "delete":
        victim = flab.container(pod, config, "victim").id
        flab.runc.block("delete", victim)
        call = fl.in_thread(lambda: flab.cri.stop_container(victim, grace=0))
    else:
        victim = flab.create(pod, config, "victim")
        flab.runc.block(verb, victim)
        call = fl.in_thread(lambda: flab.cri.start_container(victim))

    blocked = flab.runc.wait_blocked(verb)
    _kill_the_caller(flab, blocked.ppid, shim)
    result = fl.outcome(call)
    print(f"SIGKILL during runc {verb}: the CRI call returned {result}", file=sys.stderr)
    _reported_exited(flab, pod)
    assert flab.cri.container_status(bystander.id).state == "EXITED"

    flab.runc.release(verb)  # the runtime call outlives its shim and the cleanup
    fl.wait_gone(blocked.pid)
    errors = flab.remove_all()
    assert not errors, errors
    left = flab.wait_clean()
    assert not left, "\n".join(left) + "\n" + flab.lab.log_tail(40)


def test_shim_sigkill_during_the_host_start(fault_lab: fl.FaultLab) -> None:
    flab = fault_lab
    config = flab.pod_config("kill-host", shared_pid=True)
    flab.pin.block("pin", config.hostname)
    call = fl.in_thread(lambda: flab.run_pod(config))
    blocked = flab.pin.wait_blocked("pin")
    # the pins are named after the pod: <run dir>/pods/<instance>/k8s.io/<pod id>/<ns>
    pins = [a.split("=", 1)[1] for a in blocked.args if a.startswith("--") and "=" in a]
    assert pins, blocked.args
    pod = os.path.basename(os.path.dirname(pins[0]))
    flab.ids.append(pod)
    _kill_the_caller(flab, blocked.ppid, None)
    result = fl.outcome(call)
    print(f"SIGKILL during the host start: RunPodSandbox returned {result}", file=sys.stderr)
    assert result != "ok", "RunPodSandbox succeeded although its shim was killed"
    assert pod not in {p.id for p in flab.cri.list_pods()}, "CRI kept the refused pod"

    flab.pin.release("pin")  # the namespace maker outlives its shim and the cleanup
    fl.wait_gone(blocked.pid)
    left = flab.wait_clean()
    assert not left, "\n".join(left) + "\n" + flab.lab.log_tail(40)
    # the node still runs pods
    again, again_config = flab.pod("after-kill-host", shared_pid=True)
    assert flab.container(again, again_config, "c").state == "RUNNING"
