"""The ``delete`` action: clean up what a task left behind, print a DeleteResponse.

containerd runs it after every normal task removal and whenever a shim connection is
lost (a crashed shim). It must: remove the OCI runtime's container (killing what is left
of it), unmount ``<bundle>/rootfs``, remove the shim socket if its daemon is dead, and
write a serialized ``containerd.task.v2.DeleteResponse`` to stdout (exit status 137, as
runc's shim reports). Anything on stderr becomes a containerd warning. It never touches
other tasks of a still-running shim.

If the shim daemon crashed it left ``panic.log`` (its traceback) in the pod sandbox's
bundle, or the first task's for a shim without a pod. The ``delete`` of that task relays
the first :data:`PANIC_RELAY_LIMIT` bytes to stderr, so containerd logs them as a
"cleanup warnings" line (as runhcs does with its panic.log); a workload container's
``delete`` neither relays nor removes it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from podshim.shim.flags import Flags
from podshim.shim.paths import CONTAINER_TYPE_ANNOTATION

#: what Container.create records in the bundle for this action
RUNTIME_FILE = "podshim-runtime.json"
#: where the namespaces pod host keeps a pod's pins (see podshim.host.namespaces.cleanup)
STATE_ROOT = "/run/podshim/pods"
#: the crash report a dying shim daemon writes into a bundle (podshim.logs.write_panic)
PANIC_FILE = "panic.log"
#: how much of it the delete action relays to containerd
PANIC_RELAY_LIMIT = 1 << 20


def relay_panic(bundle: str, task_id: str) -> int:
    """Copy the first :data:`PANIC_RELAY_LIMIT` bytes of ``<bundle>/panic.log`` to
    stderr, after a header naming the task; returns how many bytes of it were relayed
    (0 when there is none). The file is left in place."""
    path = os.path.join(bundle, PANIC_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read(PANIC_RELAY_LIMIT + 1)
    except OSError:
        return 0
    if not data:
        return 0
    cut = len(data) > PANIC_RELAY_LIMIT
    data = data[:PANIC_RELAY_LIMIT]
    head = f"podshim delete {task_id}: the shim serving this task crashed; {path}"
    head += f" (first {PANIC_RELAY_LIMIT} bytes)" if cut else ""
    sys.stderr.flush()
    sys.stderr.buffer.write(
        head.encode() + b":\n" + data + (b"" if data.endswith(b"\n") else b"\n")
    )
    sys.stderr.flush()
    return len(data)


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


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """``containerd.task.v2.DeleteResponse{pid=1, exit_status=2, exited_at=3}``, encoded
    by hand: importing protobuf would double this action's run time (it runs after every
    task removal, on containerd's critical path)."""
    secs, nanos = divmod(exited_at_ns, 1_000_000_000)
    ts = b""
    if secs:
        ts += b"\x08" + _varint(secs)
    if nanos:
        ts += b"\x10" + _varint(nanos)
    out = b""
    if pid:
        out += b"\x08" + _varint(pid)
    if exit_status:
        out += b"\x10" + _varint(exit_status)
    return out + b"\x1a" + _varint(len(ts)) + ts


def delete(flags: Flags) -> int:
    bundle = flags.bundle or os.getcwd()
    spec = _spec(bundle)
    ann = spec.get("annotations") or {}
    kind = ann.get(CONTAINER_TYPE_ANNOTATION) if isinstance(ann, dict) else None
    is_sandbox = kind == "sandbox"
    if kind != "container":  # the sandbox, or a task of a shim without a pod
        relay_panic(bundle, flags.id)
    if (
        is_sandbox
        and flags.id
        and os.path.isdir(os.path.join(STATE_ROOT, flags.namespace, flags.id))
    ):
        from podshim.host.namespaces.cleanup import cleanup_sandbox

        for problem in cleanup_sandbox(flags.namespace, flags.id, spec):
            print(f"podshim delete: {problem}", file=sys.stderr)
    binary, root = _runtime(bundle)
    if binary and flags.id and os.path.exists(os.path.join(root, flags.namespace, flags.id)):
        import subprocess  # only when the runtime still has state for this container

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
    rootfs = os.path.join(bundle, "rootfs")
    if os.path.ismount(rootfs):
        from podshim.linux import mount

        try:
            mount.unmount_all(rootfs)
        except OSError as exc:
            print(f"podshim delete: {exc}", file=sys.stderr)
    _remove_dead_socket(bundle)
    sys.stdout.buffer.write(encode_delete_response(_read_pid(bundle), 128 + 9, time.time_ns()))
    sys.stdout.flush()
    return 0
