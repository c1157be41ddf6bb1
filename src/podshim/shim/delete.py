"""The ``delete`` action: clean up what a task left behind, print a DeleteResponse.

containerd runs it after every normal task removal and whenever a shim connection is
lost (a crashed shim). It must: remove the OCI runtime's container (killing what is left
of it), unmount ``<bundle>/rootfs``, remove the shim socket if its daemon is dead, and
write a serialized ``containerd.task.v2.DeleteResponse`` to stdout (exit status 137, as
runc's shim reports). Anything on stderr becomes a containerd warning. It never touches
other tasks of a still-running shim.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

from podshim.shim.flags import Flags
from podshim.shim.paths import CONTAINER_TYPE_ANNOTATION

#: what Container.create records in the bundle for this action
RUNTIME_FILE = "podshim-runtime.json"


def _runtime(bundle: str) -> tuple[str, str]:
    try:
        with open(os.path.join(bundle, RUNTIME_FILE)) as f:
            rt = json.load(f)
        return str(rt["binary"]), str(rt["root"])
    except (OSError, ValueError, KeyError, TypeError):
        return "", ""


def _spec(bundle: str) -> dict[str, Any]:
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def _read_pid(bundle: str) -> int:
    try:
        with open(os.path.join(bundle, "init.pid")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def _remove_dead_socket(bundle: str) -> None:
    try:
        with open(os.path.join(bundle, "address")) as f:
            path = f.read().strip().removeprefix("unix://")
    except OSError:
        return
    if not path:
        return
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
    finally:
        s.close()


def delete(flags: Flags) -> int:
    from podshim.api.task.v2 import shim_pb2
    from podshim.shim import mount

    bundle = flags.bundle or os.getcwd()
    spec = _spec(bundle)
    ann = spec.get("annotations") or {}
    if isinstance(ann, dict) and ann.get(CONTAINER_TYPE_ANNOTATION) == "sandbox" and flags.id:
        from podshim.pod.leftovers import cleanup_sandbox

        for problem in cleanup_sandbox(flags.namespace, flags.id, spec):
            print(f"podshim delete: {problem}", file=sys.stderr)
    binary, root = _runtime(bundle)
    if binary and flags.id:
        argv = [
            binary,
            "--root",
            os.path.join(root, flags.namespace),
            "delete",
            "--force",
            flags.id,
        ]
        try:
            res = subprocess.run(argv, capture_output=True, timeout=4, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"podshim delete: {exc}", file=sys.stderr)
        else:
            err = res.stderr.decode(errors="replace")
            if res.returncode != 0 and "does not exist" not in err:
                print(f"podshim delete: {binary} delete: {err.strip()}", file=sys.stderr)
    try:
        mount.unmount_all(os.path.join(bundle, "rootfs"))
    except OSError as exc:
        print(f"podshim delete: {exc}", file=sys.stderr)
    _remove_dead_socket(bundle)
    resp = shim_pb2.DeleteResponse(pid=_read_pid(bundle), exit_status=128 + 9)
    resp.exited_at.FromNanoseconds(time.time_ns())
    sys.stdout.buffer.write(resp.SerializeToString())
    sys.stdout.flush()
    return 0
