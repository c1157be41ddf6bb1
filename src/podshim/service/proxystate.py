"""What a proxy-plugin daemon (``podshim daemon``) keeps on disk so that its successor can
report and clean up what it loses when it dies.

containerd loads the tasks of a proxy-plugin pod straight from the Task v3 address the
controller's Start returned: it runs no ``delete`` action for them when that connection
drops, so nobody but the next daemon can tell containerd that they exited. The daemon's
home (``<run dir>/proxy/<instance>/``, one per containerd address) holds:

* ``sandboxes/<namespace>/<id>/``: each pod's own bundle, made by the Controller's
  Create: the pod's description (``config.json``, the same shape the ``delete`` action's
  crash cleanup reads for a seed sandbox), the host record the Pod writes, and
  :data:`SANDBOX_RECORD` (when it was created; once the daemon that held it died, when
  its loss was found, :data:`LOST_RECORD`). Removed by the Controller's Shutdown.
* ``tasks/<namespace>/<id>``: one JSON record per Task API task (its containerd bundle,
  pid, OCI runtime), written after its Create and removed after its Delete.

Standard library only; every write is atomic (a temporary file renamed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from podshim import rundir
from podshim.oci import bundle as files
from podshim.oci.ids import valid_id

#: a pod's record in its bundle: ``{"created_at": <unix time>}``
SANDBOX_RECORD = "podshim-sandbox.json"
#: written into a pod's bundle when a new daemon finds its previous daemon lost it:
#: ``{"exited_at": <unix time>, "exit_status": <n>, "left": [<what cleanup left>]}``
LOST_RECORD = "podshim-lost.json"


def home_dir(address: str) -> str:
    """The proxy daemon's home for the containerd at ``address``."""
    return os.path.join(rundir.run_dir(), "proxy", rundir.instance_key(address))


def _write_json(path: str, value: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _entries(directory: str) -> Iterator[tuple[str, str]]:
    """``(namespace, name)`` of every valid entry ``directory/<namespace>/<name>``."""
    with contextlib.suppress(FileNotFoundError):
        for ns in sorted(os.listdir(directory)):
            if not valid_id(ns):
                continue
            with contextlib.suppress(NotADirectoryError, FileNotFoundError):
                for name in sorted(os.listdir(os.path.join(directory, ns))):
                    if valid_id(name):
                        yield ns, name


@dataclass(frozen=True)
class TaskRecord:
    namespace: str
    id: str
    bundle: str
    pid: int
    #: the OCI runtime's binary and root (``""`` when unknown)
    runtime: str = ""
    runtime_root: str = ""


class ProxyState:
    """The on-disk records of one proxy daemon (see the module doc)."""

    def __init__(self, home: str) -> None:
        self.home = home
        self.sandboxes_dir = os.path.join(home, "sandboxes")
        self.tasks_dir = os.path.join(home, "tasks")

    # -- pods ---------------------------------------------------------------------------
    def sandbox_dir(self, namespace: str, sid: str) -> str:
        return os.path.join(self.sandboxes_dir, namespace, sid)

    def make_sandbox_dir(self, namespace: str, sid: str) -> str:
        """The pod's bundle (empty; a stale one from a failed create is replaced)."""
        path = self.sandbox_dir(namespace, sid)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, mode=0o700)
        _write_json(os.path.join(path, SANDBOX_RECORD), {"created_at": time.time()})
        return path

    def remove_sandbox_dir(self, namespace: str, sid: str) -> None:
        shutil.rmtree(self.sandbox_dir(namespace, sid), ignore_errors=True)
        with contextlib.suppress(OSError):  # the namespace's directory, once empty
            os.rmdir(os.path.join(self.sandboxes_dir, namespace))

    def sandboxes(self) -> list[tuple[str, str]]:
        """``(namespace, id)`` of every pod bundle on disk."""
        return list(_entries(self.sandboxes_dir))

    def created_at(self, namespace: str, sid: str) -> float:
        record = _read_json(os.path.join(self.sandbox_dir(namespace, sid), SANDBOX_RECORD))
        value = record.get("created_at")
        return float(value) if isinstance(value, (int, float)) else 0.0

    def mark_lost(self, namespace: str, sid: str, status: int, left: list[str]) -> None:
        path = os.path.join(self.sandbox_dir(namespace, sid), LOST_RECORD)
        if not os.path.exists(path):  # the first daemon to find it lost says when
            _write_json(path, {"exited_at": time.time(), "exit_status": status, "left": left})
        elif left != self.lost(namespace, sid).get("left"):
            record = self.lost(namespace, sid)
            record["left"] = left
            _write_json(path, record)

    def lost(self, namespace: str, sid: str) -> dict[str, Any]:
        """The pod's :data:`LOST_RECORD` (``{}`` for a pod this daemon holds)."""
        return _read_json(os.path.join(self.sandbox_dir(namespace, sid), LOST_RECORD))

    # -- tasks --------------------------------------------------------------------------
    def _task_path(self, namespace: str, tid: str) -> str:
        return os.path.join(self.tasks_dir, namespace, tid)

    def record_task(self, namespace: str, tid: str, bundle: str, pid: int) -> None:
        """Record a task made in ``bundle``, with the OCI runtime (binary and root) that
        the container's Create recorded there: containerd may remove the bundle of a
        task it lost before a new daemon runs, the runtime's state stays."""
        runtime = _read_json(os.path.join(bundle, files.RUNTIME_RECORD))
        os.makedirs(os.path.join(self.tasks_dir, namespace), mode=0o700, exist_ok=True)
        _write_json(
            self._task_path(namespace, tid), {"bundle": bundle, "pid": pid, "runtime": runtime}
        )

    def forget_task(self, namespace: str, tid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._task_path(namespace, tid))
        with contextlib.suppress(OSError):  # the namespace's directory, once empty
            os.rmdir(os.path.join(self.tasks_dir, namespace))

    def remove_if_empty(self, keep: tuple[str, ...] = ()) -> bool:
        """Remove the home when it holds no record (``keep``: names that may remain, e.g.
        the lock); True when it is gone."""
        for d in (self.tasks_dir, self.sandboxes_dir):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        try:
            names = set(os.listdir(self.home))
        except FileNotFoundError:
            return True
        if not names <= set(keep):
            return False
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.home, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.home)
        return not os.path.exists(self.home)

    def tasks(self) -> list[TaskRecord]:
        out: list[TaskRecord] = []
        for ns, tid in _entries(self.tasks_dir):
            rec = _read_json(self._task_path(ns, tid))
            bundle, pid = rec.get("bundle"), rec.get("pid")
            runtime = rec.get("runtime")
            rt = runtime if isinstance(runtime, dict) else {}
            binary, root = rt.get("binary"), rt.get("root")
            out.append(
                TaskRecord(
                    ns,
                    tid,
                    bundle if isinstance(bundle, str) else "",
                    pid if isinstance(pid, int) else 0,
                    binary if isinstance(binary, str) else "",
                    root if isinstance(root, str) else "",
                )
            )
        return out
