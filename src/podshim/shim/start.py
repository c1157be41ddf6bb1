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
import time
from _socket import AF_UNIX, SOCK_STREAM
from _socket import socket as _sock

from podshim import __version__, rundir
from podshim.oci import bundle as files
from podshim.shim.flags import Flags
from podshim.shim.paths import bundle_group, socket_address, socket_path
from podshim.shim.spawn import CONTAINERD_PID_ENV, self_command, spawn_detached

#: the most node daemons one config may spread pods over
MAX_SHARDS = 64
#: first words of the node-scope settings cache (:func:`cache_settings`)
SETTINGS_MAGIC = "podshim-start-settings 1"
#: a config file changed less than this long ago is not cached: a second change within
#: the same timestamp tick would leave its times as they were
SETTLED_NS = 2_000_000_000


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


def listen(path: str) -> _sock | None:
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


def _spawn_node_daemon(flags: Flags, key: str, sock: _sock, path: str) -> None:
    """A node daemon belongs to no bundle: it gets its key instead (and containerd's
    pid, so that it can leave with containerd when it holds nothing)."""
    tail = ["-namespace", flags.namespace, "-id", flags.id, "-address", flags.address]
    tail += ["-socket", path, "-node", key] + (["-debug"] if flags.debug else [])
    env = dict(os.environ, **{CONTAINERD_PID_ENV: str(os.getppid())})
    spawn_detached(self_command() + tail, sock.fileno(), env=env)


def _launch(flags: Flags, bundle: str, sock: _sock, path: str, settings: Settings) -> None:
    """Fork the daemon from the zygote when enabled, else spawn it."""
    if settings.zygote:
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


class Settings:
    """What ``start`` reads from the podshim config (a plain class: start must be cheap)."""

    def __init__(self, zygote: bool = True, scope: str = "pod", shards: int = 1) -> None:
        self.zygote = zygote
        self.scope = scope
        self.shards = shards
        self.config_path = ""
        #: the config file as read (fstat of the open file), for the settings cache
        self.config_stat: os.stat_result | None = None


def settings(options: bytes) -> Settings:
    """The ``start`` settings: ``zygote``, ``shim_scope`` and ``shards`` of the podshim
    config named by ``runtimeoptions.v1.Options.config_path`` in the options Any.
    ``PODSHIM_ZYGOTE`` in the environment overrides ``zygote``. Bad values are ignored
    here: Create reports a bad config properly."""
    out = Settings()
    any_ = _pb_fields(options)
    if any_.get(1, b"").rsplit(b"/", 1)[-1] == b"runtimeoptions.v1.Options":
        out.config_path = _pb_fields(any_.get(2, b"")).get(2, b"").decode(errors="replace")
    if out.config_path:
        import tomllib

        try:
            with open(out.config_path, "rb") as f:
                stat = os.fstat(f.fileno())
                table = tomllib.load(f)
            out.config_stat = stat
        except (OSError, tomllib.TOMLDecodeError):
            table = {}
        out.zygote = table.get("zygote", True) is True
        if table.get("shim_scope") == "node":
            out.scope = "node"
        shards = table.get("shards")
        if type(shards) is int and 1 <= shards <= MAX_SHARDS:
            out.shards = shards
    env = os.environ.get("PODSHIM_ZYGOTE", "").lower()
    if env in ("1", "true", "yes"):
        out.zygote = True
    elif env in ("0", "false", "no"):
        out.zygote = False
    return out


def zygote_enabled(options: bytes) -> bool:
    """Whether a pod-scope daemon is forked from the zygote: ``zygote`` of the podshim
    config named by ``runtimeoptions.v1.Options.config_path`` in the options Any (on by
    default), overridden by ``PODSHIM_ZYGOTE`` (1/true/yes or 0/false/no)."""
    return settings(options).zygote


def settings_cache_path(config_path: str) -> str:
    """``<run dir>/settings/<sha256(config path)[:16]>``."""
    return os.path.join(rundir.settings_dir(), rundir.digest(config_path)[:16])


def settings_cache_text(conf: Settings) -> str | None:
    """What the launcher (``launcher.c``) needs to find a node daemon without Python
    (which alone reads TOML): the version (part of :func:`node_key`), the scope, the
    shards, and the config file's identity and times, which it compares with the file as it
    is then; the config path follows the first line. None for a config not worth caching:
    none, unreadable, pod scope (the launcher tells that from the text) or just changed."""
    st = conf.config_stat
    if conf.scope != "node" or st is None or time.time_ns() - st.st_ctime_ns < SETTLED_NS:
        return None
    head = f"{SETTINGS_MAGIC} {__version__} node {conf.shards} {st.st_dev} {st.st_ino}"
    return f"{head} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n{conf.config_path}"


def cache_settings(conf: Settings) -> None:
    """Leave the settings cache for the launcher, unless it is there already. Only a
    cache: any failure is ignored (the launcher then execs Python)."""
    text = settings_cache_text(conf)
    if text is None:
        return
    data = text.encode()
    path = settings_cache_path(conf.config_path)
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        _unlink_quietly(tmp)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def node_key(config_path: str, group: str, shards: int) -> str:
    """The node daemon serving ``group``: one per podshim version, config file and shard
    (a stable hash of the group, i.e. of the pod's sandbox id, picks the shard). Keyed by
    version, so an upgraded podshim starts new daemons and the old ones drain."""
    shard = int(rundir.digest(group)[:8], 16) % shards if shards > 1 else 0
    return f"node-{__version__}-{rundir.digest(config_path)[:12]}-{shard}"


def start(flags: Flags) -> int:
    bundle = os.getcwd()
    if not flags.id or not flags.namespace or not flags.address:
        print("start: -id, -namespace and -address are required", file=sys.stderr)
        return 2
    group = bundle_group(flags.id, bundle)
    conf = settings(_read_options())
    if conf.scope == "node":
        cache_settings(conf)
        key = node_key(conf.config_path, group, conf.shards)
        path = socket_path(flags.address, "", key)  # one for all namespaces
    else:
        path = socket_path(flags.address, flags.namespace, group)
    sock = listen(path)
    if sock is not None:
        try:
            if conf.scope == "node":
                _spawn_node_daemon(flags, key, sock, path)
            else:
                _launch(flags, bundle, sock, path, conf)
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
