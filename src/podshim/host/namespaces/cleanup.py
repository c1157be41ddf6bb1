"""What a crashed pod shim leaves behind, and how the ``delete`` action removes it.

When a pod's shim dies (``kill -9``), containerd runs ``delete`` for each of its tasks.
For the *sandbox* it must remove what the namespaces host made: the PID-namespace init
(named with its start time in the pod's state directory), everything in the cgroups of
execs in the host (recorded by :mod:`~podshim.host.namespaces.execcg`: a process that
left its exec's session is still there) and those cgroups, the processes of the cgroup
directories the host recorded as made by it (never a cgroup it adopted: that could be
anybody's, containerd's own included), those directories, the namespace pins and the
pod's state directory. A *workload*'s ``delete`` leaves all of this alone. Synchronous
and bounded: containerd kills ``delete`` after 5 s.

The same records serve a shim whose teardown did not finish (a busy cgroup): what is
left stays named in the state directory until a later attempt removes it, and the
state directory goes last, only when nothing is left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time
from typing import Any

from podshim import rundir
from podshim.host.namespaces import execcg
from podshim.host.namespaces.cgroup import CGROUP_RECORD, recorded_cgroup_dirs, try_rmdir
from podshim.host.namespaces.plan import PIN_FILES
from podshim.linux import mount
from podshim.linux.proc import start_time

#: in the pod's state directory: the PID-namespace init as ``{"pid": .., "start": ..}``
INIT_RECORD = "init.json"


def _procs(d: str) -> list[int]:
    try:
        with open(os.path.join(d, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def record_init(state_dir: str, pid: int) -> None:
    """Name the pod's init for a crash cleanup (its pid and start time)."""
    tmp = os.path.join(state_dir, INIT_RECORD + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"pid": pid, "start": start_time(pid)}, f)
    os.replace(tmp, os.path.join(state_dir, INIT_RECORD))


def kill_recorded_init(state_dir: str) -> list[str]:
    """SIGKILL the recorded init if that very process still runs (pid and start time
    match; a reused pid is left alone), and remove the record."""
    path = os.path.join(state_dir, INIT_RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        pid, start = int(rec["pid"]), rec["start"]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        with contextlib.suppress(OSError):  # unusable: names nothing to kill
            os.unlink(path)
        return [f"init record {path} unusable, removed: {exc}"]
    if pid > 1 and start is not None and start_time(pid) == start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return []


def _leaves(dirs: list[str]) -> list[str]:
    return [d for d in dirs if not any(o.startswith(d + "/") for o in dirs)]


def remove_sandbox_cgroup(state_dir: str, budget: float = 2.0) -> list[str]:
    """Kill what is left in the cgroup directories the host recorded as made by it
    (never an adopted one) and remove them, deepest first; returns problems."""
    problems: list[str] = []
    made = [d for d in recorded_cgroup_dirs(state_dir) if os.path.isdir(d)]
    for d in _leaves(made):
        for pid in _procs(d):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + budget
    pending = sorted(made, key=lambda d: d.count("/"), reverse=True)
    leaves = set(_leaves(made))
    while pending:
        left = []
        for d in pending:
            exc = try_rmdir(d)
            if exc is not None:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    problems.append(f"rmdir {d}: {exc.strerror}")
                elif d in leaves:
                    left.append(d)
                # an ancestor we made that others now use (a container's cgroup): theirs
        pending = left
        if pending and time.monotonic() < deadline:
            time.sleep(0.02)
        elif pending:
            problems.append(f"cgroup dirs still busy: {pending}")
            break
    if not problems:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(state_dir, CGROUP_RECORD))
    return problems


def remove_exec_cgroups(state_dir: str, budget: float = 1.0) -> list[str]:
    """Kill everything in the recorded exec cgroups and remove them; returns problems.
    What is still there stays recorded."""
    pending = [d for d in execcg.recorded(state_dir) if os.path.isdir(d)]
    deadline = time.monotonic() + budget
    problems: list[str] = []
    while pending:
        pending, problems = execcg.kill_and_rmdir_once(pending)
        if not pending or problems or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    try:
        execcg.write_record(state_dir, pending)
    except OSError as exc:
        problems.append(f"record {execcg.EXEC_RECORD}: {exc.strerror or exc}")
    if pending and not problems:
        problems.append(f"exec cgroups still busy: {pending}")
    return problems


def remove_pins(
    namespace: str, pod_id: str, state_root: str | None = None, keep_state: bool = False
) -> list[str]:
    """Unmount and remove the pod's namespace pins and (unless ``keep_state``: records
    of what is left are in it) its state directory."""
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
    return problems + remove_state_dir(state, [], keep=keep_state or bool(problems))


def remove_state_dir(state_dir: str, done: list[str], keep: bool = False) -> list[str]:
    """Remove the records named in ``done`` (what they named is gone) and half-written
    ones; then, unless ``keep`` (the other records name what is left), the state
    directory itself. Returns problems: a directory holding what podshim did not put
    there is one."""
    for name in [*done, *(r + ".tmp" for r in (INIT_RECORD, CGROUP_RECORD, execcg.EXEC_RECORD))]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(state_dir, name))
    if keep:
        return []
    try:
        os.rmdir(state_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            return [f"remove {state_dir}: {exc.strerror or exc}"]
        try:
            names = sorted(os.listdir(state_dir))
        except OSError:
            names = []
        return [f"state directory {state_dir} holds what podshim did not put there: {names}"]
    return []


def cleanup_sandbox(
    namespace: str, pod_id: str, spec: dict[str, Any], state_root: str | None = None
) -> list[str]:
    """Everything above, in order: init, exec cgroups and sandbox cgroup first (the
    init holds the pins' namespaces; exec cgroups are below the sandbox cgroup), then
    the pins, then the state directory if nothing is left. Returns problems (empty:
    all gone). The caller (``NamespacesKind.cleanup``) runs it only when the pod's
    state directory exists (made by a namespaces host that was not closed)."""
    state = os.path.join(state_root or rundir.pods_dir(), namespace, pod_id)
    problems = kill_recorded_init(state)
    problems += remove_exec_cgroups(state)
    problems += remove_sandbox_cgroup(state)
    problems += remove_pins(namespace, pod_id, state_root, keep_state=bool(problems))
    return problems
