"""The ``start`` action: print the address of a listening shim socket, spawning the
serving daemon when this task's group has none yet.

containerd waits for this process *and* for EOF on its stdout/stderr pipe, then dials the
printed address once. So: nothing but the address is printed; the socket listens before
it is printed; the daemon gets /dev/null for stdio and its own session; the listening
socket is handed to it as fd 3. Standard library only, and as little work as possible:
this runs for every pod and every container.
"""

from __future__ import annotations

import errno
import os
import sys
from _socket import AF_UNIX, SOCK_STREAM
from _socket import socket as _sock

from podshim.oci import bundle as files
from podshim.shim.flags import Flags
from podshim.shim.paths import bundle_group, socket_address, socket_path
from podshim.shim.spawn import self_command, spawn_detached


def _alive(path: str) -> bool:
    s = _sock(AF_UNIX, SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _listen(path: str) -> _sock | None:
    """Listen at ``path``; None when another live shim holds it.

    The socket is bound and listening under a temporary name first and then hard-linked
    into place, so ``path`` never names a socket that refuses connections: a concurrent
    ``start`` either finds a live shim there or nothing (then one link wins).
    """
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    for _ in range(50):
        s = _sock(AF_UNIX, SOCK_STREAM)
        try:
            _unlink(tmp)
            s.bind(tmp)
            os.chmod(tmp, 0o600)
            s.listen(128)
            try:
                os.link(tmp, path)
            finally:
                os.unlink(tmp)
            return s
        except FileExistsError:
            s.close()
            if _alive(path):
                return None
            _unlink(path)  # stale socket of a dead shim
        except BaseException:
            s.close()
            raise
    raise OSError(errno.EADDRINUSE, f"cannot bind {path}")


def _spawn_daemon(flags: Flags, bundle: str, sock: _sock, path: str) -> None:
    tail = ["-namespace", flags.namespace, "-id", flags.id, "-address", flags.address]
    tail += ["-bundle", bundle, "-socket", path] + (["-debug"] if flags.debug else [])
    spawn_detached(self_command() + tail, sock.fileno())


def _launch(flags: Flags, bundle: str, sock: _sock, path: str) -> None:
    """Fork the daemon from the zygote when enabled, else spawn it."""
    if zygote_enabled(_read_options()):
        from podshim.shim.zygote import request_fork  # only when enabled: keeps start fast

        try:
            request_fork(flags, bundle, sock, path)
            return
        except (OSError, ValueError):
            pass  # fall back to a daemon of our own
    _spawn_daemon(flags, bundle, sock, path)


def _read_options() -> bytes:
    """The runtime options containerd writes on our stdin (a serialized Any), or b""."""
    try:
        if os.isatty(0):
            return b""
        return os.read(0, 1 << 16)
    except OSError:
        return b""


def _pb_fields(data: bytes) -> dict[int, bytes]:
    """Length-delimited fields of a protobuf message (enough for Any and Options)."""
    out: dict[int, bytes] = {}
    i = 0
    try:
        while i < len(data):
            key, i = _varint(data, i)
            if key & 7 == 2:
                n, i = _varint(data, i)
                out[key >> 3] = data[i : i + n]
                i += n
            elif key & 7 == 0:
                _, i = _varint(data, i)
            else:
                break
    except IndexError:
        pass
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def zygote_enabled(options: bytes) -> bool:
    """``PODSHIM_ZYGOTE=1`` in the environment, or ``zygote = true`` in the podshim
    config named by ``runtimeoptions.v1.Options.config_path`` in the options Any."""
    env = os.environ.get("PODSHIM_ZYGOTE", "").lower()
    if env in ("1", "true", "yes"):
        return True
    if env in ("0", "false", "no"):
        return False
    any_ = _pb_fields(options)
    if any_.get(1, b"").rsplit(b"/", 1)[-1] != b"runtimeoptions.v1.Options":
        return False
    config_path = _pb_fields(any_.get(2, b"")).get(2, b"").decode(errors="replace")
    if not config_path:
        return False
    import tomllib

    try:
        with open(config_path, "rb") as f:
            return tomllib.load(f).get("zygote") is True
    except (OSError, tomllib.TOMLDecodeError):
        return False  # Create reports the bad config properly


def start(flags: Flags) -> int:
    bundle = os.getcwd()
    if not flags.id or not flags.namespace or not flags.address:
        print("start: -id, -namespace and -address are required", file=sys.stderr)
        return 2
    group = bundle_group(flags.id, bundle)
    path = socket_path(flags.address, flags.namespace, group)
    sock = _listen(path)
    if sock is not None:
        try:
            _launch(flags, bundle, sock, path)
        except OSError:
            os.unlink(path)
            raise
        finally:
            sock.close()
    address = socket_address(path)
    with open(os.path.join(bundle, files.ADDRESS), "w") as f:
        f.write(address)
    sys.stdout.write(address)
    sys.stdout.flush()
    return 0
