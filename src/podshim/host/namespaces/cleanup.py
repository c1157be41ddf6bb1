"""What a crashed pod shim leaves behind, and how the ``delete`` action removes it.

When a pod's shim dies (``kill -9``), containerd runs ``delete`` for each of its tasks.
For the *sandbox* it must remove what the namespaces host made: the PID-namespace init
(found as the processes of the sandbox cgroup, which holds nothing else), the sandbox
cgroup, the namespace pins and the pod's state directory. A *workload*'s ``delete``
leaves all of this alone. Synchronous and bounded: containerd kills ``delete`` after 5 s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from typing import Any

from podshim import rundir
from podshim.host.namespaces.cgroup import hierarchies, validate_cgroups_path
from podshim.host.namespaces.plan import PIN_FILES
from podshim.linux import mount


def _procs(d: str) -> list[int]:
    try:
        with open(os.path.join(d, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def remove_sandbox_cgroup(cgroups_path: str, budget: float = 2.0) -> list[str]:
    """Kill what is left in the sandbox cgroup and remove it; returns problems."""
    problems: list[str] = []
    try:
        rel = validate_cgroups_path(cgroups_path)
    except Exception as exc:
        return [f"cgroupsPath {cgroups_path!r}: {exc}"]
    dirs = [os.path.join(h.mountpoint, rel.lstrip("/")) for h in hierarchies()]
    dirs = [d for d in dirs if os.path.isdir(d)]
    for d in dirs:
        for pid in _procs(d):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + budget
    pending = dirs
    while pending:
        left = []
        for d in pending:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    problems.append(f"rmdir {d}: {exc.strerror}")
                else:
                    left.append(d)
        pending = left
        if pending and time.monotonic() < deadline:
            time.sleep(0.02)
        elif pending:
            problems.append(f"cgroup dirs still busy: {pending}")
            break
    return problems


def remove_pins(namespace: str, pod_id: str, state_root: str | None = None) -> list[str]:
    """Unmount and remove the pod's namespace pins and its state directory."""
    problems: list[str] = []
    state = os.path.join(state_root or rundir.pods_dir(), namespace, pod_id)
    if not os.path.isdir(state):
        return problems
    for name in PIN_FILES.values():
        pin = os.path.join(state, name)
        if not os.path.lexists(pin):
            continue
        try:
            mount.unmount_all(pin)
            os.unlink(pin)
        except OSError as exc:
            problems.append(f"pin {pin}: {exc}")
    try:
        os.rmdir(state)
    except OSError as exc:
        problems.append(f"rmdir {state}: {exc.strerror}")
    return problems


def cleanup_sandbox(namespace: str, pod_id: str, spec: dict[str, Any]) -> list[str]:
    """Everything above, in order: init and cgroup first (the init holds the pins'
    namespaces), then the pins. Returns problems for containerd's warning log. The
    caller (``NamespacesKind.cleanup``) runs it only when the pod's state directory
    exists (made by a namespaces host that was not closed)."""
    problems: list[str] = []
    cgroups_path = str((spec.get("linux") or {}).get("cgroupsPath") or "")
    if cgroups_path:
        problems += remove_sandbox_cgroup(cgroups_path)
    problems += remove_pins(namespace, pod_id)
    return problems
