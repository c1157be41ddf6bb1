"""What a crashed VM pod's shim leaves behind, and how the ``delete`` action removes it.

When a pod's shim dies (``kill -9``), QEMU (its child) is reparented and goes on, the
tap and the tc redirects stay in the pod's network namespace, bind mounts stay under
``share/``. :func:`cleanup_vm` removes them from the run directory's record
(:mod:`podshim.host.uvm.state`): QEMU is SIGKILLed only if the recorded pid still names
that very process (start time, a qemu binary, a command line naming the run directory),
the tap and ``eth0``'s ingress qdisc are removed in the namespace if it still exists,
everything under ``share/`` is unmounted and the run directory removed. Synchronous,
within a couple of seconds (containerd kills ``delete`` after 5 s); never raises;
returns what is left (then recorded for the next run).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from podshim.host.uvm import state

#: how long the killed QEMU may take to go away (it is not our child: it is reaped by
#: whoever inherited it; its pid is watched for a changed start time)
KILL_WAIT = 2.0


def _gone(pid: int, start: int) -> bool:
    from podshim.linux.proc import start_time

    now = start_time(pid)
    if now is not None:
        return now != start  # still QEMU, or the pid names another process
    # gone, or a zombie: a zombie leader's other threads may still be exiting, and
    # until the last has, QEMU's files (the tap) are open: the tap cannot be removed
    try:
        return len(os.listdir(f"/proc/{pid}/task")) <= 1
    except OSError:
        return True


def kill_qemu(run_dir: str, rec: state.Record) -> list[str]:
    """SIGKILL the recorded QEMU if it is still that process; wait briefly for it."""
    if not rec.pid:
        return []
    if not state.is_our_qemu(rec.pid, rec.start, run_dir):
        return []  # gone, or the pid names another process now: never signalled
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec.pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT
    while not _gone(rec.pid, rec.start):
        if time.monotonic() > deadline:
            return [f"QEMU {rec.pid} still running after SIGKILL"]
        time.sleep(0.01)
    return []


def cleanup_vm(namespace: str, pod_id: str, run_dir: str | None = None) -> list[str]:
    """Remove what the VM host of the pod left (see the module docstring)."""
    directory = run_dir or state.run_dir(namespace, pod_id)
    try:
        if not os.path.isdir(directory):
            state.remove_alias(directory, state.alias(namespace, pod_id))
            return []
        rec = state.read_record(directory) or state.Record()
        problems = kill_qemu(directory, rec)
        if problems:  # the tap is QEMU's while it runs: try again next time
            return problems
        rec.pid = rec.start = 0
        if rec.netns:
            from podshim.host.uvm import network

            left = network.teardown_sync(rec.netns, rec.tap, rec.ingress)
            problems += left
            if not left:
                rec.netns, rec.tap, rec.ingress = "", "", False
        from podshim.host.uvm.vmops import remove_run_dir

        problems += remove_run_dir(directory, keep=bool(problems))
        if not problems:
            state.remove_alias(directory, state.alias(namespace, pod_id))
        if problems:
            with contextlib.suppress(OSError):
                state.write_record(directory, rec)
        return problems
    except Exception as exc:  # never raise: containerd keeps the bundle and retries
        return [f"VM cleanup of pod {pod_id}: {exc}"]
