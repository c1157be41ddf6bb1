"""The shim binary's actions: ``start``, ``delete`` and (no action) the serving daemon.

Standard library only until the daemon is chosen: ``start`` and ``delete`` run for every
task, and their cost is part of the floor this shim measures.
"""

from __future__ import annotations

import os
import sys
import time
from _socket import socket as _sock  # not `socket`: it costs ~10 ms to import

from podshim.rundir import digest
from podshim.shim.spawn import spawn_detached
from podshim.shim.start import listen  # podshim's own: bound, then linked into place

VALUE_FLAGS = frozenset(
    {"namespace", "id", "address", "publish-binary", "bundle", "socket", "containerd-pid"}
)
SANDBOX_ANNOTATION = b'"io.kubernetes.cri.sandbox-id":"'


def parse(argv: list[str]) -> tuple[dict[str, str], str]:
    """Go-style flags (``-x v``, ``-x=v``, ``-debug``) and the action after them."""
    flags: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].lstrip("-").partition("=")
        if name in VALUE_FLAGS and not eq:
            i += 1
            value = argv[i] if i < len(argv) else ""
        flags[name] = value
        i += 1
    return flags, argv[i] if i < len(argv) else ""


def group_of(task_id: str, bundle: str) -> str:
    """The CRI sandbox id in the bundle's (compact) config.json, else the task id."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            raw = f.read()
    except OSError:
        return task_id
    i = raw.find(SANDBOX_ANNOTATION)
    if i < 0:
        return task_id
    start = i + len(SANDBOX_ANNOTATION)
    return raw[start : raw.find(b'"', start)].decode(errors="replace") or task_id


def socket_path(address: str, key: str) -> str:
    """Next to containerd's socket (short enough for sun_path), one per ``key``."""
    return os.path.join(os.path.dirname(address), f"nullshim-{digest(f'{address}/{key}')[:16]}")


def spawn_daemon(sock: _sock, flags: dict[str, str], path: str) -> None:
    """The daemon: this binary again without an action, own session, stdio on
    /dev/null (containerd waits for EOF on start's output), the socket as fd 3."""
    argv = [sys.argv[0], "-address", flags.get("address", ""), "-socket", path]
    argv += ["-containerd-pid", str(os.getppid())]
    spawn_detached(argv, sock.fileno())


def start(scope: str, flags: dict[str, str]) -> int:
    address = flags.get("address", "")
    if not address or not flags.get("id"):
        print("nullshim start: -address and -id are required", file=sys.stderr)
        return 2
    if scope == "node":
        key = "node"
    else:
        key = f"{flags.get('namespace', '')}/{group_of(flags['id'], os.getcwd())}"
    path = socket_path(address, f"{scope}/{key}")
    sock = listen(path)
    if sock is not None:
        try:
            spawn_daemon(sock, flags, path)
        except OSError:
            os.unlink(path)
            raise
        finally:
            sock.close()
    sys.stdout.write("unix://" + path)
    sys.stdout.flush()
    return 0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def delete_response(exit_status: int, now_ns: int) -> bytes:
    """``DeleteResponse{exit_status=2, exited_at=3}`` encoded by hand (no protobuf import
    on this path)."""
    secs, nanos = divmod(now_ns, 1_000_000_000)
    ts = b"\x08" + _varint(secs) + (b"\x10" + _varint(nanos) if nanos else b"")
    return b"\x10" + _varint(exit_status) + b"\x1a" + _varint(len(ts)) + ts


def main(scope: str, argv: list[str] | None = None) -> int:
    flags, action = parse(sys.argv[1:] if argv is None else argv)
    if action == "start":
        return start(scope, flags)
    if action == "delete":  # nothing ran, so nothing to clean: the answer alone
        sys.stdout.buffer.write(delete_response(128 + 9, time.time_ns()))
        sys.stdout.flush()
        return 0
    if action == "":
        from nullshim.daemon import serve

        return serve(scope, flags)
    print(f"nullshim: unknown action {action!r}", file=sys.stderr)
    return 2
