"""The ``delete`` action: clean up what a task left behind, print a DeleteResponse.

containerd runs it after every normal task removal and whenever a shim connection is
lost (a crashed shim). It must: remove the OCI runtime's container (killing what is left
of it), unmount ``<bundle>/rootfs``, remove the shim socket if its daemon is dead, and
write a serialized ``containerd.task.v2.DeleteResponse`` to stdout (exit status 137, as
runc's shim reports). Anything on stderr becomes a containerd warning. It never touches
other tasks of a still-running shim.

For a pod sandbox it also runs the crash cleanup of the pod's host kind. When that
cleanup cannot finish (a cgroup still busy, say) it prints what is left and exits 1:
containerd then logs the failure and keeps the bundle, and runs ``delete`` again when
it next loads its tasks (its restart); the host's records of what is left stay in the
pod's state directory until an attempt removes it.

If the shim daemon crashed it left ``panic.log`` (its traceback) in the pod sandbox's
bundle, or the first task's for a shim without a pod. The ``delete`` of that task relays
the first :data:`PANIC_RELAY_LIMIT` bytes to stderr, so containerd logs them as a
"cleanup warnings" line (as runhcs does with its panic.log); a workload container's
``delete`` neither relays nor removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
import time
from typing import Any

from podshim import rundir
from podshim.oci import bundle as files
from podshim.oci.ids import CONTAINER_TYPE_ANNOTATION
from podshim.shim.flags import Flags
from podshim.shim.panic import relay_panic


def _runtime(bundle: str) -> tuple[str, str]:
    try:
        with open(os.path.join(bundle, files.RUNTIME_RECORD)) as f:
            rt = json.load(f)
        return str(rt["binary"]), str(rt["root"])
    except (OSError, ValueError, KeyError, TypeError):
        return "", ""


def _spec(bundle: str) -> dict[str, Any]:
    try:
        with open(os.path.join(bundle, files.CONFIG)) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def _cleanup_host(bundle: str, namespace: str, pod_id: str, spec: dict[str, Any]) -> list[str]:
    """The crash cleanup of the sandbox's host kind (recorded in its bundle by the Pod)."""
    try:
        with open(os.path.join(bundle, files.HOST_RECORD)) as f:
            kind = str(json.load(f)["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no pod host was made (or not by podshim)
    from podshim.host import registry  # only for a sandbox: keeps delete fast

    try:
        return registry.get(kind).cleanup(namespace, pod_id, spec)
    except Exception as exc:  # a plug-in's bug must not cost containerd the response
        return [f"cleanup of the {kind} host of pod {pod_id}: {exc}"]


def _read_pid(bundle: str) -> int:
    try:
        with open(os.path.join(bundle, files.INIT_PID)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def _remove_dead_socket(bundle: str) -> None:
    try:
        with open(os.path.join(bundle, files.ADDRESS)) as f:
            path = f.read().strip().removeprefix("unix://")
    except OSError:
        return
    # only a shim socket of ours: the file names a path, never trusted to be one
    if not path or os.path.dirname(path) != os.path.abspath(rundir.sockets_dir()):
        return
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except OSError:
        return  # gone: its daemon exited cleanly (and removed its registry entry)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:  # nobody serves it: the daemon is dead (killed, or containerd was down)
        with contextlib.suppress(OSError):
            os.unlink(path)
        # and its diag registry entry, which only a reader would prune otherwise
        from podshim.diag.registry import entry_name  # only for a dead shim

        with contextlib.suppress(OSError):
            os.unlink(os.path.join(rundir.registry_dir(), entry_name(path)))
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


def _answer(bundle: str) -> int:
    sys.stdout.buffer.write(encode_delete_response(_read_pid(bundle), 128 + 9, time.time_ns()))
    sys.stdout.flush()
    return 0


def delete(flags: Flags) -> int:
    bundle = flags.bundle or os.getcwd()
    if os.path.exists(os.path.join(bundle, files.DELETED)) and not os.path.exists(
        os.path.join(bundle, files.PANIC)
    ):  # the shim deleted this task and left nothing: only the answer is left to give
        return _answer(bundle)
    rundir.bind_instance(flags.address)  # the pod host's state of this containerd
    spec = _spec(bundle)
    ann = spec.get("annotations") or {}
    kind = ann.get(CONTAINER_TYPE_ANNOTATION) if isinstance(ann, dict) else None
    is_sandbox = kind == "sandbox"
    if kind != "container":  # the sandbox, or a task of a shim without a pod
        relay_panic(bundle, flags.id)
    left = _cleanup_host(bundle, flags.namespace, flags.id, spec) if is_sandbox and flags.id else []
    for problem in left:
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
    rootfs = os.path.join(bundle, files.ROOTFS)
    if os.path.ismount(rootfs):
        from podshim.linux import mount  # only when mounted: keeps delete fast

        try:
            mount.unmount_all(rootfs)
        except OSError as exc:
            print(f"podshim delete: {exc}", file=sys.stderr)
    _remove_dead_socket(bundle)
    _answer(bundle)
    return 1 if left else 0  # 1: containerd keeps the bundle, and runs delete again
